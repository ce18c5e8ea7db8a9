"""A busy store and a full disk are faults, not crashes: a SQLite lock held by another process is
waited out (boundedly, visibly); one that outlasts the wait, or a full disk, ends the run in one line
with exit 2, no temporary file left, and the same command resumes it with every epoch stored once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from study import storage
from study.storage import StorageFault, patiently
from tests.conftest import needs
from tests.test_reliability import _train_cmd, _wait_for
from tests.test_training import history

HOLD = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
con.execute("BEGIN EXCLUSIVE")  # no other connection reads or writes until COMMIT
print("held", flush=True)
time.sleep(float(sys.argv[2]))
con.execute("COMMIT")
"""


def _hold_lock(store: str, seconds: float) -> subprocess.Popen:
    """Another process holding an exclusive lock on the SQLite store for ``seconds``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, store[len("sqlite:///"):], str(seconds)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def _env(wait_s: float) -> dict[str, str]:
    return {**os.environ, "REALNVP_STORE_WAIT_S": str(wait_s)}


def _the_run(store: str):
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("own").experiment_id])
    return client, run


def _stored_once(store: str, epochs: int) -> None:
    client, run = _the_run(store)
    for key in ("val_bpd", "train_bpd"):
        assert [s for s, _ in history(client, run.info.run_id, key)] == list(range(1, epochs + 1)), key
    assert len(history(client, run.info.run_id, "test_bpd")) == 1
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "completed"


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*.tmp-*")]


# --- the bounded wait, alone ----------------------------------------------------------------------


class Flaky:
    """A call that fails ``times`` times with ``error`` first."""

    def __init__(self, times: int, error: Exception):
        self.times, self.error, self.calls = times, error, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.times:
            raise self.error
        return "ok"


def test_a_locked_store_is_retried_and_the_wait_is_shown(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_PAUSE_S", 0.01)
    said = []
    locked = Flaky(3, RuntimeError("(sqlite3.OperationalError) database is locked\n[SQL: INSERT ...]"))
    assert patiently(locked, "MLflow log_batch", wait_s=5, say=said.append) == "ok" and locked.calls == 4
    assert len(said) == 2 and "waiting up to 5 s" in said[0] and said[1].startswith("store answered after")


def test_a_lock_past_the_wait_and_a_full_disk_are_storage_faults(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_PAUSE_S", 0.01)
    with pytest.raises(StorageFault, match="still locked by another process") as e:
        patiently(Flaky(10**6, RuntimeError("database is locked")), "MLflow log_batch", wait_s=0.05, say=lambda _: None)
    assert e.value.locked
    full = Flaky(1, RuntimeError("unexpected pos 704"))
    full.error.__context__ = OSError(28, "No space left on device")  # how torch.save reports ENOSPC
    with pytest.raises(StorageFault, match="the disk is full") as e:
        patiently(full, "checkpoint", say=lambda _: None)
    assert not e.value.locked and full.calls == 1  # a full disk is not waited out
    other = Flaky(1, ValueError("a real bug"))
    with pytest.raises(ValueError, match="a real bug"):
        patiently(other, "x")


# --- a real lock, held by another process ------------------------------------------------------------


@pytest.mark.slow(40)
def test_a_lock_longer_than_mlflows_own_timeout_is_waited_out(store, tmp_path):
    """MLflow alone gives up after its 20 s busy timeout with a traceback; held 25 s, the lock is
    waited out and the run finishes with every epoch once."""
    trainer = subprocess.Popen(_train_cmd(store, tmp_path, epochs=6, faults=["slow-save=0.3"]), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(90))  # fmt: skip
    _wait_for(trainer, "epoch 1/6")
    holder = _hold_lock(store, 25)
    out, err = trainer.communicate(timeout=240)
    holder.wait(timeout=60)
    assert trainer.returncode == 0, err
    assert "store busy" in err and "waiting up to 90 s" in err and "store answered after" in err, err
    assert "Traceback" not in err, err
    _stored_once(store, 6)


@pytest.mark.slow(45)
def test_a_lock_past_the_wait_stops_the_run_in_one_line_and_the_same_command_resumes_it(store, tmp_path):
    cmd = _train_cmd(store, tmp_path, epochs=6, faults=["slow-save=0.3"])
    trainer = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env(2))  # fmt: skip
    _wait_for(trainer, "epoch 1/6")
    holder = _hold_lock(store, 60)
    try:
        out, err = trainer.communicate(timeout=120)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert trainer.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "still locked by another process" in lines[0] and "run the same command" in lines[0], err
    assert _temporaries(tmp_path / "ckpt") == []
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "resuming run" in again.stdout
    _stored_once(store, 6)
    assert _temporaries(tmp_path / "ckpt") == []


@pytest.mark.slow(20)
def test_a_lock_at_start_up_is_one_line_and_creates_no_run(store, tmp_path):
    holder = _hold_lock(store, 60)
    try:
        started = time.monotonic()
        proc = subprocess.run(_train_cmd(store, tmp_path, epochs=2), cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env=_env(1))  # fmt: skip
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "still locked by another process" in proc.stderr, proc.stderr
    assert took < 60  # the wait is bounded (MLflow's own retries and busy timeout included)
    client = mlflow.MlflowClient(store)
    assert client.get_experiment_by_name("own") is None


# --- a real full disk ------------------------------------------------------------------------------------

_CAN_MOUNT = os.geteuid() == 0 and shutil.which("mount") is not None
_SMALL_FS_HOW = ("a small filesystem: run as root (a tmpfs is mounted per test, as .ci/run runs), or set "
                 "REALNVP_SMALL_FS to a mounted one of a few MB")  # fmt: skip
SMALL_FS = (_SMALL_FS_HOW, bool(os.environ.get("REALNVP_SMALL_FS")) or _CAN_MOUNT)


@pytest.fixture
def small_fs(tmp_path):
    """A folder on a real filesystem of a few MB: REALNVP_SMALL_FS's, or a tmpfs mounted for this test."""
    given = os.environ.get("REALNVP_SMALL_FS")
    if given:
        folder = Path(given) / tmp_path.name
        folder.mkdir()
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
        return
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True,
                             text=True)  # fmt: skip
    if mounted.returncode != 0:
        why = f"could not mount a tmpfs ({mounted.stderr.strip()})"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the full-disk test: {why}; set REALNVP_SMALL_FS")
        pytest.skip(f"{why}; set REALNVP_SMALL_FS to a mounted small filesystem")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@needs(SMALL_FS)
