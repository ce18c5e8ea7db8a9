"""Atomic checkpoints with a fallback: ``last.pt`` is the newest, ``prev.pt`` the one before.

A write goes to a temporary file that is fsynced and renamed over ``last.pt`` in one step, so at
every instant ``last.pt`` is a complete state, the old or the new one: a kill in the middle of a save
(SIGKILL, a node lost) never leaves it half written or missing. Before that rename the old
``last.pt`` is hard-linked to ``prev.pt`` (also by an atomic rename). A ``last.pt`` corrupted some
other way (a truncated copy, a full disk) falls back to ``prev.pt`` with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

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


def save(directory: Path, state: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    tmp = directory / f".{LAST}.tmp-{pid}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    last = directory / LAST
    if last.exists():
        # prev.pt becomes the old state without last.pt ever going missing: link, then rename
        link = directory / f".{PREV}.tmp-{pid}"
        link.unlink(missing_ok=True)
        os.link(last, link)
        os.replace(link, directory / PREV)
    os.replace(tmp, last)
    _fsync_dir(directory)
    return last


def load(directory: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint in ``directory`` and its path, or None if there is none."""
    for name in (LAST, PREV):
        path = directory / name
        if not path.exists():
            continue
        try:
            return torch.load(path, map_location=map_location, weights_only=True), path
        except Exception as e:  # truncated or corrupt: fall back to the previous one
            warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}); falling back", stacklevel=2)
    return None
