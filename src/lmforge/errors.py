"""One exception type for everything the user can fix (the CLI prints its message on one line and exits 2), and
the interruption a training run turns a stop signal into."""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Optional


class LmforgeError(Exception):
    """A problem with the user's input (recipe, data, checkpoint, paths), stated so they can fix it."""


class RunInterrupted(Exception):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint; the process should exit 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_is_an_error(folder, needed: Optional[int] = None):
    """Turn 'no space left on device' while writing into `folder` into one LmforgeError with the numbers."""
    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        folder = Path(folder)
        probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        free = shutil.disk_usage(probe).free
        need = f"about {needed / 2**20:,.1f} MB needed, " if needed else ""
        raise LmforgeError(f"{folder}: no space left on the device ({need}{free / 2**20:,.1f} MB free); "
                           "free some space and run again (with --resume to continue from the last checkpoint)") \
            from None
