"""Continuous batching: one decode loop per model, scheduling at the level of decode steps.

The loop keeps a running batch (`lmforge.generate.running.RunningBatch`). Before every step it admits
waiting rows, in arrival order, while the batch has fewer than `max_batch` rows and their cache
reservation (prompt + max tokens) fits in `max_cache_tokens`; they are prefilled together and decode from
that step on. A row that ends answers its request at once (a stream gets its text piece by piece as it is
made); a row whose request was cancelled (client gone, timeout) leaves at the next step and frees its slot.
Streaming and non-streaming requests share the batch. With a draft model the loop runs speculative decoding
(`lmforge.generate.speculative`), one row at a time. An expert mixture (BTM ensemble, DEMix) runs its own batch
(`lmforge.generate.mixtures`): each row keeps its domain posterior, and its completion says which domains it
chose; a model whose rows' numbers depend on their batch (int8-dynamic) decodes one row at a time.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Optional

from lmforge.generate import encode_prompt
from lmforge.generate.mixtures import batch_invariant, running_batch
from lmforge.generate.running import Row, RunningBatch
from lmforge.generate.speculative import SpeculativeBatch
from lmforge.serve.batching import Job
from lmforge.serve.metrics import Metrics


class Scheduler:
    def __init__(self, served, max_batch: int, max_cache_tokens: int, metrics: Metrics):
        self.served, self.max_cache_tokens, self.metrics = served, max_cache_tokens, metrics
        # speculative decoding, and models whose rows' numbers depend on their batch (int8-dynamic): one row at a time
        self.max_batch = 1 if served.draft is not None or not batch_invariant(served.model) else max_batch
        self.waiting: deque[Row] = deque()
        self.wake = threading.Condition()
        self.closed = False
        self.batch = self._new_batch()
        self.thread = threading.Thread(target=self._work, name=f"lmforge-decode-{served.name}", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue the job's rows; with `job.listener`, each row's text pieces are handed over as they are made."""
        model, tokenizer = self.served.model, self.served.tokenizer
        rows = []
        for k, (prompt, settings) in enumerate(job.rows):
            emit = (lambda piece, k=k: job.listener(k, piece, None)) if job.listener else None
            rows.append(Row(encode_prompt(tokenizer, model, prompt), settings, settings.max_new_tokens, emit=emit,
                            dropped=job.dropped, tag=(job, k)))
        with self.wake:
            self.waiting.extend(rows)
            self.wake.notify()

    def queued(self) -> int:
        return len(self.waiting)

    def _new_batch(self) -> RunningBatch:
        if self.served.draft is not None:
            return SpeculativeBatch(self.served.model, self.served.tokenizer, self.served.draft)
        return running_batch(self.served.model, self.served.tokenizer)

    def acceptance_rate(self) -> Optional[float]:
        """Speculative decoding: the share of drafted tokens the target kept (None without a draft)."""
        if not isinstance(self.batch, SpeculativeBatch):
            return None
        return round(self.batch.accepted / max(1, self.batch.proposed), 4)

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        self.thread.join(timeout=30)

    def _admit(self) -> list[Row]:
        """Waiting rows that fit now, oldest first (a row that does not fit holds back those behind it, so
        long prompts are not starved by short ones); rows of cancelled requests are dropped here."""
        rows, slots, room = [], self.max_batch - len(self.batch), self.max_cache_tokens - self.batch.reserved
        while self.waiting and len(rows) < slots:
            row = self.waiting[0]
            if row.dropped():
                self.waiting.popleft()
                continue
            if row.reserved > room and (rows or len(self.batch)):
                break
            rows.append(self.waiting.popleft())
            room -= row.reserved
        return rows

    def _work(self) -> None:
        while True:
            with self.wake:
                while not self.closed and not self.waiting and not len(self.batch):
                    self.wake.wait()
                if self.closed:
                    return
                joining = self._admit()
            try:
                if joining:
                    self._report(self.batch.join(joining))
                if len(self.batch):
                    rows = len(self.batch)
                    self._report(self.batch.step())
                    self.metrics.batch(rows)
            except Exception as err:  # never let the loop die: fail the rows at work, keep serving
                self._fail(joining + self.batch.rows, err)
                self.batch = self._new_batch()

    def _report(self, ended) -> None:
        for row, completion in ended:
            self.metrics.tokens(0, len(row.tokens) if completion is None else completion.completion_tokens)
            if completion is not None:  # (a dropped row's request has already been answered)
                job, k = row.tag
                job.done_row(k, completion)

    @staticmethod
    def _fail(rows: list[Row], err: BaseException) -> None:
        for job in {id(r.tag[0]): r.tag[0] for r in rows}.values():
            job.fail(err)


__all__ = ["Scheduler"]

