"""One owner per run, every stop recorded, every bad input refused before anything is written, and
SIGKILL at random moments across a run's life never costs an epoch or a duplicate."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.conftest import MLFLOW_SERVER, ROOT, free_port, http_get, needs, run_study, study_cmd, tiny_overrides
from tests.test_training import history, spec


def _run(tmp_path, *args, timeout=120):
    return run_study(*args, cwd=tmp_path, timeout=timeout)


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _bad_npz(folder: Path) -> str:
    """A folder with a garbage *train*.npz and a *test*.npz holding no images."""
    folder.mkdir()
    (folder / "x_train.npz").write_bytes(b"not a zip at all")
    np.savez(folder / "x_test.npz", images=np.zeros((0, 32, 32, 3), dtype=np.uint8))
    return str(folder)


def _empty_test(folder: Path) -> str:
    folder.mkdir()
    np.savez(folder / "x_train.npz", images=np.zeros((40, 32, 32, 3), dtype=np.uint8))
    np.savez(folder / "x_test.npz", images=np.zeros((0, 32, 32, 3), dtype=np.uint8))
    return str(folder)


BAD = [  # (arguments, what the one line says); {tmp} is the test's folder
    (["train", "--set", "model.num_scales=6"], "does not fit 32x32 images"),
    (["train", "--set", "model.depth=3"], "unknown config key 'model.depth'"),
    (["train", "--set", "train.epochs=many"], "expected an integer"),
    (["train", "--set", "train.lr=inf"], "train.lr=inf: must be a finite number"),
    (["train", "--set", "data.val_fraction=0"], "the validation split is empty"),
    (["train", "--preset", "imagenet"], "'imagenet' is not one of"),
    (["train", "--data", "npz:missing-folder"], "is not a folder"),
    (["train", "--data", "npz:{tmp}/garbage"], "is not an .npz archive"),
    (["train", "--data", "npz:{tmp}/emptytest"], "the test split is empty"),
    (["train", "--variant", "nope"], "unknown variant 'nope'"),
    (["train", "--variant", "paper", "--set", "stabilizers.scale_fn=exp"], "contradicts variant 'paper'"),
    (["train", "--tracking-uri", "foo://bar"], "use sqlite:///PATH.db"),
    (["train", "--tracking-uri", "store.db"], "is a path or file store"),
    (["train", "--tracking-uri", "file:///{tmp}/mlruns"], "is a path or file store"),
    (["train", "--tracking-uri", "sqlite:////nonexistent/dir/x.db"], "folder /nonexistent/dir does not exist"),
    (["train", "--tracking-uri", "http://127.0.0.1:9"], "no MLflow server answers within 3 s"),
    (["train", "--resume", "deadbeef"], "no such store"),
    (["ablation", "stabilizers", "--storage", "foo://bar", "--tracking-uri", "sqlite:///{tmp}/m.db"], "--storage 'foo://bar'"),
    (["ablation", "stabilizers", "--storage", "sqlite:////nonexistent/o.db"], "folder /nonexistent does not exist"),
    (["ablation", "stabilizers", "--grace", "-5"], "Invalid value for '--grace'"),
    (["lr-search", "--sampler", "random"], "'random' is not one of"),
    (["report", "--tracking-uri", "sqlite:///{tmp}/missing.db"], "no such store"),
    (["ui", "--tracking-uri", "sqlite:///{tmp}/missing.db"], "no such store"),
    (["evaluate", "--run", "x", "--tracking-uri", "sqlite:///{tmp}/missing.db"], "no such store"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, args, message):
    from click.testing import CliRunner

    import run_study

    if any("garbage" in a for a in args):
        _bad_npz(tmp_path / "garbage")
    if any("emptytest" in a for a in args):
        _empty_test(tmp_path / "emptytest")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = _snapshot(tmp_path)
    start = time.perf_counter()
    out = CliRunner().invoke(run_study.cli, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert out.exit_code == 2 and isinstance(out.exception, SystemExit), (out.output, out.exception)
    assert message in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    assert _snapshot(tmp_path) == before  # no store, no checkpoint folder, no file
    assert time.perf_counter() - start < 30


def test_bad_input_through_the_real_entry_point_has_no_traceback(tmp_path):
    for args, message in (BAD[0], BAD[11]):
        out = _run(tmp_path, *args)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
        assert out.stderr.strip().count("\n") == 0
    assert list(tmp_path.iterdir()) == []


def test_a_truncated_checkpoint_warns_in_one_line(store, tmp_path):
    from study.run import checkpoint

    checkpoint.save(tmp_path / "c", {"epoch": 1})
    checkpoint.save(tmp_path / "c", {"epoch": 2})
    (tmp_path / "c" / checkpoint.LAST).write_bytes(b"\x80\x02truncated")
    code = ("import warnings, sys; from study_cli.commands import _one_line_warning; warnings.formatwarning = _one_line_warning;"
            f"from study.run import checkpoint; from pathlib import Path; print(checkpoint.load(Path({str(tmp_path / 'c')!r}))[0]['epoch'])")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1" and out.stderr.strip().startswith("warning: checkpoint")
    assert out.stderr.strip().count("\n") == 0  # no source line


# --- one owner per run -------------------------------------------------------------------------------


def _train_cmd(store, tmp_path, epochs=4, faults=()):
    return study_cmd("train", "--preset", "demo", "--tracking-uri", store, "--experiment", "own", "--checkpoint-dir",
                     tmp_path / "ckpt", "--device", "cpu", *tiny_overrides(**{"train.epochs": epochs}), faults=faults)  # fmt: skip


def _start(cmd, tmp_path):
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc, prefix: str) -> None:
    for line in proc.stdout:
        if line.startswith(prefix):
            return
    raise AssertionError(f"no line starting {prefix!r}: {proc.stderr.read()}")


@pytest.mark.slow(38)
def test_a_second_process_on_a_live_run_is_refused_and_a_dead_owner_is_taken_over(store, tmp_path):
    slow = ["slow-save=0.5"]  # the first run is still training when the second one starts
    first = _start(_train_cmd(store, tmp_path, epochs=12, faults=slow), tmp_path)
    _wait_for(first, "epoch 1/12")
    second = subprocess.run(_train_cmd(store, tmp_path, epochs=12), cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert second.returncode == 2 and "is being trained by" in second.stderr
    assert f"{socket.gethostname()}:{first.pid}" in second.stderr and second.stderr.strip().count("\n") == 0
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    third = subprocess.run(_train_cmd(store, tmp_path, epochs=12), cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert third.returncode == 0, third.stderr
    assert "taking over run" in third.stdout and f":{first.pid}" in third.stdout
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("own").experiment_id])
    assert run.info.status == "FINISHED" and [s for s, _ in history(client, run.info.run_id, "val_bpd")] == list(range(1, 13))
    assert run.data.tags["owner_heartbeat"] == "0"  # released at the end


@pytest.mark.slow(40)
def test_split_brain_across_hosts_stores_every_epoch_once(store, tmp_path):
    """Host A trains a run and is frozen (SIGSTOP) past the grace; host B, with its own checkpoint folder
    (A's disk is out of its reach), takes the run over and trains it; then A wakes up. A must notice
    that the store names B, stop without writing, and exit non-zero with one line naming B."""
    def host(name, *faults):
        cmd = _train_cmd(store, tmp_path / name, epochs=8, faults=(f"host={name}", "beat=1", "grace=3", *faults))
        (tmp_path / name).mkdir(exist_ok=True)
        return _start(cmd, tmp_path / name)

    a = host("hostA")
    _wait_for(a, "epoch 2/8")
    os.kill(a.pid, signal.SIGSTOP)
    try:
        # A's disk is not B's: B cannot see A's checkpoints and trains the run again from scratch
        (tmp_path / "hostA" / "ckpt").rename(tmp_path / "hostA" / "ckpt-unreachable")
        time.sleep(5)  # past B's 3 s grace since A's last heartbeat
        b = host("hostB", "slow-log=0.3")
        head_b = []
        for line in b.stdout:  # until B owns the run and is training it
            head_b.append(line)
            if line.startswith("epoch 1/8"):
                break
    finally:
        os.kill(a.pid, signal.SIGCONT)
    out_a, err_a = a.communicate(timeout=300)
    out_b, err_b = b.communicate(timeout=300)
    out_b = "".join(head_b) + out_b
    assert b.returncode == 0, err_b
    assert "taking over run" in out_b and f"hostA:{a.pid}" in out_b
    assert a.returncode == 2, (out_a, err_a)
    # one line says it; the only other lines A may have printed are its periodic progress lines (a step
    # frozen past LOG_EVERY_S by the SIGSTOP prints one when B's start-up is slow)
    *progress, last = err_a.strip().splitlines()
    assert f"was taken over by hostB:{b.pid}" in last and last.startswith("error:"), err_a
    assert all(re.fullmatch(r"epoch \d+: step \d+/\d+, .* steps/s, ETA .*", line) for line in progress), err_a
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("own").experiment_id])
    for key in ("val_bpd", "train_bpd", "epoch_seconds"):  # every epoch stored exactly once
        assert [s for s, _ in history(client, run.info.run_id, key)] == list(range(1, 9)), key
    assert len(history(client, run.info.run_id, "test_bpd")) == 1
    assert run.info.status == "FINISHED" and run.data.tags["owner"] == f"hostB:{b.pid}"


def test_a_refused_process_never_writes_the_owner_tag(store, tmp_path):
    first = _start(_train_cmd(store, tmp_path, epochs=12, faults=["slow-save=0.5"]), tmp_path)
    try:
        _wait_for(first, "epoch 1/12")
        client = mlflow.MlflowClient(store)
        (run,) = client.search_runs([client.get_experiment_by_name("own").experiment_id])
        # a second process on this host whose check of the tags passes (the heartbeat looks stale) is
        # still refused by the checkpoint folder's lock, before it writes anything
        refused = subprocess.run(_train_cmd(store, tmp_path, epochs=12, faults=["grace=0"]), cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
        assert refused.returncode == 2 and "is held by" in refused.stderr, refused.stderr
        assert client.get_run(run.info.run_id).data.tags["owner"] == f"{socket.gethostname()}:{first.pid}"
    finally:
        first.kill()
        first.wait(timeout=30)


# --- every stop recorded ----------------------------------------------------------------------------


@pytest.mark.slow(25)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_end_a_run_like_ctrl_c(store, tmp_path, sig):
    proc = _start(_train_cmd(store, tmp_path), tmp_path)
    _wait_for(proc, "epoch 1/4")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name}" in err and "run the same command again" in err
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("own").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["outcome"] == "interrupted"
    assert run.data.tags["interrupted_by"] == signal.Signals(sig).name
    resumed = subprocess.run(_train_cmd(store, tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming run" in resumed.stdout, resumed.stderr
    assert [s for s, _ in history(client, run.info.run_id, "val_bpd")] == [1, 2, 3, 4]
    assert client.get_run(run.info.run_id).data.tags["outcome"] == "completed"


@pytest.mark.slow(13)
@pytest.mark.parametrize("sig,code,ignored", [(signal.SIGTERM, 143, False), (signal.SIGINT, 130, True)],
                         ids=["sigterm", "sigint-arriving-ignored"])  # fmt: skip
def test_a_signal_to_an_ablation_stops_its_workers_and_records_their_runs(store, tmp_path, sig, code, ignored):
    """SIGTERM (Slurm, docker stop) or SIGINT to the coordinator: every worker stops in one line, no
    Optuna traceback, and its run is recorded as interrupted. A study started in the background of a
    script inherits SIGINT ignored; it installs its own handler, so Ctrl-C still stops it."""
    cmd = [sys.executable, str(ROOT / "run_study.py"), "ablation", "stabilizers", "--preset", "demo", "--seeds", "1",
           "--only", "seed-report", "--only", "paper", "--workers", "2", "--tracking-uri", store, "--storage",
           f"sqlite:///{tmp_path / 'optuna.db'}", "--checkpoint-dir", str(tmp_path / "ckpt"), "--device", "cpu",
           "--experiment", "abl", "--grace", "3", *tiny_overrides(**{"train.epochs": 4, "data.train_limit": 64})]  # fmt: skip
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignored else None
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=ignore)  # fmt: skip
    _wait_for(proc, "[worker")
    for line in proc.stdout:
        if "epoch 1/4" in line:
            break
    proc.send_signal(sig)  # to the coordinator only, as Slurm or docker stop would
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == code, out
    assert "Traceback" not in out and "failed with parameters" not in out, out
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("abl").experiment_id])
    cells = [r for r in runs if "variant" in r.data.tags and r.data.tags.get("kind") is None]
    assert cells and all(r.info.status != "RUNNING" for r in runs)  # nothing left RUNNING
    assert any(r.data.tags.get("outcome") == "interrupted" for r in cells)


@needs(MLFLOW_SERVER)
def test_sigterm_to_ui_stops_the_server_and_its_workers(store, tmp_path):
    mlflow.MlflowClient(store).create_experiment("x")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_study.py"), "ui", "--tracking-uri", store, "--port",
                             str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        http_get(f"http://127.0.0.1:{port}/health", 90)
    except TimeoutError:
        proc.kill()
        raise AssertionError("the UI never answered") from None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert f"http://127.0.0.1:{port}/#/experiments/" in out  # a direct link to the study's runs
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    try:  # nothing of its process group is left
        os.killpg(proc.pid, 0)
        leftover = True
    except ProcessLookupError:
        leftover = False
    assert not leftover


# --- SIGKILL at random moments ------------------------------------------------------------------------


@pytest.mark.slow(115)
def test_sigkill_at_random_moments_never_costs_an_epoch(store, tmp_path):
    """A 30-epoch run SIGKILLed at 20 seeded random moments of its training (epochs, evaluations,
    checkpoint writes and MLflow logging, which faults slow down so that kills often land there),
    resumed each time: every epoch is logged once and the result equals an uninterrupted run's.

    The 20 killed processes are forked from a forkserver that imported torch, mlflow and the harness
    once (each is still a new process running the command line from its start); the last one, which
    finishes the run, is a plain subprocess."""
    import multiprocessing

    from study.run.engine import train
    from tests import faults

    epochs, rng = 30, random.Random(2026)
    slow = ["slow-save=0.15", "slow-log=0.15"]
    cmd = _train_cmd(store, tmp_path, epochs=epochs, faults=slow)
    args = cmd[cmd.index("--") + 1 :]
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "mlflow", "sqlalchemy", "run_study", "study_cli.commands", "study.run.engine", "tests.faults"])
    client = mlflow.MlflowClient(store)
    for i in range(20):
        out = tmp_path / f"kill-{i}.log"
        proc = ctx.Process(target=faults.run_cli, args=(slow, args, str(tmp_path), str(out)))
        proc.start()
        deadline = time.monotonic() + 120
        while not (out.exists() and "\n" in out.read_text()):  # it is training: it resumed, or finished epoch 1
            assert proc.is_alive() and time.monotonic() < deadline, out.read_text() if out.exists() else "no output"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL, "the run finished before 20 kills: give it more epochs"
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (run,) = client.search_runs([client.get_experiment_by_name("own").experiment_id])
    assert run.info.status == "FINISHED"  # no run left RUNNING
    assert [s for s, _ in history(client, run.info.run_id, "val_bpd")] == list(range(1, epochs + 1))  # each once
    reference = train(spec(store, tmp_path / "ref", experiment="ref", **{"train.epochs": epochs}))
    assert history(client, run.info.run_id, "val_bpd") == history(client, reference.run_id, "val_bpd")
    assert history(client, run.info.run_id, "train_bpd") == history(client, reference.run_id, "train_bpd")
    assert client.get_run(run.info.run_id).data.metrics["test_bpd"] == reference.test_bpd
