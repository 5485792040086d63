"""Streaming: text pieces as `generate` makes tokens, never half a character or the start of a stop string."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Optional

from transformers.generation.streamers import BaseStreamer

from lmforge.errors import LmforgeError
from lmforge.generate.decode import Batch, Completion, Decoding, prepare, run_batch, special_token
from lmforge.generate.rows import cut_at_stop, held_back


class PieceStreamer(BaseStreamer):
    """Turns the tokens of one row into text pieces as generate makes them; holds back half characters and
    anything that could be the start of a stop string; on a stop string, emits the text before it and asks
    generation to stop."""

    def __init__(self, tokenizer, settings: Decoding, emit: Callable[[str], None], eos: Optional[int]):
        self.tokenizer, self.stops, self.emit, self.eos = tokenizer, settings.stop, emit, eos
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.finished = threading.Event()   # a stop string or EOS was reached

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        self.add(int(value.reshape(-1)[0]))

    def add(self, token: int) -> None:
        """One new token of the row (the prompt excluded)."""
        if self.finished.is_set():
            return
        if token == self.eos:
            self.finished.set()
            return self._flush(final=True)
        self.ids.append(token)
        self._flush(final=False)

    def end(self) -> None:
        if not self.finished.is_set():
            self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = cut_at_stop(text, self.stops)
        if cut < len(text):
            self.finished.set()
            text, final = text[:cut], True
        if not final:
            if text.endswith("\ufffd"):
                return
            text = text[:len(text) - held_back(text, self.stops)]
        if len(text) > self.sent:
            self.emit(text[self.sent:])
            self.sent = len(text)


def stream_generate(model, tokenizer, prompt: str, settings: Decoding, emit: Callable[[str], None],
                    *, cancel: Optional[threading.Event] = None, clamp: bool = False,
                    batch: Optional[Batch] = None) -> Completion:
    """Continue one prompt, calling `emit(piece)` with each new piece of text as it is produced (from the
    calling thread). Returns the whole completion; its text equals the pieces joined."""
    if settings.num_beams > 1:
        raise LmforgeError("stream: streaming needs num_beams 1 (beam search picks its text at the end)")
    model.eval()
    batch = batch or prepare(model, tokenizer, [prompt], [settings], clamp)
    streamer = PieceStreamer(tokenizer, settings, emit, special_token(tokenizer, model, "eos"))
    events = [streamer.finished] + ([cancel] if cancel is not None else [])
    completion = run_batch(model, tokenizer, batch, [events], streamer)[0]
    return completion


def stream(model, tokenizer, prompt: str, settings: Decoding = Decoding(), *, clamp: bool = False) -> Iterator[str]:
    """Pieces of text as they are generated (generation runs in a thread; closing the iterator stops it)."""
    batch = prepare(model, tokenizer, [prompt], [settings], clamp)  # errors surface before any thread starts
    pieces: queue.Queue = queue.Queue()
    cancel, failure = threading.Event(), []

    def work():
        try:
            stream_generate(model, tokenizer, prompt, settings, pieces.put, cancel=cancel, batch=batch)
        except BaseException as err:  # handed to the consumer
            failure.append(err)
        finally:
            pieces.put(None)

    thread = threading.Thread(target=work, name="lmforge-stream", daemon=True)
    thread.start()
    try:
        while (piece := pieces.get()) is not None:
            yield piece
        if failure:
            raise failure[0]
    finally:
        cancel.set()
        thread.join()
