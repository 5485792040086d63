"""Stop signals during training: SIGTERM (what clusters send before preemption) and SIGINT (Ctrl-C) ask the
loop to stop after the current step and save a checkpoint; a second signal stops the process at once."""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

from lmforge.engine.logging import console

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While active (a `with` block on the main thread), records the first stop signal instead of dying."""

    def __init__(self, announce: bool = True):
        self.received: Optional[int] = None
        self.announce = announce
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # the second signal: the default action, now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        if self.announce:
            console.print(f"[yellow]{signal.Signals(signum).name}: stopping after this step and saving a "
                          "checkpoint (send it again to stop at once)")

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
