"""Speculative decoding: a small draft model (same tokenizer, e.g. a distilled student) proposes `k` tokens one
by one, and the target scores all of them in one forward; the longest run the target agrees with is kept,
plus one token of the target's own. Greedy rows give exactly the target's greedy tokens; sampling rows use
the standard acceptance rule (Leviathan et al. 2023, Chen et al. 2023: keep a drafted token x with
probability min(1, p(x) / q(x)), else draw from max(0, p - q) renormalised), so their text follows the
target's distribution. The rate of drafted tokens kept is what the speed-up depends on; it is counted.

`SpeculativeBatch` has `RunningBatch`'s interface (join / step), one row at a time, so the server's decode
loop runs it like any batch; `speculative_generate` continues one prompt with it.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.decode import (Completion, Decoding, context_limit, encode_prompt, prepare,
                                     refuse_option_on_onnx, steps_by_hand)
from lmforge.generate.running import Row, RunningBatch, run_rows

DRAFT_TOKENS = 4


def check_draft(target, target_tokenizer, draft, draft_tokenizer) -> None:
    """One clear error when `draft` cannot draft for `target`."""
    for name, model in (("the target", target), ("the draft", draft)):
        refuse_option_on_onnx(model, f"--draft (speculative decoding; {name})")
        if not steps_by_hand(model):
            raise LmforgeError(f"--draft: {name} ({type(model).__name__}) must be a transformers decoder-only model "
                               "with a KV cache")
    if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise LmforgeError("--draft: the draft's tokenizer differs from the target's; speculative decoding needs "
                           "the same tokens (e.g. a student distilled from the target)")
    sizes = [m.get_output_embeddings().weight.shape[0] for m in (target, draft)]
    if sizes[0] != sizes[1]:
        raise LmforgeError(f"--draft: the draft scores {sizes[1]} tokens, the target {sizes[0]}")
    counts = [sum(p.numel() for p in m.parameters()) for m in (target, draft)]
    if counts[1] >= counts[0]:
        raise LmforgeError(f"--draft: the draft ({counts[1]:,} parameters) is not smaller than the target "
                           f"({counts[0]:,}); it would only slow decoding down")
    limits = [context_limit(m) for m in (target, draft)]
    if limits[1] is not None and (limits[0] is None or limits[1] < limits[0]):
        raise LmforgeError(f"--draft: the draft takes {limits[1]} positions, fewer than the target's {limits[0]}")


class SpeculativeBatch(RunningBatch):
    """One row at a time, `k` drafted tokens per step. Counts drafted and kept tokens (`proposed`, `accepted`)."""

    def __init__(self, model, tokenizer, draft, k: int = DRAFT_TOKENS):
        super().__init__(model, tokenizer)
        self.draft, self.k = draft, k
        self.proposed = self.accepted = 0
        self.seq: list[int] = []          # the row's prompt and tokens so far
        self.caches: list = [None, None]  # the target's and the draft's
        self.fed: list[list[int]] = [[], []]  # the tokens each cache holds

    def join(self, rows: list[Row]) -> list:
        if len(rows) + len(self.rows) > 1:
            raise ValueError("speculative decoding takes one row at a time")
        for row in rows:
            s = row.settings
            if s.repetition_penalty != 1.0 or s.logprobs is not None or s.num_beams > 1 or s.grammar:
                raise LmforgeError("--draft: repetition_penalty, logprobs, beam search and structured output are "
                                   "not available with speculative decoding")
            self._start(row)
            self.rows, self.seq, self.caches, self.fed = [row], list(row.prompt_ids), [None, None], [[], []]
        return []

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, Optional[Completion]]]:
        row = self.rows[0]
        if row.dropped():
            self.rows = []
            return [(row, None)]
        k = max(0, min(self.k, row.limit - len(row.tokens) - 1))  # never past the row's limit (nor the context)
        drafted, q = self._propose(row, k)
        p = self._forward(0, self.seq + drafted, k + 1)
        kept, token = self._verify(row, p, q, drafted)
        self.proposed, self.accepted = self.proposed + k, self.accepted + kept
        done = None
        for t in drafted[:kept] + [token]:
            self.seq.append(t)
            done = self._take(row, t)
            if done is not None:
                self.rows, self.caches = [], [None, None]
                return [(row, done)]
        self._crop(0)
        self._crop(1)
        return []

    def _forward(self, which: int, seq: list[int], keep: int) -> torch.Tensor:
        """Feed the model the part of `seq` its cache lacks; its scores for the last `keep` positions."""
        model = (self.model, self.draft)[which]
        ids = torch.tensor([seq[len(self.fed[which]):]], device=model.device)
        out = model(input_ids=ids, past_key_values=self.caches[which], use_cache=True, logits_to_keep=keep)
        self.caches[which], self.fed[which] = out.past_key_values, list(seq)
        return out.logits[0].to(dtype=torch.float32)

    def _propose(self, row: Row, k: int) -> tuple[list[int], list[Optional[torch.Tensor]]]:
        drafted, q = [], []
        for _ in range(k):
            scores = self._forward(1, self.seq + drafted, 1)
            probs = self._probs(row, scores)
            q.append(probs)
            drafted.append(int(scores[-1].argmax()) if probs is None
                           else int(torch.multinomial(probs[-1], 1, generator=row.generator)))
        return drafted, q

    def _probs(self, row: Row, scores: torch.Tensor) -> Optional[torch.Tensor]:
        return None if row.warp is None else row.warp(None, scores).softmax(-1)

    def _verify(self, row: Row, scores: torch.Tensor, q: list, drafted: list[int]) -> tuple[int, int]:
        """How many drafted tokens the target keeps, and the token it adds after them."""
        p = self._probs(row, scores)
        for i, x in enumerate(drafted):
            if p is None:
                if int(scores[i].argmax()) != x:
                    return i, int(scores[i].argmax())
                continue
            ratio = float(p[i, x] / q[i][-1, x])
            if float(torch.rand(1, generator=row.generator)) >= min(1.0, ratio):
                residual = (p[i] - q[i][-1]).clamp(min=0)
                residual = residual if float(residual.sum()) > 0 else p[i]
                return i, int(torch.multinomial(residual / residual.sum(), 1, generator=row.generator))
        last = len(drafted)
        token = int(scores[last].argmax()) if p is None else int(torch.multinomial(p[last], 1,
                                                                                   generator=row.generator))
        return last, token

    def _crop(self, which: int) -> None:
        """Keep what the cache holds of the row's sequence as it now is (drafted tokens the target did not keep
        go), short of its last token, which the next step feeds."""
        fed, cache = self.fed[which], self.caches[which]
        keep, most = 0, min(len(fed), len(self.seq) - 1)
        while keep < most and fed[keep] == self.seq[keep]:
            keep += 1
        if cache is not None and len(fed) > keep:
            cache.crop(keep - len(fed))
            self.fed[which] = fed[:keep]


def speculative_generate(model, tokenizer, draft, prompt: str, settings: Decoding, *, k: int = DRAFT_TOKENS,
                         emit: Optional[Callable[[str], None]] = None, cancel: Optional[threading.Event] = None,
                         clamp: bool = False) -> tuple[Completion, float]:
    """Continue one prompt with speculative decoding (`emit` gets text pieces as they are made); returns the
    completion and the rate of drafted tokens the target kept."""
    model.eval()
    draft.eval()
    limit = prepare(model, tokenizer, [prompt], [settings], clamp).limits[0]
    batch = SpeculativeBatch(model, tokenizer, draft, k)
    row = Row(encode_prompt(tokenizer, model, prompt), settings, limit, emit=emit,
              dropped=cancel.is_set if cancel is not None else (lambda: False))
    completion = run_rows(batch, [row])[0]
    return completion, batch.accepted / max(1, batch.proposed)
