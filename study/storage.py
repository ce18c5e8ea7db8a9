"""A busy store or a full disk is a fault to wait out or to stop on, never a crash.

- **A locked SQLite store** (another process in a long transaction, a backup, an open ``sqlite3``
  shell): MLflow sets SQLite's busy timeout to 20 s per statement and then raises "database is
  locked" (logging a traceback). study.store retries each MLflow call (:func:`patiently`) until
  :data:`STORE_WAIT_S` seconds have passed, saying once that it waits and once when the store answers.
- **A full disk** (a checkpoint, an artifact, or SQLite's "database or disk is full") is not waited out.

Either ends in :class:`StorageFault`: one line, exit 2, and the run left so that the same command
resumes it (its last checkpoint is whole; see study/run/loop.py for what is recorded).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from study.config import ConfigError

# how long one MLflow call may wait for a locked store in all (MLflow's own busy timeout, 20 s per
# statement, included); REALNVP_STORE_WAIT_S changes it (the tests make it short)
STORE_WAIT_S = float(os.environ.get("REALNVP_STORE_WAIT_S", "120"))
RETRY_PAUSE_S = 1.0
LOCKED = ("database is locked", "database table is locked")
FULL = ("database or disk is full", "no space left on device", "disk quota exceeded")


class StorageFault(ConfigError):
    """The store stayed locked past the wait, or a disk is full: the run stops, resumable.
    ``locked`` says which (a locked store cannot take any more writes either)."""

    def __init__(self, message: str, locked: bool):
        super().__init__(message)
        self.locked = locked


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it: torch.save wraps the OSError in a RuntimeError) is a full disk."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e).lower() for text in FULL):
            return True
    return False


def locked(exc: BaseException) -> bool:
    return any(any(text in str(e).lower() for text in LOCKED) for e in _chain(exc))


def full_disk_fault(what: str, exc: BaseException) -> StorageFault:
    return StorageFault(f"{what}: the disk is full ({_short(exc)}); free space, then run the same command again "
                        "to resume from the last checkpoint", locked=False)  # fmt: skip


def _short(exc: BaseException) -> str:
    """What refused the write, in a few words: the OSError's, or SQLite's own phrase."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{e.strerror}{': ' + str(e.filename) if e.filename else ''}"
    text = " ".join(str(e).lower() for e in _chain(exc))
    return next((phrase for phrase in FULL if phrase in text), "no space left")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def patiently(call: Callable[[], Any], what: str, wait_s: float | None = None, say: Callable[[str], None] = _say):
    """``call()``, retried while the store is locked until ``wait_s`` (default STORE_WAIT_S) have passed.
    A full disk, or a lock that outlasts the wait, raises StorageFault; any other error passes through."""
    wait_s = STORE_WAIT_S if wait_s is None else wait_s
    start, waiting = time.monotonic(), False
    while True:
        try:
            result = call()
        except Exception as e:  # noqa: BLE001 - sorted below; anything else is re-raised as it is
            if disk_full(e):
                raise full_disk_fault(what, e) from None
            if not locked(e):
                raise
            waited = time.monotonic() - start
            if waited >= wait_s:
                why = (f"{what}: the tracking store is still locked by another process after {waited:.0f} s; nothing "
                       "more was written: run the same command again once the lock is released, and it resumes where "
                       "it stopped (REALNVP_STORE_WAIT_S sets the wait)")  # fmt: skip
                raise StorageFault(why, locked=True) from None
            if not waiting:
                say(f"store busy ({what}: database is locked): waiting up to {wait_s:.0f} s for it")
                waiting = True
            time.sleep(RETRY_PAUSE_S)
            continue
        if waiting:
            say(f"store answered after {time.monotonic() - start:.0f} s ({what})")
        return result


class _QuietLockTracebacks(logging.Filter):
    """MLflow logs a full traceback for every locked or full-disk statement before raising it; the
    one-line waits and faults above say it instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        text = record.getMessage().lower()
        return not ((exc is not None and (locked(exc) or disk_full(exc))) or any(t in text for t in LOCKED + FULL))


logging.getLogger("mlflow.store.db.utils").addFilter(_QuietLockTracebacks())


@contextlib.contextmanager
def best_effort():
    """For a last record after a fault (one try, no wait): whatever fails is let go."""
    try:
        yield
    except Exception:  # noqa: BLE001 - the fault itself is what the user is told about
        pass
