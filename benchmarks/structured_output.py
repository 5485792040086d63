"""What structured output costs: tokens/s of the continuous-batching decoder on the same prompts with and without
a JSON grammar (llguidance masks every row's next-token scores at every step). Bar (issue 25): the grammar
costs <= 15 % of unconstrained tokens/s.

    python benchmarks/structured_output.py                 # GPT-2 4x256 (random weights), 16 rows
    python benchmarks/structured_output.py --run runs/quickstart/clm --rows 32

Both sides sample (temperature 0.8, seeded) `--max-tokens` per row. The grammar is a JSON object with one
long string, so that no row completes its JSON and leaves the batch early: both sides decode as many rows at
every step, and the ratio is the grammar's cost per token. The sides alternate which goes first; the ratio is
the median of the rounds' paired ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import build_model  # noqa: E402  (the same model and prompts as the serving benchmark)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="a causal LM run / HF folder instead of building one")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lmforge.generate import Decoding, encode_prompt, open_generator
    from lmforge.generate.running import Row, RunningBatch, run_rows
    from lmforge.generate.structured import json_grammar
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            from lmforge.quickstart import stdlib_documents
            from serve_load import prompts_from
            folder, prompts = Path(args.run), prompts_from([t for _, t in stdlib_documents(200_000)])
        else:
            folder = Path(tmp) / "model"
            prompts = build_model(folder, quick=False)
        model, tok = open_generator(folder)
        # a JSON object whose one string must be long: no row completes its JSON (and leaves the batch) before
        # its token limit, so both sides decode the same number of rows at every step
        grammar = json_grammar({"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}},
                                "required": ["text"], "additionalProperties": False})

        def rate(constrained: bool) -> tuple[float, int]:
            rows = [Row(encode_prompt(tok, model, prompt), Decoding(
                max_new_tokens=args.max_tokens, temperature=0.8, seed=i,
                grammar=grammar if constrained else None), args.max_tokens) for i, prompt in
                enumerate(prompts[:args.rows])]
            t0 = time.perf_counter()
            made = sum(c.completion_tokens for c in run_rows(RunningBatch(model, tok), rows))
            return made / (time.perf_counter() - t0), made

        rate(True), rate(False)  # warm-up (llguidance's tokenizer view is built once)
        ratios, plain, json_rates, made = [], [], [], 0
        for r in range(args.repeats):
            first, second = (True, False) if r % 2 else (False, True)
            a, b = rate(first), rate(second)
            (with_json, made), without = (a, b) if first else (b, a)
            json_rates.append(with_json)
            plain.append(without[0])
            ratios.append(with_json / without[0])
    print(f"{args.rows} rows of {args.max_tokens} tokens ({made} generated with the grammar)")
    print(f"unconstrained: {statistics.median(plain):.1f} tok/s; JSON grammar: {statistics.median(json_rates):.1f} "
          f"tok/s; ratio {statistics.median(ratios):.3f}x (bar: >= 0.85x)")


if __name__ == "__main__":
    main()
