"""Speculative decoding vs the target alone: single-request greedy tokens/s, identical text, acceptance rate.
Bar (issue 25): >= 1.4x the target's tokens/s where the draft's acceptance rate allows.

    python benchmarks/speculative.py                                   # GPT-2 12x768 (random), its first layer
    python benchmarks/speculative.py --run runs/clm --draft runs/clm-student

Without `--run`, the target is a GPT-2 of base size (12 layers, 768 wide) with random weights and a BPE
tokenizer trained on the Python standard library, and the draft is the target's first `--draft-layers`
layers with its embeddings and head (a truncated copy, not a distilled student: with random weights the
residual stream is mostly the token's embedding, so the two agree more often than a trained pair would).
The sides alternate which goes first; the ratio is the median of the rounds' paired ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import prompts_from  # noqa: E402


def build_pair(folder: Path, draft_layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel
    from lmforge.quickstart import stdlib_documents
    from lmforge.recipe import TokenizerConfig
    from lmforge.tokenizer import save_tokenizer, train_tokenizer
    docs = [text for _, text in stdlib_documents(300_000)]
    tok = train_tokenizer(iter(docs), TokenizerConfig(kind="bpe", vocab_size=4000))
    save_tokenizer(tok, folder)
    torch.manual_seed(0)
    target = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=1024, n_layer=12, n_embd=768, n_head=12,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id)).eval()
    config = copy.deepcopy(target.config)
    config.n_layer = draft_layers
    draft = GPT2LMHeadModel(config).eval()
    draft.load_state_dict({k: v for k, v in target.state_dict().items()
                           if not k.startswith("transformer.h.") or int(k.split(".")[2]) < draft_layers})
    return target, draft, tok, prompts_from(docs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", help="the target: a causal LM run / HF folder")
    p.add_argument("--draft", help="the draft (with --run)")
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--k", type=int, default=4, help="tokens drafted per step")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from lmforge.generate import Decoding, generate, open_generator
    from lmforge.generate.speculative import check_draft, speculative_generate
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            from lmforge.quickstart import stdlib_documents
            target, tok = open_generator(Path(args.run))
            draft, draft_tok = open_generator(Path(args.draft))
            check_draft(target, tok, draft, draft_tok)
            prompts = prompts_from([t for _, t in stdlib_documents(200_000)])
        else:
            target, draft, tok, prompts = build_pair(Path(tmp), args.draft_layers)
    settings = Decoding(max_new_tokens=args.max_tokens, temperature=0)
    prompt = prompts[0]

    def alone():
        t0 = time.perf_counter()
        c = generate(target, tok, [prompt], settings)[0]
        return c, None, time.perf_counter() - t0

    def speculative():
        t0 = time.perf_counter()
        c, rate = speculative_generate(target, tok, draft, prompt, settings, k=args.k)
        return c, rate, time.perf_counter() - t0

    alone(), speculative()  # warm-up
    ratios, plain, fast = [], [], []
    for r in range(args.repeats):
        first, second = (alone, speculative) if r % 2 else (speculative, alone)
        a, b = first(), second()
        (base, _, t_base), (spec, rate, t_spec) = (a, b) if first is alone else (b, a)
        assert spec.token_ids == base.token_ids, "speculative greedy output differs from the target's"
        plain.append(base.completion_tokens / t_base)
        fast.append(spec.completion_tokens / t_spec)
        ratios.append(fast[-1] / plain[-1])
    print(f"target {sum(p.numel() for p in target.parameters()) / 1e6:.1f}M parameters, draft "
          f"{sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M; {base.completion_tokens} greedy tokens, "
          f"identical text; acceptance rate {rate:.1%} (k={args.k})")
    print(f"target alone: {statistics.median(plain):.1f} tok/s; speculative: {statistics.median(fast):.1f} tok/s; "
          f"ratio {statistics.median(ratios):.2f}x (bar: >= 1.4x)")


if __name__ == "__main__":
    main()
