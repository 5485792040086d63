"""Iteration-level ("continuous") batching: rows that decode one token per step together, each with its own
place in one KV cache, its own settings and its own end.

A row joins after its prompt is prefilled (rows that arrive together are prefilled as one left-padded batch)
and takes part from the next decode step on; a row that ends (EOS, its token limit, a stop string) or is
dropped (cancelled, past its deadline) leaves at once and its cache rows are freed, so no row waits for
another to finish. The cache is transformers' `DynamicCache` with layers that write each step in place
(`lmforge.generate.cache`): every layer holds [rows, heads, columns, dim] keys and values, rows
left-aligned with zero padding masked out; joining pads the shorter side on the left and concatenates,
leaving selects the remaining rows and drops columns no row uses any more.

Each row is chosen as `lmforge.generate` chooses it alone (repetition penalty over its own tokens, then
argmax or a draw from its own seeded generator after temperature → top-k → top-p), so a greedy or seeded
row gives the text it gives alone (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from lmforge.errors import LmforgeError
from lmforge.generate.cache import with_slack
from lmforge.generate.decode import Completion, Decoding, row_completion, special_token, steps_by_hand
from lmforge.generate.rows import row_generator, step_logprobs, warpers
from lmforge.generate.stream import PieceStreamer
from lmforge.generate.structured import Constraint, mask_rows


@dataclass(eq=False)
class Row:
    """One prompt to continue. `dropped()` is asked before every step (a client gone, a deadline passed)."""
    prompt_ids: list[int]
    settings: Decoding
    limit: int                                            # new tokens allowed
    emit: Optional[Callable[[str], None]] = None          # text pieces as they are made (streams)
    dropped: Callable[[], bool] = lambda: False
    tag: object = None                                    # the caller's handle (job, index)
    tokens: list[int] = field(default_factory=list)
    record: Optional[list] = None
    generator: Optional[torch.Generator] = None
    warp: object = None
    text: Optional[PieceStreamer] = None                  # tracks text for streams and stop strings
    constraint: Optional[Constraint] = None               # structured output
    position: int = 0                                     # position id of the next token fed
    domains: Optional[torch.Tensor] = None                # expert mixtures: the row's domain scores / weights (D,)
    prompt_domains: Optional[torch.Tensor] = None         # ... its posterior at the end of its prompt

    @property
    def reserved(self) -> int:
        """Cache columns this row may come to hold: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.limit


def continuous_batchable(model) -> bool:
    """Rows of this model can share a running batch: `steps_by_hand` holds and every layer of its cache is a
    plain `DynamicLayer` (no sliding window, which would cut columns this batch's alignment relies on)."""
    return steps_by_hand(model) and all(type(layer) is DynamicLayer
                                        for layer in DynamicCache(config=model.config).layers)


