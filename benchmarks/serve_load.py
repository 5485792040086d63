"""Serving under load, each peer measured in the same run.

Default mode: `lmforge serve` (continuous batching) vs a one-request-at-a-time server with plain
`model.generate`; plus one-sequence generation speed of our wrapper vs plain `transformers` generate.
`--stream`: streaming clients with mixed prompt and output lengths against four servers up at once —
continuous batching, micro-batching (`lmforge serve --batching micro`), one-at-a-time `generate`, and the
peer `transformers serve --continuous-batching` on the same checkpoint —
for generated tokens/s and time to first token (bars, issue 25: continuous >= 1.5x micro's tokens/s and
<= 0.5x its p99 TTFT at 8/32/64 clients); medians over `--rounds`, ratios of the same round.

    python benchmarks/serve_load.py                      # GPT-2 4x256 (random weights), 1/8/32 clients
    python benchmarks/serve_load.py --stream --requests 4 --max-tokens 96
    python benchmarks/serve_load.py --run runs/quickstart/clm --device cuda
    python benchmarks/serve_load.py --stream --size base --clients 8,32   # GPT-2 base's 12x768 body
    python benchmarks/serve_load.py --quick              # seconds: a smoke test of the script itself
    python benchmarks/serve_load.py --stream --experts 2 # a 2-expert BTM ensemble: continuous vs micro
    python benchmarks/serve_load.py --stream --onnx --servers onnx --clients 1,8,32   # PyTorch vs ONNX Runtime

Each level starts C concurrent clients (loopback only); each sends R greedy completion requests one after
another, for at most `--time-limit` seconds. Default mode reports per server and level requests/s,
generated tokens/s, p50/p99 latency (bars, issue 5: at 32 clients our generated tokens/s >= 4x the
one-at-a-time server; one-sequence tokens/s of `lmforge.generate` >= 1.0x plain generate). The servers
answer the same greedy prompts, so their texts agree (the run checks it). Servers run as subprocesses on
the same machine as the clients, with OMP_WAIT_POLICY=PASSIVE (and `--server-threads`) alike, and get
warm-up requests first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

HERE = Path(__file__).resolve()
PEER = "transformers serve"


# ----------------------------------------------------------------------------- the peer server

def baseline_app(folder: str, device: str):
    """One request at a time: a lock around plain `model.generate` (greedy), OpenAI-shaped answers."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    def run(ids, max_tokens: int, streamer=None):
        with lock, torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                  do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                  streamer=streamer)

    @app.post("/v1/completions")
    def complete(body: dict):  # a sync route: runs in the threadpool, serialised by the lock
        ids = tok(body["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        if body.get("stream"):
            return StreamingResponse(stream_pieces(run, ids, body["max_tokens"], tok), media_type="text/event-stream")
        new = run(ids, body["max_tokens"])[0, ids.shape[1]:].tolist()
        n = new.index(tok.eos_token_id) + 1 if tok.eos_token_id in new else len(new)
        text = tok.decode(new[:n], skip_special_tokens=True)
        return {"choices": [{"text": text, "index": 0, "finish_reason": "length"}],
                "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": n, "total_tokens": ids.shape[1] + n}}
    return app


def stream_pieces(run, ids, max_tokens: int, tok):
    """Server-sent events of one plain `generate` call: one event per token as generate makes it (its streamer
    hook), then the usage, as lmforge's stream sends them."""
    import queue
    from transformers.generation.streamers import BaseStreamer

    pieces: queue.Queue = queue.Queue()

    class Tokens(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if self.prompt_seen:
                pieces.put(int(value.reshape(-1)[0]))
            self.prompt_seen = True

        def end(self):
            pieces.put(None)

    threading.Thread(target=run, args=(ids, max_tokens, Tokens()), daemon=True).start()
    made = []
    while (token := pieces.get()) is not None:
        made.append(token)
        if token == tok.eos_token_id:
            continue
        yield f"data: {json.dumps({'choices': [{'text': tok.decode([token]), 'index': 0}]})}\n\n"
    n = made.index(tok.eos_token_id) + 1 if tok.eos_token_id in made else len(made)
    yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': n}})}\n\n"
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- model and prompts

SIZES = {"quick": dict(n_layer=2, n_embd=64, n_head=2), "small": dict(n_layer=4, n_embd=256, n_head=4),
         "base": dict(n_layer=12, n_embd=768, n_head=12)}  # base: GPT-2 base's body (124M with its vocabulary)


def build_model(folder: Path, quick: bool, size: str = "small") -> list[str]:
    """A GPT-2 (random weights) with a BPE tokenizer trained on the Python standard library; returns prompts."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from lmforge.quickstart import stdlib_documents
    from lmforge.recipe import TokenizerConfig
    from lmforge.tokenizer import save_tokenizer, train_tokenizer
    docs = [text for _, text in stdlib_documents(200_000 if quick else 1_000_000)]
    tok = train_tokenizer(iter(docs), TokenizerConfig(kind="bpe", vocab_size=1000 if quick else 8000))
    save_tokenizer(tok, folder)
    dims = SIZES["quick" if quick else size]
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **dims)
                    ).save_pretrained(folder)
    return prompts_from(docs)


def clamp_max_tokens(folder: str, prompts: list[str], max_tokens: int) -> int:
    """`max_tokens` cut so that the longest prompt plus its completion fits the model's context: a request past it
    is a 400 from either server, and would end the benchmark."""
    from transformers import AutoTokenizer
    config = json.loads((Path(folder) / "config.json").read_text())
    context = next((config[k] for k in ("n_positions", "max_position_embeddings", "n_ctx") if config.get(k)), None)
    if context is None:
        return max_tokens
    tok = AutoTokenizer.from_pretrained(folder)
    longest = max(len(tok(p)["input_ids"]) for p in prompts)
    room = context - longest
    if room < 1:
        raise SystemExit(f"the longest prompt ({longest} tokens) fills the model's context of {context}")
    if max_tokens > room:
        print(f"note: --max-tokens {max_tokens} cut to {room}: the longest prompt is {longest} tokens and the model's "
              f"context {context}", flush=True)
        return room
    return max_tokens


def prompts_from(docs: list[str], n: int = 64) -> list[str]:
    lines = [ln.strip() for d in docs for ln in d.splitlines() if 20 <= len(ln.strip()) <= 80]
    step = max(1, len(lines) // n)
    return lines[::step][:n]


# ----------------------------------------------------------------------------- load generation

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server failed to start: {' '.join(command)}\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 300 s")


async def _run_clients(port: int, clients: int, client, timeout: float) -> float:
    """Run `client(k, http)` for k in range(clients) at once on one connection pool; the wall seconds."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        return time.perf_counter() - t0

async def load(port: int, model: str, prompts: list[str], clients: int, per_client: int, max_tokens: int,
               time_limit: float) -> dict:
    latencies, tokens, texts = [], 0, {}
    stop_at = time.monotonic() + time_limit

    async def client(k: int, http: httpx.AsyncClient):
        nonlocal tokens
        for j in range(per_client):
            if time.monotonic() > stop_at:
                return
            prompt = prompts[(k * per_client + j) % len(prompts)]
            t0 = time.perf_counter()
            r = await http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                         "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            body = r.json()
            tokens += body["usage"]["completion_tokens"]
            texts[prompt] = body["choices"][0]["text"]

    wall = await _run_clients(port, clients, client, timeout=600)
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]  # noqa: E731
    return {"clients": clients, "requests": len(latencies), "seconds": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "p50_ms": round(1000 * q(0.5), 1), "p99_ms": round(1000 * q(0.99), 1), "texts": texts}


def mixed_jobs(prompts: list[str], max_tokens: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs of mixed lengths: one-line and six-line prompts, 1/8 to all of `max_tokens`."""
    lengths = [max(1, max_tokens * k // 8) for k in (1, 8, 2, 4, 1, 6, 3, 8)]
    jobs = []
    for i, prompt in enumerate(prompts):
        if i % 4 == 3:
            prompt = "\n".join(prompts[(i + k) % len(prompts)] for k in range(6))
        jobs.append((prompt, lengths[i % len(lengths)]))
    return jobs


async def stream_load(port: int, model: str, jobs: list[tuple[str, int]], clients: int, per_client: int,
                      time_limit: float) -> dict:
    """C clients, each streaming R greedy completions one after another: generated tokens/s over the level's wall
    time, and time to the first text (TTFT) per request."""
    ttfts, tokens, texts, failures = [], 0, {}, []
    stop_at = time.monotonic() + time_limit

    async def client(k: int, http: httpx.AsyncClient):
        nonlocal tokens
        for j in range(per_client):
            if time.monotonic() > stop_at:
                return
            prompt, max_tokens = jobs[(k * per_client + j) % len(jobs)]
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0, first, pieces = time.perf_counter(), None, []
            try:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RuntimeError(f"stream failed: {event['error']}")
                        if event["choices"] and event["choices"][0]["text"]:
                            first = first or time.perf_counter() - t0
                            pieces.append(event["choices"][0]["text"])
                        tokens += (event.get("usage") or {}).get("completion_tokens", 0)
            except (httpx.HTTPError, RuntimeError) as err:  # counted and reported, not fatal to the run
                failures.append(repr(err))
                continue
            ttfts.append(first if first is not None else time.perf_counter() - t0)
            texts[f"{max_tokens}:{prompt}"] = "".join(pieces)

    wall = await _run_clients(port, clients, client, timeout=900)
    ttfts.sort()
    q = lambda p: ttfts[min(len(ttfts) - 1, int(p * len(ttfts)))]  # noqa: E731
    return {"clients": clients, "requests": len(ttfts), "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50_ms": round(1000 * q(0.5), 1),
            "ttft_p99_ms": round(1000 * q(0.99), 1), "failed": len(failures), "texts": texts}


def streaming_benchmark(args, folder: str, prompts: list[str], device: str, levels: list[int]) -> dict:
    """Continuous batching vs micro-batching (`lmforge serve --batching micro`), one-at-a-time `generate` and
    `transformers serve --continuous-batching`, all up at once, each round running every level on each server in
    turn (the order rotates)."""
    jobs = mixed_jobs(prompts, args.max_tokens)
    lmforge = lambda mode: lambda port: [sys.executable, "-m", "lmforge.cli", "serve", f"bench={folder}",  # noqa
                                         "--port", str(port), "--device", device, "--batching", mode,
                                         "--max-batch", str(max(levels)), "--max-concurrent", str(max(levels) + 8),
                                         "--max-tokens-cap", str(args.max_tokens), "--timeout", "3600"]
    servers = {"continuous": lmforge("continuous"), "micro": lmforge("micro"),
               "one-at-a-time": lambda port: [sys.executable, str(HERE), "--baseline-server", folder, "--port",
                                              str(port), "--device", device]}
    peer = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if peer and not args.no_peer:  # the named peer: transformers' own continuous-batching server, same checkpoint
        servers[PEER] = lambda port: [peer, "serve", "--continuous-batching", "--device", device, "--host",
                                      "127.0.0.1", "--port", str(port), "--log-level", "error", folder]
    elif not args.no_peer:
        print("note: the `transformers` command is not installed: its server is left out", flush=True)
    if args.onnx:  # the same model exported to ONNX Runtime (`lmforge export`), served as lmforge serves such a folder
        exported = Path(tempfile.mkdtemp(prefix="serve-onnx-")) / "onnx"
        subprocess.run([sys.executable, "-m", "lmforge.cli", "export", folder, "--out", str(exported)], check=True)
        servers["onnx"] = lambda port: [sys.executable, "-m", "lmforge.cli", "serve", f"bench={exported}", "--port",
                                        str(port), "--max-batch", str(max(levels)), "--max-concurrent",
                                        str(max(levels) + 8), "--max-tokens-cap", str(args.max_tokens),
                                        "--timeout", "3600"]
    if args.servers:  # a subset, continuous batching always in it (every ratio is against it)
        wanted = {"continuous"} | {PEER if n == "peer" else n for n in args.servers.split(",")}
        servers = {name: command for name, command in servers.items() if name in wanted}
    ports, procs = {}, []
    try:
        for name, command in servers.items():
            ports[name] = free_port()
            procs.append(start(command(ports[name]), ports[name]))
            asyncio.run(stream_load(ports[name], model_name(name, folder), jobs[-4:], 2, 2, args.time_limit))  # warm-up
        runs: dict = {}
        texts: dict = {}
        for round_ in range(args.rounds):
            for c in levels:
                k = round_ % len(servers)
                order = list(servers)[k:] + list(servers)[:k]
                for name in order:
                    r = asyncio.run(stream_load(ports[name], model_name(name, folder), jobs, c, args.requests,
                                                args.time_limit))
                    texts.setdefault(name, {}).update(r.pop("texts"))
                    runs.setdefault(str(c), {}).setdefault(name, []).append(r)
                    print(f"  round {round_ + 1} {name:>14} {c:>3} clients: {r['tokens_per_s']:9.1f} tok/s  TTFT p50 "
                          f"{r['ttft_p50_ms']:8.1f} ms  p99 {r['ttft_p99_ms']:8.1f} ms"
                          + (f"  ({r['failed']} requests failed)" if r["failed"] else ""), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
    others = [name for name in servers if name != "continuous"]
    return {"servers": list(servers), "levels": {c: summarize(by_server) for c, by_server in runs.items()},
            "same_text": {name: f"{sum(texts[name].get(k) == v for k, v in texts['continuous'].items())}/"
                                f"{len(texts['continuous'])}" for name in others}}


def model_name(server: str, folder: str) -> str:
    """What a request names as its model: lmforge serves the folder as `bench`; transformers serve by its path."""
    return folder if server == PEER else "bench"


def summarize(by_server: dict) -> dict:
    """Medians over rounds per server, and the medians of the per-round ratios of continuous batching against each
    other server (`continuous_vs_<name>`)."""
    out = {name: {key: statistics.median(r[key] for r in rs) for key in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")}
           for name, rs in by_server.items()}
    for name, rs in by_server.items():
        if name == "continuous":
            continue
        pairs = list(zip(by_server["continuous"], rs))
        out[f"continuous_vs_{name}"] = {
            "tokens_per_s": round(statistics.median(c["tokens_per_s"] / o["tokens_per_s"] for c, o in pairs), 2),
            "ttft_p99": round(statistics.median(c["ttft_p99_ms"] / o["ttft_p99_ms"] for c, o in pairs), 3)}
    return out


def print_streaming(results: dict) -> None:
    print("\n| clients | server | generated tokens/s | TTFT p50 ms | TTFT p99 ms |")
    print("|---:|---|---:|---:|---:|")
    for c, row in results["levels"].items():
        for name in results["servers"]:
            r = row[name]
            print(f"| {c} | {name} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} |")
    for c, row in results["levels"].items():
        print(f"{c} clients: continuous / " + "; continuous / ".join(
            f"{name} tokens/s = {row[f'continuous_vs_{name}']['tokens_per_s']}x, TTFT p99 = "
            f"{row[f'continuous_vs_{name}']['ttft_p99']}x" for name in results["servers"] if name != "continuous"))
    print(f"greedy texts identical to continuous batching: {results['same_text']}")


# ----------------------------------------------------------------------------- expert ensembles

def build_experts(folder: Path, n: int, quick: bool) -> list[str]:
    """A BTM ensemble folder (ensemble.json, as `lmforge experts merge` writes it) of `n` GPT-2 experts of
    build_model's size and tokenizer, each from its own random init; returns prompts."""
    from transformers import GPT2LMHeadModel
    prompts = build_model(folder / "expert0", quick)
    for k in range(1, n):
        torch.manual_seed(k)
        expert = GPT2LMHeadModel.from_pretrained(folder / "expert0")
        expert.init_weights()
        expert.save_pretrained(folder / f"expert{k}")
        for f in (folder / "expert0").iterdir():
            if "token" in f.name or f.name.endswith(".txt"):
                (folder / f"expert{k}" / f.name).write_bytes(f.read_bytes())
    (folder / "ensemble.json").write_text(json.dumps(
        {"method": "ensemble", "domains": [f"d{k}" for k in range(n)], "experts": [f"expert{k}" for k in range(n)],
         "prior": [1.0 / n] * n, "top_k": None, "routing": "posterior"}))
    return prompts


def stdlib_documents_for_experts():
    from lmforge.quickstart import stdlib_documents
    return stdlib_documents(200_000)


def experts_folder(run: str) -> Path:
    """An experts run's ensemble/ folder, or the ensemble folder itself."""
    run = Path(run)
    folder = run / "ensemble" if (run / "ensemble" / "ensemble.json").is_file() else run
    if not (folder / "ensemble.json").is_file():
        raise SystemExit(f"--experts --run {run}: no ensemble.json there or in its ensemble/ folder")
    return folder


def experts_streaming(args, folder: Path, prompts: list[str], device: str, levels: list[int]) -> dict:
    """A BTM ensemble served by `lmforge serve` with continuous batching (one KV cache per expert, the domain
    posterior per row) vs micro-batching (generate reruns every expert over the whole sequence each step),
    both up at once, rounds alternating which goes first; tokens/s, TTFT and whether the greedy texts agree."""
    jobs = mixed_jobs(prompts, args.max_tokens)
    command = lambda mode, port: [sys.executable, "-m", "lmforge.cli", "serve", f"bench={folder}",  # noqa: E731
                                  "--port", str(port), "--device", device, "--batching", mode,
                                  "--max-batch", str(max(levels)), "--max-concurrent", str(max(levels) + 8),
                                  "--max-tokens-cap", str(args.max_tokens), "--timeout", "3600"]
    ports, procs, runs, texts = {}, [], {}, {}
    try:
        for mode in ("continuous", "micro"):
            ports[mode] = free_port()
            procs.append(start(command(mode, ports[mode]), ports[mode]))
            asyncio.run(stream_load(ports[mode], "bench", jobs[-4:], 2, 1, args.time_limit))  # warm-up
        for round_ in range(args.rounds):
            for c in levels:
                for mode in (("continuous", "micro") if round_ % 2 == 0 else ("micro", "continuous")):
                    r = asyncio.run(stream_load(ports[mode], "bench", jobs, c, args.requests, args.time_limit))
                    texts.setdefault(mode, {}).update(r.pop("texts"))
                    runs.setdefault(str(c), {}).setdefault(mode, []).append(r)
                    print(f"  round {round_ + 1} {mode:>10} {c:>3} clients: {r['tokens_per_s']:9.1f} tok/s  TTFT p50 "
                          f"{r['ttft_p50_ms']:8.1f} ms  p99 {r['ttft_p99_ms']:8.1f} ms  ({r['requests']} requests"
                          + (f", {r['failed']} failed)" if r["failed"] else ")"), flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
    out: dict = {"experts": json.loads((folder / "ensemble.json").read_text())["domains"], "levels": {}}
    for c, by_mode in runs.items():
        row = {mode: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms")}
               for mode, rs in by_mode.items()}
        pairs = list(zip(by_mode["continuous"], by_mode["micro"]))
        row["continuous_vs_micro"] = {
            "tokens_per_s": round(statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs), 2),
            "ttft_p99": round(statistics.median(a["ttft_p99_ms"] / b["ttft_p99_ms"] for a, b in pairs), 3)}
        out["levels"][c] = row
    both = [k for k in texts["continuous"] if k in texts.get("micro", {})]
    out["same_text"] = f"{sum(texts['continuous'][k] == texts['micro'][k] for k in both)}/{len(both)}"
    print(f"\n| clients | {len(out['experts'])}-expert ensemble | generated tokens/s | TTFT p50 ms | TTFT p99 ms |")
    print("|---:|---|---:|---:|---:|")
    for c, row in out["levels"].items():
        for mode in ("continuous", "micro"):
            r = row[mode]
            print(f"| {c} | {mode} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} |")
    for c, row in out["levels"].items():
        vm = row["continuous_vs_micro"]
        print(f"{c} clients: continuous / micro tokens/s = {vm['tokens_per_s']}x, TTFT p99 = {vm['ttft_p99']}x")
    print(f"greedy texts identical (requests both servers answered): {out['same_text']}")
    return out


# ----------------------------------------------------------------------------- one sequence

def single_sequence(folder: str, prompt: str, max_tokens: int, device: str, repeats: int) -> dict:
    """tokens/s of lmforge.generate vs plain model.generate on one prompt (greedy and seeded sampling): the
    two alternate which goes first each round; the ratio is the median of the rounds' paired ratios."""
    from transformers import AutoModelForCausalLM
    from lmforge.generate import Decoding, generate
    from lmforge.tokenizer import load_tokenizer
    model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    tok = load_tokenizer(folder)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    out = {}
    for mode, sample in (("greedy", False), ("sampling", True)):
        settings = Decoding(max_new_tokens=max_tokens, temperature=0.8 if sample else 0, top_k=50, seed=0)
        plain_kwargs = dict(max_new_tokens=max_tokens, do_sample=sample, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id, **({"temperature": 0.8, "top_k": 50} if sample else {}))

        def ours() -> tuple[int, float]:
            sync(device)
            t0 = time.perf_counter()
            n = generate(model, tok, [prompt], settings)[0].completion_tokens
            sync(device)
            return n, time.perf_counter() - t0

        def plain() -> tuple[int, float]:
            torch.manual_seed(0)
            sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                res = model.generate(ids, attention_mask=torch.ones_like(ids), **plain_kwargs)
            sync(device)
            return res.shape[1] - ids.shape[1], time.perf_counter() - t0

        ours_rates, plain_rates = [], []
        for r in range(repeats + 1):  # the first round warms up
            first, second = (ours, plain) if r % 2 else (plain, ours)
            a, b = first(), second()
            (n_ours, t_ours), (n_plain, t_plain) = (a, b) if r % 2 else (b, a)
            if r:
                ours_rates.append(n_ours / t_ours)
                plain_rates.append(n_plain / t_plain)
        ratio = statistics.median(o / p for o, p in zip(ours_rates, plain_rates))
        out[mode] = {"lmforge_tokens_per_s": round(statistics.median(ours_rates), 1),
                     "plain_tokens_per_s": round(statistics.median(plain_rates), 1),
                     "ratio": round(ratio, 3), "tokens": n_ours}
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="serve this causal LM run / HF folder instead of building one")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--size", choices=["small", "base"], default="small", help="the GPT-2 built when no --run is "
                   "given: small (4x256) or base (GPT-2 base's 12x768 body)")
    p.add_argument("--clients", default="1,8,32", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=4, help="requests per client per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per level and server")
    p.add_argument("--repeats", type=int, default=5, help="one-sequence timing repeats")
    p.add_argument("--stream", action="store_true", help="streaming clients with mixed prompt and output lengths: "
                   "continuous vs micro-batching vs one-at-a-time generate (default levels 8,32,64)")
    p.add_argument("--server-threads", type=int, default=0, help="OMP_NUM_THREADS of every server (0: torch's "
                   "default); --stream defaults to 1")
    p.add_argument("--no-peer", action="store_true", help="--stream: leave out `transformers serve "
                   "--continuous-batching`")
    p.add_argument("--servers", help="--stream: only these beside continuous batching, comma-separated, of micro, "
                   "one-at-a-time, peer, onnx (with --onnx) (default: all)")
    p.add_argument("--onnx", action="store_true", help="--stream: also serve the model exported to ONNX Runtime "
                   "(`lmforge export`, fp32; server 'onnx')")
    p.add_argument("--rounds", type=int, default=3, help="--stream: rounds of all levels (medians are reported)")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 and 4 clients, 2 requests of 8 tokens")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--experts", type=int, default=0, help="--stream: a BTM ensemble of N experts (built here, or "
                   "--run an experts run), continuous vs micro-batching")
    p.add_argument("--baseline-server", help=argparse.SUPPRESS)   # internal: run the peer server on this folder
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.baseline_server:
        import uvicorn
        uvicorn.run(baseline_app(args.baseline_server, device), host="127.0.0.1", port=args.port,
                    log_level="warning")
        return
    if args.stream and args.clients == "1,8,32":
        args.clients = "8,32,64"
    if args.stream and not args.server_threads:
        args.server_threads = 1
    if args.quick:
        args.clients, args.requests, args.max_tokens, args.repeats, args.rounds = "1,4", 2, 8, 2, 1
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # every server alike (lmforge serve sets it for itself)
    if args.server_threads:  # every server alike: on a CPU shared with other work, one thread per server is fastest
        os.environ["OMP_NUM_THREADS"] = str(args.server_threads)

    if args.experts:
        if not args.stream:
            raise SystemExit("--experts: use it with --stream")
        with tempfile.TemporaryDirectory() as tmp:
            folder = experts_folder(args.run) if args.run else Path(tmp) / "ensemble"
            prompts = (prompts_from([t for _, t in stdlib_documents_for_experts()]) if args.run
                       else build_experts(folder, args.experts, args.quick))
            expert = folder / json.loads((folder / "ensemble.json").read_text())["experts"][0]
            args.max_tokens = clamp_max_tokens(str(expert.resolve()), prompts, args.max_tokens)
            levels = [int(c) for c in args.clients.split(",")]
            print(f"ensemble: {folder}; device: {device}; levels {levels}, {args.requests} requests x up to "
                  f"{args.max_tokens} tokens per client", flush=True)
            results = {"device": device, "torch": torch.__version__, **experts_streaming(args, folder, prompts,
                                                                                         device, levels)}
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            from lmforge.runs import model_folder
            folder = str(model_folder(Path(args.run)))
            from lmforge.quickstart import stdlib_documents
            prompts = prompts_from([t for _, t in stdlib_documents(200_000)])
        else:
            folder = str(Path(tmp) / "model")
            prompts = build_model(Path(folder), args.quick, args.size)
        args.max_tokens = clamp_max_tokens(folder, prompts, args.max_tokens)
        levels = [int(c) for c in args.clients.split(",")]
        print(f"model: {folder}; device: {device}; {len(prompts)} prompts; levels {levels}, "
              f"{args.requests} requests x {args.max_tokens} tokens per client", flush=True)
        results = {"device": device, "model": folder, "levels": {}, "torch": torch.__version__}
        if args.stream:
            results.update(streaming_benchmark(args, folder, prompts, device, levels))
            print_streaming(results)
            if args.out:
                Path(args.out).write_text(json.dumps(results, indent=2))
            return

        servers = {
            "lmforge": lambda port: [sys.executable, "-m", "lmforge.cli", "serve", f"bench={folder}", "--port",
                                     str(port), "--device", device, "--max-batch", str(max(levels)),
                                     "--max-concurrent", str(max(levels) + 8), "--max-tokens-cap",
                                     str(args.max_tokens), "--timeout", "3600"],
            "one-at-a-time": lambda port: [sys.executable, str(HERE), "--baseline-server", folder, "--port",
                                           str(port), "--device", device],
        }
        texts = {}
        for name, command in servers.items():
            port = free_port()
            proc = start(command(port), port)
            try:
                asyncio.run(load(port, "bench", prompts[-4:], 2, 2, args.max_tokens, args.time_limit))  # warm-up
                for c in levels:
                    r = asyncio.run(load(port, "bench", prompts, c, args.requests, args.max_tokens, args.time_limit))
                    texts.setdefault(name, {}).update(r.pop("texts"))
                    results["levels"].setdefault(str(c), {})[name] = r
                    print(f"  {name:>14} {c:>3} clients: {r['requests_per_s']:8.2f} req/s "
                          f"{r['tokens_per_s']:9.1f} tok/s  p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms",
                          flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
        same = [p for p in texts["lmforge"] if texts["one-at-a-time"].get(p) == texts["lmforge"][p]]
        results["same_text"] = f"{len(same)}/{len(texts['lmforge'])}"
        for c, row in results["levels"].items():
            row["tokens_per_s_ratio"] = round(row["lmforge"]["tokens_per_s"] / row["one-at-a-time"]["tokens_per_s"], 2)
        results["single_sequence"] = single_sequence(folder, prompts[0], 4 * args.max_tokens, device, args.repeats)

    print("\n| clients | server | requests/s | generated tokens/s | p50 ms | p99 ms |")
    print("|---:|---|---:|---:|---:|---:|")
    for c, row in results["levels"].items():
        for name in ("lmforge", "one-at-a-time"):
            r = row[name]
            print(f"| {c} | {name} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['p50_ms']:.1f} | "
                  f"{r['p99_ms']:.1f} |")
    for c, row in results["levels"].items():
        print(f"{c} clients: lmforge / one-at-a-time generated tokens/s = {row['tokens_per_s_ratio']}x")
    print(f"greedy texts identical on both servers: {results['same_text']}")
    for mode, r in results["single_sequence"].items():
        print(f"one sequence, {mode}: lmforge.generate {r['lmforge_tokens_per_s']} tok/s vs plain generate "
              f"{r['plain_tokens_per_s']} tok/s = {r['ratio']}x ({r['tokens']} tokens)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
