"""The HTTP server, talked to by the official `openai` client and by httpx over loopback: completions, streaming,
chat, errors in OpenAI's shape, classify / NER, health / metrics / API key, micro-batching under 32 concurrent
clients, 429 beyond the bound, timeouts and client disconnects that stop the work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn
from transformers import (AutoModelForCausalLM, BertConfig, BertForMaskedLM, BertForSequenceClassification,
                          BertForTokenClassification)
from typer.testing import CliRunner

from conftest import make_docs
from lmforge.cli import app as cli
from lmforge.tasks.predict import classify_texts, tag_texts, word_offsets
from lmforge.generate import Decoding, generate
from lmforge.recipe import TokenizerConfig
from lmforge.serve import ServedModel, create_app, load_served_model
from lmforge.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

KEY = "sk-test-key"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@contextmanager
def serving(app):
    """Run `app` with uvicorn on a free loopback port in a background thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def client(base: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def task_dirs(tmp_path_factory):
    """A tiny BERT sentence classifier and a tiny BERT tagger (every word B-PER: a bias forces it), as HF folders."""
    root = tmp_path_factory.mktemp("tasks")
    tok = train_tokenizer(iter(make_docs("prose", 100, seed=2)),
                          TokenizerConfig(kind="wordpiece", vocab_size=200, min_frequency=1))
    config = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    cls = BertForSequenceClassification(BertConfig(**config, id2label={0: "negative", 1: "positive"},
                                                   label2id={"negative": 0, "positive": 1}))
    ner = BertForTokenClassification(BertConfig(**config, id2label=dict(enumerate(NER_LABELS)),
                                                label2id={n: i for i, n in enumerate(NER_LABELS)}))
    with torch.no_grad():
        ner.classifier.bias.copy_(torch.tensor([0.0, 20.0, 0.0, 0.0, 0.0]))
    for name, model in (("sentiment", cls), ("tagger", ner)):
        save_tokenizer(tok, root / name)  # first: it writes its folder whole
        model.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    from lmforge.generate import open_generator
    return open_generator(tiny_lm_dir)


@pytest.fixture(scope="module")
def main_server(tiny_lm_dir, task_dirs, lm):
    chat_tok = load_tokenizer(tiny_lm_dir)
    chat_tok.chat_template = CHAT_TEMPLATE
    models = {"tiny": ServedModel.of("tiny", *lm),
              "chat": ServedModel.of("chat", lm[0], chat_tok),
              "sentiment": load_served_model(f"sentiment={task_dirs / 'sentiment'}"),
              "tagger": load_served_model(str(task_dirs / "tagger"))}
    app = create_app(models, api_key=KEY, max_batch=16, max_wait_ms=20, max_tokens_cap=200)
    with serving(app) as base:
        yield base


def test_completions_with_the_openai_client(main_server, lm):
    model, tok = lm
    c = client(main_server)
    r = c.completions.create(model="tiny", prompt="def value", max_tokens=20, temperature=0)
    direct = generate(model, tok, ["def value"], Decoding(max_new_tokens=20, temperature=0))[0]
    assert r.object == "text_completion" and r.model == "tiny" and r.id.startswith("cmpl-")
    assert r.choices[0].text == direct.text and r.choices[0].finish_reason == direct.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (direct.prompt_tokens, direct.completion_tokens)

    # a list of prompts × n choices; a seeded choice j is the seed + j draw, whatever else is in the request
    r = c.completions.create(model="tiny", prompt=["def value", "The river"], max_tokens=12, temperature=0.9,
                             top_p=0.95, n=2, seed=11)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    alone = generate(model, tok, ["def value"], Decoding(max_new_tokens=12, temperature=0.9, top_p=0.95,
                                                         top_k=None, seed=12))[0]
    assert r.choices[1].text == alone.text and r.choices[0].text != r.choices[1].text
    assert r.usage.prompt_tokens == sum(len(tok(p, add_special_tokens=False)["input_ids"])
                                        for p in ("def value", "The river"))

    stop = direct.text[8:11]
    r = c.completions.create(model="tiny", prompt="def value", max_tokens=20, temperature=0, stop=[stop, "@@"],
                             echo=True)
    assert r.choices[0].text == "def value" + direct.text[:direct.text.find(stop)]
    assert r.choices[0].finish_reason == "stop"

    r = c.completions.create(model="tiny", prompt="def value", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(alts) == 2 for alts in lp.top_logprobs)

    models = {m.id: m for m in c.models.list().data}
    assert set(models) == {"tiny", "chat", "sentiment", "tagger"}
    assert c.models.retrieve("tagger").id == "tagger"


def test_streaming_with_the_openai_client(main_server, lm):
    c = client(main_server)
    kwargs = dict(model="tiny", prompt="def value", max_tokens=25, temperature=0.8, seed=5)
    whole = c.completions.create(**kwargs).choices[0]
    events = list(c.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts = [e.choices[0].text for e in events if e.choices]
    assert len(texts) > 3 and "".join(texts) == whole.text
    assert events[-2].choices[0].finish_reason == whole.finish_reason
    assert events[-1].usage.completion_tokens == 25 and not events[-1].choices

    two = list(c.completions.create(model="tiny", prompt=["def value", "The river"], max_tokens=8, temperature=0,
                                    stream=True))
    by_index = {0: "", 1: ""}
    for e in two:
        by_index[e.choices[0].index] += e.choices[0].text
    plain = c.completions.create(model="tiny", prompt=["def value", "The river"], max_tokens=8, temperature=0)
    assert [by_index[0], by_index[1]] == [ch.text for ch in plain.choices]


def test_chat_completions_need_a_chat_template(main_server, lm):
    c = client(main_server)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def value"}]
    r = c.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0)
    prompt = "system: be brief\nuser: def value\nassistant:"
    same = c.completions.create(model="chat", prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == same.choices[0].text
    assert r.object == "chat.completion" and r.usage.completion_tokens == same.usage.completion_tokens
    pieces = [e.choices[0].delta.content or "" for e in
              c.chat.completions.create(model="chat", messages=messages, max_tokens=10, temperature=0, stream=True)]
    assert "".join(pieces) == same.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="tiny", messages=messages)
    assert err.value.status_code == 400 and err.value.body["code"] == "no_chat_template"


def test_errors_have_openai_shape_and_status(main_server):
    c = client(main_server)
    cases = [
        (openai.NotFoundError, dict(model="nope", prompt="x"), "model"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", temperature=3), "temperature"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", max_tokens=0), "max_tokens"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", max_tokens=201), "max_tokens"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", n=17), "n"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", stop=["a", "b", "c", "d", "e"]), "stop"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", presence_penalty=0.5), "presence_penalty"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", extra_body={"bogus": 1}), "bogus"),
        (openai.BadRequestError, dict(model="tiny", prompt="The river " * 200), "prompt"),
        (openai.BadRequestError, dict(model="sentiment", prompt="x"), "model"),
    ]
    for error, kwargs, param in cases:
        with pytest.raises(error) as caught:
            c.completions.create(**kwargs)
        body = caught.value.body
        assert set(body) == {"message", "type", "param", "code"} and body["param"] == param, body
    long = pytest.raises(openai.BadRequestError)
    with long as caught:
        c.completions.create(model="tiny", prompt="The river " * 200)
    assert caught.value.body["code"] == "context_length_exceeded" and "256" in caught.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        client(main_server, key="wrong").completions.create(model="tiny", prompt="x")
    bad_json = httpx.post(f"{main_server}/v1/completions", content=b"{not json", headers=auth())
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    missing = httpx.get(f"{main_server}/v1/nothing", headers=auth())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_classify_ner_health_metrics_and_api_key(main_server, task_dirs):
    assert httpx.get(f"{main_server}/health").json()["status"] == "ok"  # no key needed
    for path in ("/metrics", "/v1/models"):
        r = httpx.get(main_server + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

    texts = ["The river walked under the old stone.", "quiet village morning light " * 30]  # the 2nd is truncated
    r = httpx.post(f"{main_server}/v1/classify", json={"model": "sentiment", "texts": texts}, headers=auth())
    assert r.status_code == 200, r.text
    served = load_served_model(str(task_dirs / "sentiment"))
    direct = classify_texts(served.model, served.tokenizer, texts)
    for got, want in zip(r.json()["data"], direct):
        assert got["label"] == want["label"] and got["scores"] == pytest.approx(want["scores"], abs=1e-5)
        assert set(got["scores"]) == {"negative", "positive"} and got["score"] == max(got["scores"].values())

    text = "Maria flew to Paris, then met Jan."
    r = httpx.post(f"{main_server}/v1/ner", json={"model": "tagger", "texts": [text, ""]}, headers=auth())
    assert r.status_code == 200, r.text
    first, empty = r.json()["data"]
    spans = [(a, b) for _, a, b in word_offsets(text)]
    assert [(e["start"], e["end"]) for e in first["entities"]] == spans  # the bias tags every word B-PER
    assert all(text[e["start"]:e["end"]] == e["text"] and e["type"] == "PER" for e in first["entities"])
    assert empty["entities"] == [] and empty["tokens"] == []
    served = load_served_model(str(task_dirs / "tagger"))
    assert first["tags"] == tag_texts(served.model, served.tokenizer, [text])[0]["tags"]

    bad = httpx.post(f"{main_server}/v1/classify", json={"model": "sentiment", "texts": []}, headers=auth())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "texts"
    wrong = httpx.post(f"{main_server}/v1/ner", json={"model": "sentiment", "texts": ["x"]}, headers=auth())
    assert wrong.status_code == 400 and "/v1/classify" in wrong.json()["error"]["message"]

    m = httpx.get(f"{main_server}/metrics", headers=auth()).json()
    assert m["requests"]["/v1/classify"]["200"] >= 1 and m["requests"]["/v1/ner"]["400"] >= 1
    assert m["latency_ms"]["/v1/classify"]["p50"] > 0 and m["latency_ms"]["/v1/classify"]["count"] >= 1
    assert m["models"]["tagger"]["kind"] == "ner"
    # The same figures for Prometheus, parsed back with prometheus_client's own parser.
    from prometheus_client.parser import text_string_to_metric_families
    prom = httpx.get(f"{main_server}/metrics", params={"format": "prometheus"}, headers=auth())
    assert prom.status_code == 200 and prom.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(prom.text) for s in family.samples}
    assert samples[("lmforge_requests_total", (("route", "/v1/classify"), ("status", "200")))] >= 1
    assert samples[("lmforge_request_latency_seconds", (("quantile", "0.5"), ("route", "/v1/classify")))] > 0
    assert ("lmforge_queued", (("model", "tagger"),)) in samples and ("lmforge_in_flight", ()) in samples
    bad = httpx.get(f"{main_server}/metrics", params={"format": "xml"}, headers=auth())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"
    assert httpx.get(f"{main_server}/metrics", params={"format": "prometheus"}).status_code == 401  # key needed


