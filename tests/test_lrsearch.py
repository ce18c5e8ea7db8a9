"""The learning-rate search on real temporary Optuna and MLflow stores."""

import math
import os
import signal

import mlflow
import optuna
import pytest
from click.testing import CliRunner

import run_study
from experiments.presets import preset_config
from experiments.studies import plan_search
from study.config import ConfigError, apply_values
from study.sweep import lrsearch
from study.sweep.driver import CLAIM_PREFIX
from tests.conftest import TINY_RUN, start_study, tiny_overrides


def _search(tmp_path, store, **kw):
    base = apply_values(preset_config("demo"), {**TINY_RUN, "train.epochs": 2, "data.train_limit": 64})
    return plan_search(base, "demo", kw.pop("variant", None), kw.pop("trials", 3), 1e-4, 1e-2,
                                kw.pop("sampler", "tpe"), kw.pop("pruner", "none"), storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                tracking_uri=store, checkpoint_root=tmp_path / "ckpt", device="cpu", **kw)  # fmt: skip


def test_search_trials_agree_between_optuna_and_mlflow(store, tmp_path):
    search = _search(tmp_path, store, trials=3)
    frame, best = lrsearch.run(search, workers=1, echo=lambda s: None)
    assert len(frame) == 3 and set(frame["state"]) == {"COMPLETE"}
    complete = frame[frame["state"] == "COMPLETE"]
    assert best["value"] == complete["value"].min()
    client = mlflow.MlflowClient(store)
    for _, t in frame.iterrows():
        run = client.get_run(t["mlflow_run_id"])
        assert float(run.data.params["train.lr"]) == pytest.approx(t["lr"], rel=1e-12)
        assert run.data.tags["lr_search"] == search.name and run.data.tags["trial"] == str(t["trial"])
        assert run.data.metrics["val_bpd"] == pytest.approx(t["value"])
        assert "test_bpd" not in run.data.metrics  # the search never looks at the test split
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_bpd")) == [1, 2]
    parent = client.get_run(client.get_run(frame["mlflow_run_id"][0]).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["kind"] == "lr-search" and parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_bpd"] == pytest.approx(best["value"])
    assert parent.data.metrics["best_lr"] == pytest.approx(best["lr"])
    # re-running continues the same study: nothing more to do
    frame2, _ = lrsearch.run(_search(tmp_path, store, trials=3), workers=1, echo=lambda s: None)
    assert len(frame2) == 3


def test_pruned_trials_end_killed_not_failed(store, tmp_path):
    # a threshold below any bits/dim prunes every trial at its first report
    search = _search(tmp_path, store, trials=2, pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    frame, best = lrsearch.run(search, workers=1, echo=lambda s: None)
    assert set(frame["state"]) == {"PRUNED"} and best is None
    client = mlflow.MlflowClient(store)
    for run_id in frame["mlflow_run_id"]:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["outcome"] == "pruned"
        assert [m.step for m in client.get_metric_history(run_id, "val_bpd")] == [1]


def test_diverged_trial_is_recorded_and_the_search_goes_on(store, tmp_path, monkeypatch):
    from study.run.spec import Hooks

    # every trial's first step is NaN
    monkeypatch.setattr(Hooks, "loss", lambda self, step, loss: loss * float("nan") if step == 0 else loss)
    frame, best = lrsearch.run(_search(tmp_path, store, trials=2), workers=1, echo=lambda s: None)
    assert list(frame["outcome"]) == ["diverged", "diverged"] and list(frame["state"]) == ["COMPLETE"] * 2
    assert all(math.isinf(v) for v in frame["value"]) and best is None  # the search went on past the first
    study = optuna.load_study(study_name=_search(tmp_path, store, trials=2).study_name,
                              storage=f"sqlite:///{tmp_path / 'optuna.db'}")  # fmt: skip
    assert [t.user_attrs["cause"] for t in study.trials] == ["non-finite loss"] * 2
    run = mlflow.MlflowClient(store).get_run(frame["mlflow_run_id"][0])
    assert run.data.tags["outcome"] == "diverged" and run.data.tags["divergence_causes"] == "epoch 1: non-finite loss"


def _cli(tmp_path, store, *extra):
    return start_study("lr-search", "--preset", "demo", "--trials", 3, "--epochs", 2, "--pruner", "none",
                       "--tracking-uri", store, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--checkpoint-dir",
                       tmp_path / "ckpt", "--device", "cpu", "--grace", 3,
                       *tiny_overrides(**{"data.train_limit": 64, "train.epochs": 2}), *extra,
                       cwd=tmp_path, merged=True, own_group=True)  # fmt: skip


@pytest.mark.slow(31)
def test_killed_search_resumes_and_two_workers_take_distinct_trials(store, tmp_path):
    proc = _cli(tmp_path, store)
    for line in proc.stdout:
        if "trial 1: epoch 1/2" in line:  # kill mid-way through the second trial
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    resumed = _cli(tmp_path, store, "--workers", "2")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "best: lr" in out and "use it with --set train.lr=" in out
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (summary,) = [s for s in optuna.get_all_study_summaries(storage) if not s.study_name.startswith(CLAIM_PREFIX)]
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    duplicates = [t for t in study.trials if t.user_attrs.get("duplicate")]
    assert all(t.state.name == "PRUNED" for t in duplicates)  # a double re-queue stands aside
    assert len(done) >= 3
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry

    states = [(t.number, t.state.name, t.params.get("lr"), Retry.retried_trial_number(t)) for t in study.trials]
    assert len({t.params["lr"] for t in done}) == len(done), states  # distinct proposals, each lr run once
    client = mlflow.MlflowClient(store)
    killed = [t for t in study.trials if t.state.name == "FAIL"]
    assert killed, "the killed trial is failed by its stale heartbeat"
    # its retry completes it; on a loaded host the retry's own heartbeat can go stale too (grace 3 s),
    # so the completing trial may be a retry of a retry: follow the whole chain
    retried = [t for t in done if killed[0].number in Retry.retry_history(t)]
    assert retried and retried[0].params["lr"] == killed[0].params["lr"], states
    run = client.get_run(retried[0].user_attrs["mlflow_run_id"])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_bpd")) == [1, 2]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--range", "1e-2", "1e-3"], "LOW must be below HIGH"),
        (["--range", "0", "1e-3"], "must be positive"),
        (["--range", "-1", "1e-3"], "must be positive"),
        (["--sampler", "random"], "Invalid value for '--sampler'"),
        (["--pruner", "sometimes"], "Invalid value for '--pruner'"),
        (["--variant", "nope"], "--variant 'nope'"),
    ],
)
def test_bad_search_requests_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(run_study.cli, ["lr-search", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError):
        plan_search(preset_config("demo"), "demo", None, 0, 1e-4, 1e-3, "tpe", "median")
