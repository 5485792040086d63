"""The running batch's decode loop with its in-place KV cache (`lmforge.generate.cache`) against the same loop
on transformers' `DynamicCache`, which concatenates every layer's keys and values at each step.

R rows (prompts of ≈ 10 and ≈ 100 tokens, greedy, 1/8 to all of `--max-tokens` each, so that rows leave the batch
at eight different steps) decode together in one `RunningBatch` until all end;
tokens/s of each cache, the two taking turns `--repeats` times in one process; the ratio of the medians.
The rows' tokens must be identical on both.

    python benchmarks/kv_cache.py --size base --rows 8,32
    python benchmarks/kv_cache.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicLayer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import build_model  # noqa: E402

from lmforge.generate import Decoding, encode_prompt, open_generator  # noqa: E402
from lmforge.generate import running  # noqa: E402


class ConcatLayer(DynamicLayer):
    """transformers' DynamicLayer (a concatenation at every step) with the running batch's row operations done as
    the loop did them before the in-place cache: pad and concatenate, index and slice."""

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        width = max(self.keys.shape[2], keys.shape[2])
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, width - x.shape[2], 0))  # noqa: E731
        self.keys = torch.cat([pad(self.keys), pad(keys)])
        self.values = torch.cat([pad(self.values), pad(values)])

    def select_rows(self, index: torch.Tensor, first: int) -> None:
        self.keys, self.values = self.keys[index, :, first:], self.values[index, :, first:]


def concatenating(cache):
    for layer in cache.layers:
        layer.__class__ = ConcatLayer
    return cache


def decode(model, tok, prompts: list[str], max_tokens: int, in_place: bool) -> tuple[float, int, list]:
    """Seconds, generated tokens and the rows' tokens of one `run_rows` over `prompts`."""
    running.with_slack = slack if in_place else concatenating
    limits = [max(1, max_tokens * (1 + i % 8) // 8) for i in range(len(prompts))]  # rows leave at 8 different steps
    rows = [running.Row(encode_prompt(tok, model, p), Decoding(max_new_tokens=n, temperature=0), n)
            for p, n in zip(prompts, limits)]
    start = time.perf_counter()
    done = running.run_rows(running.RunningBatch(model, tok), rows)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for c in done), [c.token_ids for c in done]


slack = running.with_slack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["small", "base"], default="base")
    parser.add_argument("--rows", default="8,32", help="batch sizes, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tiny model, one repeat: a smoke test of the script")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = build_model(Path(tmp), args.quick, args.size)
        model, tok = open_generator(tmp)
        repeats = 1 if args.quick else args.repeats
        print(f"GPT-2 {args.size if not args.quick else 'quick'}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"parameters, {args.threads} thread(s), {args.max_tokens} tokens per row, {repeats} repeats")
        for n in (int(x) for x in args.rows.split(",")):
            batch = [("\n".join(prompts[i:i + 6]) if i % 2 else prompts[i]) for i in range(n)]  # ≈ 10 / ≈ 100 tokens
            decode(model, tok, batch[:2], 4, True)  # warm-up
            timings = {True: [], False: []}
            texts = {}
            for r in range(repeats):
                for in_place in ((True, False) if r % 2 == 0 else (False, True)):
                    seconds, made, got = decode(model, tok, batch, args.max_tokens, in_place)
                    timings[in_place].append(made / seconds)
                    texts.setdefault(in_place, got)
            same = texts[True] == texts[False]
            ours, plain = statistics.median(timings[True]), statistics.median(timings[False])
            print(f"{n:3d} rows: in place {ours:8.1f} tok/s   DynamicCache {plain:8.1f} tok/s   "
                  f"ratio {ours / plain:.2f}x   identical tokens: {same}")


if __name__ == "__main__":
    main()