def test_32_concurrent_clients_are_batched_and_exact(main_server, lm):
    model, tok = lm
    words = "The river quiet village old stone garden rain def value return range".split()
    prompts = [" ".join(words[i % 12: i % 12 + 1 + i % 3]) for i in range(64)]
    alone = {p: generate(model, tok, [p], Decoding(max_new_tokens=12, temperature=0))[0] for p in set(prompts)}
    expected = {p: c.text for p, c in alone.items()}
    before = httpx.get(f"{main_server}/metrics", headers=auth()).json()
    results, failures = {}, []

    def client_thread(k: int):
        with httpx.Client(base_url=main_server, headers=auth(), timeout=60) as http:
            for j in range(2):
                i = 2 * k + j
                try:
                    r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompts[i], "max_tokens": 12,
                                                           "temperature": 0})
                    results[i] = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
                except Exception as err:  # recorded, asserted below
                    failures.append(repr(err))

    threads = [threading.Thread(target=client_thread, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not failures
    assert len(results) == 64 and all(results[i] == expected[prompts[i]] for i in range(64))
    after = httpx.get(f"{main_server}/metrics", headers=auth()).json()
    batches = after["batches"] - before["batches"]
    served = after["requests"]["/v1/completions"]["200"] - before["requests"].get("/v1/completions", {}).get("200", 0)
    assert served == 64
    generated = after["generated_tokens"] - before["generated_tokens"]
    assert generated == sum(alone[p].completion_tokens for p in prompts)
    assert 4 * batches < generated  # rows decoded together: four or more per decode step on average


@pytest.fixture(scope="module")
def slow_model(tiny_lm_dir):
    """The tiny LM made slow (10 ms a step), so that requests stay in flight long enough to observe."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.01))
    return ServedModel.of("slow", model, load_tokenizer(tiny_lm_dir))


def wait_for(check, seconds: float = 20.0):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_bounds_streams_and_disconnects(slow_model):
    app = create_app({"slow": slow_model}, max_concurrent=2, max_queue=0, max_tokens_cap=250)
    with serving(app) as base:
        c = client(base, key="unused")
        metrics = lambda: httpx.get(f"{base}/metrics").json()  # noqa: E731 (no key configured)
        body = {"model": "slow", "prompt": "def value", "max_tokens": 200, "temperature": 0.8, "seed": 1,
                "stream": True}
        with httpx.Client(base_url=base, timeout=60) as http, http.stream("POST", "/v1/completions", json=body) as s:
            lines = s.iter_lines()
            assert next(lines).startswith("data: ")
            # a long stream does not hold up a short request on the same model
            t0 = time.monotonic()
            short = c.completions.create(model="slow", prompt="The river", max_tokens=3, temperature=0)
            assert short.choices[0].text and time.monotonic() - t0 < 1.5
            # fill the second slot; a third request is refused with 429
            done = []
            second = threading.Thread(target=lambda: done.append(
                c.completions.create(model="slow", prompt="The river", max_tokens=150, temperature=0)))
            second.start()
            wait_for(lambda: metrics()["in_flight"] == 2)
            with pytest.raises(openai.RateLimitError) as err:
                c.completions.create(model="slow", prompt="x", max_tokens=2)
            assert err.value.status_code == 429 and err.value.body["type"] == "rate_limit_error"
            tokens_before = metrics()["generated_tokens"]
        # the client left the stream after its first event: its rows stop, its slot comes back
        wait_for(lambda: metrics()["cancelled"] >= 1)
        second.join(timeout=60)
        assert done and done[0].usage.completion_tokens > 0
        wait_for(lambda: metrics()["in_flight"] == 0)
        streamed = metrics()["generated_tokens"] - tokens_before - done[0].usage.completion_tokens
        assert 0 < streamed < 150  # the stream stopped well short of its 200 tokens
        assert metrics()["requests"]["/v1/completions"]["429"] == 1


def test_timeout_stops_the_work(slow_model):
    app = create_app({"slow": slow_model}, timeout_s=0.4, max_tokens_cap=250)
    with serving(app) as base:
        c = client(base, key="unused")
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            c.completions.create(model="slow", prompt="def value", max_tokens=200, temperature=0)
        assert err.value.status_code == 408 and err.value.body["code"] == "timeout"
        assert time.monotonic() - t0 < 2
        # the batch worker is free again at once: the timed-out rows were cancelled, not run to the end
        t0 = time.monotonic()
        assert c.completions.create(model="slow", prompt="x", max_tokens=2, temperature=0).choices
        assert time.monotonic() - t0 < 1.0
        m = httpx.get(f"{base}/metrics").json()
        assert m["cancelled"] == 1 and m["requests"]["/v1/completions"] == {"200": 1, "408": 1}
        body = {"model": "slow", "prompt": "def value", "max_tokens": 200, "temperature": 0, "stream": True}
        events = httpx.post(f"{base}/v1/completions", json=body, timeout=30).text.strip().split("\n\n")
        assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "timeout"
        assert events[-1] == "data: [DONE]"


def test_cli_serve(tiny_lm_dir, task_dirs, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "lmforge.cli", "serve", f"lm={tiny_lm_dir}", str(task_dirs / "tagger"),
               "--port", str(port), "--device", "cpu", "--max-tokens-cap", "64"]
    proc = subprocess.Popen(command, env={**os.environ, "LMFORGE_API_KEY": "k2"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(f"{base}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False
    try:
        wait_for(up, 120)
        assert {m.id for m in client(base, key="k2").models.list().data} == {"lm", "tagger"}
        r = client(base, key="k2").completions.create(model="lm", prompt="def value", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5
        assert httpx.get(f"{base}/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    mlm = tmp_path / "mlm"
    save_tokenizer(load_tokenizer(tiny_lm_dir), mlm)
    BertForMaskedLM(BertConfig(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(mlm)
    runner = CliRunner()
    for folder, message in ((tmp_path / "missing", "no such run folder"), (mlm, "masked LM")):
        result = runner.invoke(cli, ["serve", str(folder)])
        assert result.exit_code == 2 and message in result.stderr, result.output
    twice = runner.invoke(cli, ["serve", str(tiny_lm_dir), str(tiny_lm_dir)])
    assert twice.exit_code == 2 and "NAME=PATH" in twice.stderr


def test_text_that_is_not_unicode_nan_and_crashes(main_server, monkeypatch):
    """A lone surrogate (valid JSON, not text) is a 400 naming the field and the connection lives on; NaN is not
    a number; a crash is a 500 with a request id and nothing of the exception."""
    headers = {**auth(), "Content-Type": "application/json"}
    with httpx.Client(base_url=main_server, headers=headers, timeout=60) as http:
        bad = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "ab\\ud800c", "max_tokens": 2}')
        error = bad.json()["error"]
        assert bad.status_code == 400 and error["param"] == "prompt" and "lone surrogate (\\ud800)" in error["message"]
        chat = http.post("/v1/chat/completions",
                         content=b'{"model": "chat", "messages": [{"role": "user", "content": "\\udfff"}]}')
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
        ner = http.post("/v1/ner", content=b'{"model": "tagger", "texts": ["ok", "\\ud83d"]}')
        assert ner.status_code == 400 and ner.json()["error"]["param"] == "texts"
        nan = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "x", "temperature": NaN}')
        assert nan.status_code == 400 and "finite number" in nan.json()["error"]["message"]
        # the same keep-alive connection still serves
        ok = http.post("/v1/completions", json={"model": "tiny", "prompt": "The river", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"]

        def crash(*args, **kwargs):
            raise RuntimeError("secret state at /home/someone/.cache")

        monkeypatch.setattr("lmforge.generate.running.RunningBatch.join", crash)
        boom = http.post("/v1/completions", json={"model": "tiny", "prompt": "The river", "max_tokens": 2})
    body = boom.json()["error"]
    assert boom.status_code == 500 and body["type"] == "server_error"
    assert "secret" not in boom.text and "RuntimeError" not in boom.text
    assert body["code"] and f"request id {body['code']}" in body["message"]