class RunningBatch:
    """The rows decoding together and their cache. Not thread-safe: one decode loop owns it."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.eos = special_token(tokenizer, model, "eos")
        pad = special_token(tokenizer, model, "pad")
        self.pad = pad if pad is not None else self.eos
        self.ends = {self.eos, self.pad} - {None}
        self.rows: list[Row] = []
        self.cache: Optional[DynamicCache] = None
        self.mask: Optional[torch.Tensor] = None     # [rows, columns]: 1 where the cache holds a real token
        self.last: Optional[torch.Tensor] = None     # [rows]: the token each row feeds at the next step
        self.state: Optional[torch.Tensor] = None    # [rows, ...]: what a subclass keeps per row (or None)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def reserved(self) -> int:
        return sum(r.reserved for r in self.rows)

    # ------------------------------------------------------------------ joining

    def join(self, rows: list[Row]) -> list[tuple[Row, Optional[Completion]]]:
        """Prefill `rows`, choose their first tokens and add those still going to the batch. Returns the rows
        that already ended (one-token limits, an immediate EOS). Rows are prefilled in groups of similar prompt
        length (shortest first), so that a long prompt does not pad many short ones to its length."""
        rows = sorted((r for r in rows if not r.dropped()), key=lambda r: len(r.prompt_ids))
        groups: list[list[Row]] = []
        for r in rows:
            if groups and len(r.prompt_ids) <= 2 * len(groups[-1][0].prompt_ids):
                groups[-1].append(r)
            else:
                groups.append([r])
        return [ended for group in groups for ended in self._prefill(group)]

    @torch.inference_mode()
    def _prefill(self, rows: list[Row]) -> list[tuple[Row, Optional[Completion]]]:
        device = self.model.device
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                            device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache, state = self._prefill_forward(ids, mask, positions)
        for r in rows:
            self._start(r)
        chosen = self._choose(rows, logits)
        state = self._chosen(rows, state, chosen)
        ended, keep = self._advance(rows, chosen)
        if keep:
            index = torch.tensor(keep, device=device)
            for c in _caches(cache):
                c.batch_select_indices(index)
            self._merge(cache, mask[index], chosen[index], None if state is None else state[index])
            self.rows += [rows[i] for i in keep]
        return ended

    # What a model family changes: its forwards and what it keeps per row (see `lmforge.generate.mixtures`).

    def _prefill_forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        """The prompts' forward: (next-token logits [rows, vocab], their cache, per-row state or None)."""
        out = self.model(input_ids=ids, attention_mask=None if bool(mask.all()) else mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], out.past_key_values, None

    def _step_forward(self, mask: Optional[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
        """One decode step's forward over the running rows (updates `self.cache`): logits [rows, vocab]."""
        out = self.model(input_ids=self.last[:, None], attention_mask=mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1, :]

    def _chosen(self, rows: list[Row], state: Optional[torch.Tensor], chosen: torch.Tensor):
        """The rows' state once their tokens are chosen (before any leaves)."""
        return state

    def _start(self, row: Row) -> None:
        s = row.settings
        row.position = len(row.prompt_ids)
        row.generator = row_generator(s, self.model.device)
        row.warp = warpers(s) if s.sampling else None
        row.record = [] if s.logprobs is not None else None
        if s.grammar:
            row.constraint = Constraint(s.grammar, self.tokenizer, self.model.get_output_embeddings().weight.shape[0])
        if row.emit is not None or s.stop:
            row.text = PieceStreamer(self.tokenizer, s, row.emit or (lambda piece: None), self.eos)

    def _merge(self, cache, mask: torch.Tensor, last: torch.Tensor, state: Optional[torch.Tensor]) -> None:
        """Add prefilled rows to the running ones, padding whichever side is shorter on the left."""
        if self.cache is None:
            for c in _caches(cache):
                with_slack(c)
            self.cache, self.mask, self.last, self.state = cache, mask, last, state
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(_layers(self.cache), _layers(cache)):
            old.add_rows(new.keys, new.values)
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.last = torch.cat([self.last, last])
        if state is not None:
            self.state = torch.cat([self.state, state])

    # ------------------------------------------------------------------ stepping

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, Optional[Completion]]]:
        """One decode step for every row (dropped rows leave first). Returns the rows that ended or were
        dropped, each with its Completion (None when dropped)."""
        gone = [i for i, r in enumerate(self.rows) if r.dropped()]
        result = [(self.rows[i], None) for i in gone]
        self._keep([i for i in range(len(self.rows)) if i not in set(gone)])
        if not self.rows:
            return result
        device = self.model.device
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        positions = torch.tensor([[r.position] for r in self.rows], device=device)
        mask = None if bool(self.mask.all()) else self.mask  # no padding: the causal mask alone is right
        logits = self._step_forward(mask, positions)
        for r in self.rows:
            r.position += 1
        self.last = self._choose(self.rows, logits)
        self.state = self._chosen(self.rows, self.state, self.last)
        ended, keep = self._advance(self.rows, self.last)
        self._keep(keep)
        return result + ended

    def _keep(self, keep: list[int]) -> None:
        """Only these rows stay; columns that no remaining row uses are dropped from the left."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.last = self.state = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.last = self.mask[index], self.last[index]
        if self.state is not None:
            self.state = self.state[index]
        first = int(self.mask.any(0).nonzero()[0])
        self.mask = self.mask[:, first:]
        for layer in _layers(self.cache):
            layer.select_rows(index, first)

    def _choose(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor:
        """Every row's next token, as `lmforge.generate` would choose it for that row alone."""
        scores = logits.to(dtype=torch.float32)
        for i, r in enumerate(rows):
            if r.settings.repetition_penalty != 1.0:
                scores[i] = _penalized(scores[i], r.prompt_ids + r.tokens, r.settings.repetition_penalty)
        constrained = [i for i, r in enumerate(rows) if r.constraint is not None]
        if constrained:
            mask_rows(scores, constrained, [rows[i].constraint for i in constrained])
        chosen = scores.argmax(-1)
        for i, r in enumerate(rows):
            if r.warp is not None:
                probs = r.warp(None, scores[i:i + 1]).softmax(-1)
                chosen[i] = torch.multinomial(probs, 1, generator=r.generator)[0, 0]
        asked = [i for i, r in enumerate(rows) if r.record is not None]
        if asked:
            index = torch.tensor(asked, device=scores.device)
            top = max(rows[i].settings.logprobs for i in asked)
            for i, entry in zip(asked, step_logprobs(scores[index], chosen[index], top)):
                rows[i].record.append(entry)
        for r, token in zip(rows, chosen.tolist()):
            if r.constraint is not None:
                r.constraint.consume(token)
        return chosen

    def _advance(self, rows: list[Row], chosen: torch.Tensor) -> tuple[list, list[int]]:
        """Give each row its token; returns (rows that ended, with their Completion) and the indices that go on."""
        ended, keep = [], []
        for i, (r, token) in enumerate(zip(rows, chosen.tolist())):
            completion = self._take(r, token)
            if completion is None:
                keep.append(i)
            else:
                ended.append((r, completion))
        return ended, keep

    def _take(self, row: Row, token: int) -> Optional[Completion]:
        """Give the row its next token; returns its Completion when that token ends it (EOS, its limit, a stop
        string), else None."""
        if token in self.ends:
            return self._finish(row, by_eos=token == self.eos)
        row.tokens.append(token)
        if row.text is not None:
            row.text.add(token)
        if len(row.tokens) >= row.limit or (row.text is not None and row.text.finished.is_set()):
            return self._finish(row, by_eos=False)
        return None

    def _finish(self, row: Row, by_eos: bool) -> Completion:
        if row.text is not None:
            row.text.add(self.eos) if by_eos else row.text.end()
        return row_completion(self.tokenizer, row.tokens, len(row.prompt_ids), row.settings, by_eos, row.record)


def _caches(cache) -> list:
    """A batch's cache: one DynamicCache, or one per model of a mixture (a list)."""
    return list(cache) if isinstance(cache, (list, tuple)) else [cache]


def _layers(cache) -> list:
    return [layer for c in _caches(cache) for layer in c.layers]


def _pad_left(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def _penalized(scores: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """HF's repetition penalty for one row: scores of tokens already seen are divided (or, when negative,
    multiplied) by `penalty`."""
    index = torch.tensor(seen, device=scores.device)
    picked = scores.gather(0, index)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(0, index, picked)


def run_rows(batch: RunningBatch, rows: list[Row]) -> list[Completion]:
    """Decode `rows` to their ends in `batch` (nothing else running); their completions, in order."""
    done = {id(r): c for r, c in batch.join(rows)}
    while len(batch):
        done.update((id(r), c) for r, c in batch.step())
    if any(done.get(id(r)) is None for r in rows):
        raise LmforgeError("generation was cancelled")
    return [done[id(r)] for r in rows]
