"""Where a study lives, and what a restarted tuner finds there.

SQLite in the study folder by default; Optuna's journal file when several processes on one machine share the study
(SQLite would answer "database is locked"); any database URL Optuna accepts (PostgreSQL, MySQL) for many machines.
A trial whose process died (the tuner or the trial was killed) stays RUNNING in the storage: the next tuner marks
it failed and queues its values again, so no finished trial is lost and none runs twice.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Optional

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from lmforge.errors import LmforgeError

optuna.logging.set_verbosity(logging.WARNING)  # lmforge prints each trial's outcome itself

HOST = socket.gethostname()


def storage_url(url: Optional[str], study_dir: Path, workers: int) -> str:
    """The storage a study uses: the one given, else SQLite (one worker) or a journal file (several)."""
    if url:
        if workers > 1 and url.startswith("sqlite"):
            raise LmforgeError(f"--storage {url}: SQLite cannot take {workers} workers writing at once (\"database "
                               f"is locked\"); use --storage journal:{study_dir / 'journal.log'} on one machine, or "
                               f"a database server (postgresql://...) for many")
        return url
    if workers > 1:
        return f"journal:{study_dir / 'journal.log'}"
    return f"sqlite:///{study_dir / 'study.db'}"


def open_storage(url: str):
    """An Optuna storage for `url` ('journal:PATH' or a database URL), or one clear error."""
    try:
        if url.startswith("journal:"):
            path = Path(url.split(":", 1)[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            folder = Path(url[len("sqlite:///"):]).parent
            if not folder.is_dir():
                raise LmforgeError(f"--storage {url}: the folder {folder} does not exist")
        # SQLite waits for a lock instead of failing at once; a server database pings dead connections.
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
        return Uncached(RDBStorage(url, engine_kwargs=kwargs))
    except LmforgeError:
        raise
    except Exception as err:  # SQLAlchemy's errors for a bad URL, a missing driver or a server that refuses
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LmforgeError(f"--storage {url}: cannot open it: {reason}") from None


class Uncached:
    """A database storage read afresh on every call. Optuna's cache takes a trial this process asked for as its own
    and would never see the trial's process finish it."""

    def __init__(self, storage: RDBStorage):
        self._storage = storage

    def __getattr__(self, name):
        return getattr(self._storage, name)


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study: optuna.Study) -> list[int]:
    """Mark failed the RUNNING trials of this machine whose processes are gone, and queue their values again.
    Returns the numbers of the trials recovered."""
    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if attrs.get("host") != HOST:
            continue  # another machine's trial: its own tuner looks after it
        if _alive(attrs.get("pid")) or (not attrs.get("pid") and _alive(attrs.get("tuner_pid"))):
            continue
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        recovered.append(t.number)
    return recovered
