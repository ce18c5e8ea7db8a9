"""One live process owns the run it trains.

The owner (host:pid) and its heartbeat are tags of the MLflow run, so every machine that shares the
tracking store sees them; on one machine a lock file in the checkpoint folder (released by the kernel
when the process dies, however it dies) guards as well, and a lock per run identity makes finding or
creating a run and claiming it one step. A second process on an owned run stops with a one-line
error naming the owner; a dead owner (its pid gone on this host) or one whose heartbeat is older
than GRACE_S is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import threading
import time
from pathlib import Path

from study import schema
from study.config import ConfigError

BEAT_S = 10.0  # how often a training process renews its heartbeat
GRACE_S = 60.0  # a heartbeat older than this is an expired owner


def me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _alive(owner: str) -> bool | None:
    """Whether an owner's process exists: known on this host, None (unknown) elsewhere."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    return pid_alive(int(pid))


def live_owner(run, now: float | None = None) -> str | None:
    """The owner of a RUNNING run that is alive and beating ("host:pid, heartbeat N s ago"), else None."""
    tags = run.data.tags
    owner = tags.get(schema.OWNER)
    if run.info.status != "RUNNING" or not owner or owner == me():
        return None
    age = (now or time.time()) - float(tags.get(schema.OWNER_HEARTBEAT, 0) or 0)
    if _alive(owner) is False or age > GRACE_S:
        return None
    return f"{owner}, heartbeat {age:.0f} s ago"


def stale_owner(run) -> str | None:
    """The previous owner of a RUNNING run that is being taken over (for the warning), if any."""
    owner = run.data.tags.get(schema.OWNER)
    return owner if run.info.status == "RUNNING" and owner and owner != me() else None


@contextlib.contextmanager
def file_lock(path: Path, what: str):
    """An exclusive lock on ``path`` for this block; a held lock raises OwnedError naming ``what``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise OwnedError(f"{what} is held by {holder} on this machine: wait for it, or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(me())
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


class OwnedError(ConfigError):
    """Another live process owns the run (the message names it and says what to do)."""


class LostOwnership(OwnedError):
    """The run was taken over while this process was silent (paused, cut off): another process owns it
    now, so this one stops without writing anything more to it."""


class Heartbeat:
    """Claims a run for this process (owner tag) and renews its heartbeat from a daemon thread until
    stopped; stopping clears the heartbeat so the run is free at once.

    The owner checks that it still is one: each beat and each :meth:`check` (before every epoch's
    checkpoint and metrics, and before the run's end is recorded) reads the owner tag from the store.
    A process paused past the grace (SIGSTOP, a VM frozen, a network cut) may have been taken over by
    another host meanwhile; it then stops beating, and :meth:`check` raises LostOwnership, so the two
    never both write the run's epochs."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id
        # for what may be missed (a beat, the last clear): a plain client, which never waits on a locked store
        self._plain = getattr(client, "impatient", client)
        self.lost_to: str | None = None  # the owner that took the run over, once noticed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="run-heartbeat")

    def start(self) -> Heartbeat:
        self.client.set_tag(self.run_id, schema.OWNER, me())
        self.client.set_tag(self.run_id, schema.OWNER_HEARTBEAT, f"{time.time():.0f}")
        self._thread.start()
        return self

    def _still_owned(self, client=None) -> bool:
        """Whether the store still names this process as the owner (once not, never again)."""
        if self.lost_to is None:
            owner = (client or self.client).get_run(self.run_id).data.tags.get(schema.OWNER)
            if owner != me():
                self.lost_to = owner or "nobody"
        return self.lost_to is None

    def _beat(self) -> None:
        while not self._stop.wait(BEAT_S):
            with contextlib.suppress(Exception):  # a missed beat is not worth killing training for
                if not self._still_owned(self._plain):
                    return  # never renew a heartbeat for another owner's run
                self._plain.set_tag(self.run_id, schema.OWNER_HEARTBEAT, f"{time.time():.0f}")

    def check(self) -> None:
        """Raise LostOwnership if the store no longer names this process as the run's owner."""
        if not self._still_owned():
            raise LostOwnership(f"run {self.run_id} was taken over by {self.lost_to} while this process "
                                f"({me()}) was silent past the {GRACE_S:.0f} s grace; stopping without writing to it")

    def stop(self, clear: bool = True) -> None:
        """Stop beating and clear the heartbeat (the run is free at once); ``clear=False`` when the store
        cannot take the write (locked): the run is then free once this pid is gone or the grace passes."""
        self._stop.set()
        self._thread.join(timeout=5)
        if clear and self.lost_to is None:  # a run taken over is the new owner's: its heartbeat is not ours
            with contextlib.suppress(Exception):
                self._plain.set_tag(self.run_id, schema.OWNER_HEARTBEAT, "0")
