"""Micro-batching (`lmforge serve --batching micro`; continuous batching, `lmforge.serve.scheduler`, is the
default): concurrent completion requests for one model run as one left-padded `generate` call.

One worker thread per model takes the first waiting request, then keeps collecting requests for at most
`max_wait_s` or until `max_batch` rows are gathered, and runs them together (it does not wait when no
other request is in flight on the server: none could join). Requests that arrive while a
batch runs wait in the queue and form the next batch. Rows may differ in prompt, temperature, top-p,
top-k, seed, stop strings and max tokens (all handled per row by `lmforge.generate`); requests that differ
in what one `generate` call shares (repetition penalty, logprobs) run as separate calls. A request
cancelled before its batch starts is skipped; one cancelled while it runs stops its rows at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

from lmforge.generate import Completion, Decoding, encode_prompt, generate
from lmforge.generate.mixtures import annotate_domains, domain_names
from lmforge.serve.metrics import Metrics


@dataclass
class Job:
    """One request: rows of (prompt, settings); resolved with one Completion per row, in order. A `listener`
    (streams, continuous batching only) hears (row, piece, None) as text is made, (row, "", Completion) when a
    row ends and (-1, None, error) when the job fails; it is called from the decoding thread."""
    rows: list[tuple[str, Decoding]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancel: threading.Event = field(default_factory=threading.Event)
    listener: Optional[Callable[[int, Optional[str], object], None]] = None
    results: list = field(default_factory=list)
    left: int = 0

    def __post_init__(self):
        self.results = [None] * len(self.rows)
        self.left = len(self.rows)

    def _settle(self, value: Optional[list] = None, error: Optional[BaseException] = None) -> None:
        def settle():
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(value)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the event loop has closed (server shutting down)
            pass

    def dropped(self) -> bool:
        """Nobody waits for the rows any more: cancelled, or failed."""
        return self.cancel.is_set() or self.left == 0

    def done_row(self, k: int, completion: Completion) -> None:
        self.results[k] = completion
        self.left -= 1
        if self.listener:
            self.listener(k, "", completion)
        if self.left == 0:
            self._settle(self.results)

    def fail(self, error: BaseException) -> None:
        if self.left > 0:
            self.left = 0
            self._settle(error=error)
            if self.listener:
                self.listener(-1, None, error)


class Batcher:
    def __init__(self, served, max_batch: int, max_wait_s: float, metrics: Metrics):
        self.served, self.max_batch, self.max_wait_s, self.metrics = served, max_batch, max_wait_s, metrics
        self.jobs: queue.Queue = queue.Queue()
        self.carry: deque = deque()   # a job that did not fit in the last batch goes first next time
        self.thread = threading.Thread(target=self._work, name=f"lmforge-batch-{served.name}", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def queued(self) -> int:
        return self.jobs.qsize()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def _next(self, timeout: Optional[float]):
        if self.carry:
            return self.carry.popleft()
        if timeout is None:
            return self.jobs.get()
        return self.jobs.get(timeout=timeout) if timeout > 0 else self.jobs.get_nowait()

    def _work(self) -> None:
        while True:
            job = self._next(None)
            if job is None:
                return
            pending, rows = [job], len(job.rows)
            deadline = time.monotonic() + self.max_wait_s
            while rows < self.max_batch:
                # no other request admitted anywhere on the server: none can join, so do not wait
                # (in_flight is written by the event loop; reading an int here is safe)
                alone = self.metrics.in_flight <= len(pending) and self.jobs.empty() and not self.carry
                try:
                    nxt = self._next(0.0 if alone else deadline - time.monotonic())
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)  # finish this batch, then stop
                    break
                if rows + len(nxt.rows) > self.max_batch:
                    self.carry.append(nxt)
                    break
                pending.append(nxt)
                rows += len(nxt.rows)
            try:
                self._run(pending)
            except Exception as err:  # never let the worker die: fail this batch's requests, keep serving
                for j in pending:
                    j.fail(err)

    def _run(self, jobs: list[Job]) -> None:
        live = [j for j in jobs if not j.cancel.is_set()]
        for j in jobs:
            if j.cancel.is_set():
                j.fail(asyncio.CancelledError())
        groups: dict[tuple, list[tuple[Job, int]]] = {}
        for j in live:
            for k, (_, settings) in enumerate(j.rows):
                groups.setdefault(settings.batch_key(), []).append((j, k))
        for items in groups.values():
            for start in range(0, len(items), self.max_batch):
                self._generate(items[start:start + self.max_batch])

    def _generate(self, items: list[tuple[Job, int]]) -> None:
        items = [(j, k) for j, k in items if j.left > 0]  # a failed job's other rows are not run
        if not items:
            return
        prompts = [j.rows[k][0] for j, k in items]
        settings = [j.rows[k][1] for j, k in items]
        try:
            completions = generate(self.served.model, self.served.tokenizer, prompts, settings,
                                   cancels=[(j.cancel,) for j, _ in items])
        except Exception as err:  # handed to the requests' handlers
            for j in {id(j): j for j, _ in items}.values():
                j.fail(err)
            return
        self.metrics.batch(len(items))
        if domain_names(self.served.model) is not None:  # an expert mixture: say which domains the text is from
            model, tokenizer = self.served.model, self.served.tokenizer
            completions = [annotate_domains(model, encode_prompt(tokenizer, model, p), c)
                           for p, c in zip(prompts, completions)]
        for (j, k), c in zip(items, completions):
            self.metrics.tokens(0, c.completion_tokens)
            j.done_row(k, c)
