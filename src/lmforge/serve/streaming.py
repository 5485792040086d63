"""Server-sent events. With continuous batching a streamed request's rows join the model's running batch
like any other and hand over their text pieces as they are made; with micro-batching each streamed row runs
`generate` in its own thread, so a long or slowly read stream never holds up a batch. Pieces reach the event
loop through a queue. When the client goes away (or the request times out) the rows are cancelled and stop
at their next token."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from lmforge.errors import LmforgeError
from lmforge.generate import encode_prompt, stream_generate
from lmforge.generate.mixtures import annotate_domains
from lmforge.serve.batching import Job
from lmforge.serve.errors import APIError
from lmforge.serve.metrics import Metrics
from lmforge.serve.scheduler import Scheduler


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def stream_rows(served, engine, rows, cancel: threading.Event, deadline: float,
                      metrics: Metrics) -> AsyncIterator:
    """Yields (row index, text piece, None) as text is produced and (row index, "", Completion) when a row ends."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def push(item) -> None:
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening any more
            cancel.set()

    if isinstance(engine, Scheduler):
        done = loop.create_future()  # the listener reports everything; the future is read only to quiet asyncio
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        engine.submit(Job(rows, loop, done, cancel=cancel, listener=lambda i, text, result: push((i, text, result))))
    else:
        _stream_in_threads(served, rows, cancel, metrics, push)
    left = len(rows)
    try:
        while left:
            try:
                first = await asyncio.wait_for(pieces.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise APIError(408, "the stream took longer than the server's timeout", type="timeout",
                               code="timeout") from None
            for i, text, result in _merged([first] + [pieces.get_nowait() for _ in range(pieces.qsize())]):
                if isinstance(result, BaseException):
                    raise result
                if result is not None:
                    left -= 1
                yield i, text, result
    finally:
        if left:
            cancel.set()
            metrics.cancel()


def _merged(items: list) -> list:
    """Consecutive text pieces of one row joined into one: when the event loop falls behind the decoder, it
    sends fewer, longer events instead of falling further behind."""
    out = []
    for item in items:
        i, text, result = item
        if out and result is None and text and out[-1][0] == i and out[-1][2] is None and out[-1][1]:
            out[-1] = (i, out[-1][1] + text, None)
        else:
            out.append(item)
    return out


def _stream_in_threads(served, rows, cancel: threading.Event, metrics: Metrics, push: Callable) -> None:
    def work(i: int, prompt: str, settings) -> None:
        try:
            completion = stream_generate(served.model, served.tokenizer, prompt, settings,
                                         lambda text: push((i, text, None)), cancel=cancel)
            completion = annotate_domains(served.model, encode_prompt(served.tokenizer, served.model, prompt),
                                          completion)
            metrics.tokens(0, completion.completion_tokens)
            push((i, "", completion))
        except BaseException as err:  # handed to the event loop
            push((i, None, err))

    for i, (prompt, settings) in enumerate(rows):
        threading.Thread(target=work, args=(i, prompt, settings), name=f"lmforge-stream-{served.name}",
                         daemon=True).start()


async def _guard(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An error after the stream has started becomes an `error` event (the OpenAI client raises it)."""
    try:
        async for event in events:
            yield event
    except (APIError, LmforgeError) as err:
        e = err if isinstance(err, APIError) else APIError(400, str(err))
        yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        yield "data: [DONE]\n\n"
    finally:
        await events.aclose()


class EventStream(StreamingResponse):
    """A text/event-stream response whose clean-up (cancel the rows, free the request's slot) always runs,
    whether the stream ends, fails, or the client disconnects before or during it."""

    def __init__(self, events: AsyncIterator[str], cleanup: Callable[[], object]):
        super().__init__(_guard(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.cleanup()
