"""Atomic checkpoints with a fallback: ``last.pt`` is the newest, ``prev.pt`` the one before.

A write goes to a temporary file that is renamed into place, so a crash never leaves a half
written ``last.pt``; a ``last.pt`` corrupted some other way (a truncated copy, a full disk) falls
back to ``prev.pt`` with a warning.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

LAST, PREV = "last.pt", "prev.pt"


def save(directory: Path, state: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{LAST}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    last = directory / LAST
    if last.exists():
        os.replace(last, directory / PREV)
    os.replace(tmp, last)
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
