"""What `generate` does per row here: choose the next token with the row's own sampling settings and
generator, and end the row at its own token limit, stop string or cancellation."""

from __future__ import annotations

import secrets
import threading
from typing import Optional, Sequence

import torch
from transformers import (LogitsProcessor, LogitsProcessorList, StoppingCriteria, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)


def warpers(settings) -> LogitsProcessorList:
    """HF's temperature → top-k → top-p warpers for one row's settings (only those that change anything)."""
    warp = LogitsProcessorList()
    if settings.temperature != 1.0:
        warp.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k:
        warp.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p is not None and settings.top_p < 1.0:
        warp.append(TopPLogitsWarper(settings.top_p))
    return warp


def row_generator(settings, device: torch.device) -> Optional[torch.Generator]:
    """A sampling row's own generator, seeded with its seed (a fresh random one without); None when greedy."""
    if not settings.sampling:
        return None
    seed = settings.seed if settings.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


class RowSelector(LogitsProcessor):
    """Chooses every row's next token itself (argmax for greedy rows, a draw from the row's own generator
    for sampling rows, after HF's temperature/top-k/top-p warpers) and returns a one-hot score, so
    generate's greedy step keeps that choice. Runs last, after generate's own processors."""

    def __init__(self, settings: list, device: torch.device):
        # rows with the same temperature / top-k / top-p are warped together; each draws with its own generator
        groups: dict[tuple, list[int]] = {}
        self.generators: list[Optional[torch.Generator]] = []
        for i, s in enumerate(settings):
            if s.sampling:
                groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
            self.generators.append(row_generator(s, device))
        self.groups = [(warpers(settings[rows[0]]), rows, torch.tensor(rows, device=device))
                       for rows in groups.values()]
        self.top = max((s.logprobs for s in settings if s.logprobs is not None), default=None)
        self.record: list[list] = [[] for _ in settings]   # per row, per step: (logprob, top ids, top logprobs)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(self.groups) == 1 and len(self.groups[0][1]) == 1 == scores.shape[0]:
            # one sampling row (the common single-request case): no greedy pick, no row gathering
            probs = self.groups[0][0](input_ids, scores).softmax(-1)
            chosen = torch.multinomial(probs, 1, generator=self.generators[0])[:, 0]
        else:
            chosen = scores.argmax(-1)
            for warp, rows, index in self.groups:
                probs = warp(input_ids[index], scores[index]).softmax(-1)
                for k, i in enumerate(rows):
                    chosen[i] = torch.multinomial(probs[k:k + 1], 1, generator=self.generators[i])[0, 0]
        if self.top is not None:
            for i, entry in enumerate(step_logprobs(scores, chosen, self.top)):
                self.record[i].append(entry)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out


def step_logprobs(scores: torch.Tensor, chosen: torch.Tensor, top: int) -> list[tuple]:
    """Per row: (log-probability of the chosen token, ids of the `top` likeliest tokens, their log-probabilities)."""
    logp = scores.float().log_softmax(-1)
    picked = logp.gather(1, chosen[:, None])[:, 0].tolist()
    alt = logp.topk(top, -1) if top else None
    return [(picked[i], alt.indices[i].tolist() if alt else [], alt.values[i].tolist() if alt else [])
            for i in range(scores.shape[0])]


class RowStop(StoppingCriteria):
    """Ends a row at its own token limit, when its text contains one of its stop strings, or when cancelled.
    With beam search, generate passes several hypotheses per row; they map to rows in order."""

    def __init__(self, tokenizer, width: int, limits: list[int], stops: list[tuple[str, ...]],
                 cancels: Sequence[Sequence[threading.Event]]):
        self.tokenizer, self.width, self.limits, self.stops = tokenizer, width, limits, stops
        # A stop string ends within the last few tokens: a character takes at most 4 byte-level tokens.
        self.window = [4 * max(map(len, s)) + 4 if s else 0 for s in self.stops]
        self.cancels = cancels

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        rows = len(self.limits)
        group = max(1, input_ids.shape[0] // rows)
        made = input_ids.shape[1] - self.width
        done = [False] * input_ids.shape[0]
        tails = None
        for r in range(rows):
            stop_row = made >= self.limits[r] or any(e.is_set() for e in self.cancels[r])
            for i in range(r * group, (r + 1) * group):
                done[i] = stop_row
                if not stop_row and self.stops[r]:
                    if tails is None:
                        tails = input_ids[:, -min(made, max(self.window)):].tolist() if made else [[]] * len(done)
                    text = self.tokenizer.decode(tails[i][-self.window[r]:], skip_special_tokens=True)
                    done[i] = any(s in text for s in self.stops[r])
        return torch.tensor(done, device=input_ids.device)


def cut_at_stop(text: str, stops: Sequence[str]) -> int:
    """Index where the first stop string starts (len(text) when there is none)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else len(text)


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
