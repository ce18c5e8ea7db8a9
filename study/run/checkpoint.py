"""Atomic checkpoints with a fallback: ``last.pt`` is the newest, ``prev.pt`` the one before.

A write goes to a temporary file that is fsynced and renamed over ``last.pt`` in one step, so at
every instant ``last.pt`` is a complete state, the old or the new one: a kill in the middle of a save
(SIGKILL, a node lost) never leaves it half written or missing. Before that rename the old
``last.pt`` is hard-linked to ``prev.pt`` (also by an atomic rename). A ``last.pt`` corrupted some
other way (a truncated copy, a full disk, flipped bytes) falls back to ``prev.pt`` with a warning.

Integrity: torch.save writes a zip archive with a CRC-32 of every record, but torch.load never checks
them (64 flipped bytes in a tensor load silently as other weights, and the run then "diverges"). So a
checkpoint is verified against its own CRCs (:func:`problem`) before it is loaded, and once right after
it is written, before it replaces the previous one.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from study.run.ownership import pid_alive
from study.storage import disk_full, full_disk_fault

LAST, PREV = "last.pt", "prev.pt"


def _fsync_dir(directory: Path) -> None:
    """Make the renames themselves durable (POSIX: a rename is recorded in the folder's entry)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (not a complete archive, or a record whose bytes
    disagree with the CRC-32 written with it), or None when it is intact."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"not a complete checkpoint ({type(e).__name__})"
    return f"record {bad} fails its CRC-32 check" if bad is not None else None


def save(directory: Path, state: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp, link, last = directory / f".{LAST}.tmp-{pid}", directory / f".{PREV}.tmp-{pid}", directory / LAST
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        bad = problem(tmp)
        if bad is not None:  # never let a bad write replace a good checkpoint
            raise OSError(f"checkpoint written to {tmp} does not read back: {bad}")
        if last.exists():
            # prev.pt becomes the old state without last.pt ever going missing: link, then rename
            link.unlink(missing_ok=True)
            os.link(last, link)
            os.replace(link, directory / PREV)
        os.replace(tmp, last)
    except BaseException as e:  # a full disk, a signal: no temporary file stays, last.pt is the old state
        tmp.unlink(missing_ok=True)
        link.unlink(missing_ok=True)
        if isinstance(e, Exception) and disk_full(e):  # torch.save wraps ENOSPC in a RuntimeError
            raise full_disk_fault(f"checkpoint {last}", e) from None
        raise
    _fsync_dir(directory)
    return last


def remove_stale_temporaries(directory: Path) -> list[str]:
    """Remove the temporary files of writers that died mid-save (SIGKILL, a lost node): named
    ``.NAME.tmp-PID`` with PID no longer a process on this machine. Returns their names."""
    removed = []
    for path in directory.glob(".*.tmp-*") if directory.is_dir() else ():
        pid = path.name.rpartition("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue  # not ours to judge, or a save in progress
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def load(directory: Path, map_location: str | torch.device = "cpu",
         rejected: list[str] | None = None) -> tuple[dict[str, Any], Path] | None:  # fmt: skip
    """The newest intact checkpoint in ``directory`` and its path, or None if there is none. Each one
    passed over is warned about and, with ``rejected``, appended to it as "NAME: why". Temporary files
    left by dead writers are removed first."""
    remove_stale_temporaries(directory)
    for name in (LAST, PREV):
        path = directory / name
        if not path.exists():
            continue
        why = problem(path)
        if why is None:
            try:
                return torch.load(path, map_location=map_location, weights_only=True), path
            except Exception as e:  # intact bytes that still do not load (another format)
                why = f"unreadable ({type(e).__name__})"
        if rejected is not None:
            rejected.append(f"{name}: {why}")
        warnings.warn(f"checkpoint {path} is unreadable or corrupt ({why}); falling back", stacklevel=2)
    return None
