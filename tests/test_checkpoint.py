"""Checkpoints: atomic under SIGKILL at any moment, and a fallback when last.pt is damaged."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from study.run import checkpoint
from study.storage import StorageFault
from tests.conftest import ROOT, flip_middle

# A writer that saves large states back to back (epoch k holds a tensor full of k), so a kill at a
# random moment lands inside a save most of the time. ~16 MB per state: a write takes tens of ms.
WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from study.run import checkpoint

    folder = Path(sys.argv[1])
    found = checkpoint.load(folder)
    epoch = found[0]["epoch"] + 1 if found else 1
    print("ready", flush=True)
    while True:
        checkpoint.save(folder, {"epoch": epoch, "w": torch.full((4_000_000,), float(epoch))})
        epoch += 1
    """
)


def _consistent(path: Path) -> int:
    """Load ``path`` exactly as written (no fallback) and return its epoch; fails if torn."""
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["w"], torch.full((4_000_000,), float(state["epoch"]))), path
    return state["epoch"]


@pytest.mark.slow(25)
def test_sigkill_during_save_always_leaves_a_complete_last_checkpoint(tmp_path):
    rng = random.Random(7)
    folder = tmp_path / "ckpt"
    last_epoch = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if last_epoch == 0 and not (folder / checkpoint.LAST).exists():
            continue  # killed before its first save finished: nothing was promised yet
        epoch = _consistent(folder / checkpoint.LAST)
        assert epoch >= last_epoch  # never goes back
        if (folder / checkpoint.PREV).exists():
            assert _consistent(folder / checkpoint.PREV) in (epoch - 1, epoch)
        last_epoch = epoch
    assert last_epoch >= 6  # the writer made progress: the kills landed across many saves
    leftovers = [p.name for p in folder.iterdir() if p.name not in (checkpoint.LAST, checkpoint.PREV)]
    assert all(name.startswith(".") for name in leftovers)  # only temp files of killed writers


def test_save_keeps_the_previous_state_and_replaces_the_newest(tmp_path):
    checkpoint.save(tmp_path, {"epoch": 1})
    assert not (tmp_path / checkpoint.PREV).exists()
    checkpoint.save(tmp_path, {"epoch": 2})
    checkpoint.save(tmp_path, {"epoch": 3})
    assert torch.load(tmp_path / checkpoint.LAST)["epoch"] == 3
    assert torch.load(tmp_path / checkpoint.PREV)["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.LAST, checkpoint.PREV]


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path):
    checkpoint.save(tmp_path, {"epoch": 1, "w": torch.ones(3)})
    checkpoint.save(tmp_path, {"epoch": 2, "w": torch.ones(3) * 2})
    assert checkpoint.load(tmp_path)[0]["epoch"] == 2
    last = tmp_path / checkpoint.LAST
    last.write_bytes(last.read_bytes()[:40])
    with pytest.warns(UserWarning, match="unreadable"):
        state, path = checkpoint.load(tmp_path)
    assert state["epoch"] == 1 and path.name == checkpoint.PREV
    assert checkpoint.load(tmp_path / "none") is None


def test_flipped_bytes_fail_the_integrity_check_and_fall_back(tmp_path):
    """torch.load reads a checkpoint with flipped tensor bytes without complaint (it never checks the
    archive's CRCs); load() checks them first and falls back to prev.pt, saying which record failed."""
    w = torch.arange(200_000, dtype=torch.float32)
    checkpoint.save(tmp_path, {"epoch": 1, "w": w})
    checkpoint.save(tmp_path, {"epoch": 2, "w": w * 2})
    last = tmp_path / checkpoint.LAST
    assert checkpoint.problem(last) is None
    flip_middle(last)
    silently = torch.load(last, weights_only=True)  # what a plain load would have trained on
    assert silently["epoch"] == 2 and not torch.equal(silently["w"], w * 2)
    assert "CRC-32" in checkpoint.problem(last)
    rejected = []
    with pytest.warns(UserWarning, match="corrupt"):
        state, path = checkpoint.load(tmp_path, rejected=rejected)
    assert state["epoch"] == 1 and torch.equal(state["w"], w) and path.name == checkpoint.PREV
    assert len(rejected) == 1 and rejected[0].startswith("last.pt: record ") and "CRC-32" in rejected[0]


def test_a_failed_save_leaves_no_temporary_file_and_the_old_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"epoch": 1})

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(StorageFault, match="the disk is full"):  # one line for the user, not a traceback
        checkpoint.save(tmp_path, {"epoch": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.LAST]
    assert checkpoint.load(tmp_path)[0]["epoch"] == 1


def test_temporary_files_of_dead_writers_are_removed_on_the_next_load(tmp_path):
    checkpoint.save(tmp_path, {"epoch": 1})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".{checkpoint.LAST}.tmp-{dead}"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".{checkpoint.LAST}.tmp-{os.getppid()}"  # a live process: its save may be under way
    live.write_bytes(b"in progress")
    assert checkpoint.load(tmp_path)[0]["epoch"] == 1
    assert not stale.exists() and live.exists()