@pytest.mark.slow(20)
def test_a_full_disk_stops_the_run_in_one_line_and_the_same_command_resumes_it(small_fs, _store_template, tmp_path):
    shutil.copy(_store_template, small_fs / "mlflow.db")
    store = f"sqlite:///{small_fs / 'mlflow.db'}"
    ckpt_home = small_fs / "run"  # its checkpoints on the small disk too
    ckpt_home.mkdir()
    full = _train_cmd(store, ckpt_home, epochs=5, faults=[f"fill-disk=2:{small_fs}"])
    proc = subprocess.run(full, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "the disk is full" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and _temporaries(ckpt_home) == []
    (small_fs / "filler").unlink()  # space freed: the same command resumes
    again = subprocess.run(_train_cmd(store, ckpt_home, epochs=5), cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "resuming run" in again.stdout and "after epoch 2" in again.stdout, again.stdout
    _stored_once(store, 5)
    assert _temporaries(ckpt_home) == []


def _worker_stopped_by_the_store(marker: str, index: int, threads: int) -> None:
    """A spawned worker: the first one meets a full disk at once, the other would work on for a minute."""
    from study.sweep.driver import run_worker

    def work():
        if index == 0:
            raise storage.full_disk_fault("the checkpoint", OSError(28, "No space left on device"))
        Path(marker, f"started-{index}").touch()
        time.sleep(60)

    run_worker(work)


def test_a_worker_stopped_by_the_store_stops_the_others_and_the_study_stays_running(tmp_path, monkeypatch):
    from study.sweep import driver

    finished = []
    monkeypatch.setattr(driver, "finish", lambda sweep, parent, done: finished.append(done))
    start = time.monotonic()
    with pytest.raises(StorageFault) as caught:
        with driver.finishing(None, "parent", lambda: False):
            driver.run_until_done(None, 2, lambda: None, _worker_stopped_by_the_store, (str(tmp_path),),
                                  done=lambda: False, poll_s=0.2)  # fmt: skip
    assert "run the same command again" in str(caught.value)
    assert time.monotonic() - start < 45, "the other worker was left to run out its minute"
    assert finished == [], "after a storage fault the parent run must stay RUNNING, not be ended"
    # any other failure still ends the parent run (KILLED: not done)
    with pytest.raises(RuntimeError), driver.finishing(None, "parent", lambda: False):
        raise RuntimeError("a crash")
    assert finished == [False]
