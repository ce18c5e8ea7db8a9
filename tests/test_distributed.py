"""One run over two processes (torchrun, gloo on the CPU) follows the single-process curve."""

import subprocess
import sys

import mlflow
import pytest

from tests.conftest import ROOT, tiny_overrides


def _curve(store, experiment, key):
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)], run


@pytest.mark.slow(30)
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(store, tmp_path):
    # batch norm off: PyTorch has no SyncBatchNorm on the CPU, so per-rank batch statistics would differ
    sets = tiny_overrides(**{"train.epochs": 2, "stabilizers.st_batchnorm": False, "train.threads": 1})
    common = ["train", "--preset", "demo", "--tracking-uri", store, "--device", "cpu", *sets]
    one = subprocess.run([sys.executable, str(ROOT / "run_study.py"), *common, "--experiment", "one",
                          "--checkpoint-dir", str(tmp_path / "c1")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "run_study.py"), *common, "--experiment", "two",
                          "--checkpoint-dir", str(tmp_path / "c2")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("epoch 2/2") == 1  # only rank 0 speaks
    for key in ("train_bpd", "val_bpd"):
        a, _ = _curve(store, "one", key)
        b, run = _curve(store, "two", key)
        assert len(a) == len(b) == 2
        assert b == pytest.approx(a, abs=1e-4), key
    _, run_one = _curve(store, "one", "val_bpd")
    assert run.data.metrics["test_bpd"] == pytest.approx(run_one.data.metrics["test_bpd"], abs=1e-4)
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "completed"


def test_batch_not_divisible_by_processes_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "run_study.py"), "train", "--device", "cpu", "--set", "train.batch_size=33",
                          "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode != 0 and "must be divisible by the 2 processes" in out.stderr
    assert not (tmp_path / "x.db").exists()


def test_compile_under_torchrun_is_a_one_line_error(monkeypatch, tmp_path):
    from study.config import ConfigError
    from study.run.engine import train
    from tests.test_training import spec

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="train.compile=off"):
        train(spec(f"sqlite:///{tmp_path}/never.db", tmp_path, **{"train.compile": "default"}))
    assert not (tmp_path / "never.db").exists()  # refused before anything was written
