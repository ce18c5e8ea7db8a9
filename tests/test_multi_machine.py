"""Many machines for real: the ablation and the learning-rate search on a PostgreSQL database and an
MLflow tracking server (scripts/local_cluster.py), with two worker processes standing for two
machines, each with its own checkpoint folder.

Skipped, loudly, only where PostgreSQL's server programs, the psycopg2 driver or the full mlflow
package (its server) are absent; never in CI (.ci/run installs them and sets CI=1, which turns the
skip into a failure).
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from tests.conftest import MLFLOW_SERVER, PSYCOPG2, ROOT, needs, start_study, tiny_overrides

sys.path.insert(0, str(ROOT / "scripts"))
import local_cluster  # noqa: E402

pytestmark = needs(
    ("PostgreSQL server programs (initdb, pg_ctl): apt-get install postgresql",
     local_cluster.pg_bin("initdb") is not None and local_cluster.pg_bin("pg_ctl") is not None),
    PSYCOPG2, MLFLOW_SERVER,
)  # fmt: skip

ONLY = ("seed-report", "paper")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    state = local_cluster.up(folder)
    yield state
    local_cluster.down(folder)


def _machine(name: str, tmp_path: Path, cluster: dict, *args: str, grace: int = 3) -> subprocess.Popen:
    """One "machine": its own folder and checkpoints, the shared database and tracking server. A short
    ``grace`` lets a lost machine's cell be retried quickly; a test that loses none keeps the default,
    so a heartbeat delayed on a busy machine is not taken for a lost one."""
    cwd = tmp_path / name
    cwd.mkdir(exist_ok=True)
    return start_study(*args, "--storage", cluster["storage"], "--tracking-uri", cluster["tracking_uri"],
                       "--checkpoint-dir", cwd / "checkpoints", "--device", "cpu", "--grace", grace, "--workers", 1,
                       cwd=cwd, merged=True, own_group=True)  # fmt: skip


@pytest.mark.slow(55)
def test_the_ablation_on_two_machines_runs_every_cell_once_and_survives_a_lost_machine(cluster, tmp_path):
    tiny = tiny_overrides(**{"train.epochs": 3, "data.train_limit": 64})
    args = ["ablation", "stabilizers", "--preset", "demo", "--seeds", "2", "--experiment", "multi",
            *[x for v in ONLY for x in ("--only", v)], *tiny]  # fmt: skip
    start = time.perf_counter()
    a = _machine("a", tmp_path, cluster, *args)
    time.sleep(3)
    b = _machine("b", tmp_path, cluster, *args)
    killed_cell = None
    for line in a.stdout:  # machine a is lost in the middle of a cell
        if line.startswith("[worker 0]") and "epoch 1/3" in line:
            killed_cell = line.split("]")[1].split(":")[0].strip()
            os.killpg(a.pid, signal.SIGKILL)
            break
    a.wait(timeout=60)
    # machine a's disk went with it: b cannot reach a's checkpoints and trains the lost cell from scratch
    # in the same MLflow run (a shared checkpoint folder, e.g. NFS, would let it resume instead)
    shutil.rmtree(tmp_path / "a" / "checkpoints")
    out, _ = b.communicate(timeout=900)
    seconds = time.perf_counter() - start
    assert b.returncode == 0, out
    assert "are not on this machine; training it again from scratch" in out
    assert killed_cell is not None

    client = mlflow.MlflowClient(cluster["tracking_uri"])
    exp = client.get_experiment_by_name("multi")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "study-parent"]
    cells = [r for r in runs if "variant" in r.data.tags and "kind" not in r.data.tags]
    finished = [r for r in cells if r.data.tags.get("outcome") in ("completed", "recovered", "diverged")]
    assert len(parents) == 1 and all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in cells)
    counts = collections.Counter((r.data.tags["variant"], int(r.data.tags["seed"])) for r in finished)
    assert counts == collections.Counter({(v, s): 1 for v in ONLY for s in (0, 1)})  # every cell exactly once
    assert all(r.info.status != "RUNNING" for r in runs)
    variant, seed = killed_cell.rsplit(" s", 1)
    (lost,) = [r for r in finished if r.data.tags["variant"] == variant and r.data.tags["seed"] == seed]
    assert sorted(m.step for m in client.get_metric_history(lost.info.run_id, "val_bpd")) == [1, 2, 3]
    # sample grids and checkpoints through the server's artifact proxy
    from study.store import Store

    server = Store(cluster["tracking_uri"])
    for r in finished[:2]:
        assert server.download_artifact(r.info.run_id, "samples/epoch_003_t0.7.png").exists()
        assert server.download_artifact(r.info.run_id, "checkpoint/last.pt").exists()
    report = subprocess.run([sys.executable, str(ROOT / "run_study.py"), "report", "--tracking-uri",
                             cluster["tracking_uri"], "--experiment", "multi", "--out", str(tmp_path / "report")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "README.md").read_text()
    assert "## Every run counted" in text and (tmp_path / "report" / "figures" / "samples.png").exists()
    print(f"two-machine demo study: {seconds:.0f} s; cells per machine: b took {out.count('training')} starts")


@pytest.mark.slow(24)
def test_the_lr_search_on_two_machines_takes_distinct_trials(cluster, tmp_path):
    args = ["lr-search", "--preset", "demo", "--trials", "4", "--pruner", "none", "--experiment", "multi-lr",
            *tiny_overrides(**{"train.epochs": 2, "data.train_limit": 64})]  # fmt: skip
    a = _machine("a", tmp_path, cluster, *args, grace=30)
    b = _machine("b", tmp_path, cluster, *args, grace=30)
    out_a, _ = a.communicate(timeout=900)
    out_b, _ = b.communicate(timeout=900)
    assert a.returncode == 0 and b.returncode == 0, (out_a, out_b)
    (summary,) = [s for s in optuna.get_all_study_summaries(cluster["storage"]) if s.study_name.startswith("lr-")]
    study = optuna.load_study(study_name=summary.study_name, storage=cluster["storage"])
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) >= 4 and len({t.params["lr"] for t in done}) == len(done)  # distinct proposals
    client = mlflow.MlflowClient(cluster["tracking_uri"])
    runs = {t.user_attrs["mlflow_run_id"] for t in done}
    assert len(runs) == len(done)  # one MLflow run per trial
    for run_id in runs:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.info.run_name.startswith("default-lr")  # names carry the lr
    took = {"a": out_a.count("trial"), "b": out_b.count("trial")}
    assert took["a"] and took["b"]  # both machines worked
