"""The ablation study end to end on real temporary Optuna and MLflow SQLite stores."""

import collections
import os
import signal

import mlflow
import optuna
import pytest
from click.testing import CliRunner

import run_study
from experiments.ablation import STABILIZERS
from experiments.presets import preset_config
from experiments.studies import get_study, plan_study
from study.config import ConfigError, apply_values
from study.sweep import ablation as ab
from tests.conftest import TINY_RUN, start_study, tiny_overrides

ONLY = ("seed-report", "no-gradclip", "paper")


def _children(store, experiment):
    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "study-parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def _plan(tmp_path, store, **kw):
    base = apply_values(preset_config("demo"), {**TINY_RUN, "train.epochs": 1, "data.train_limit": 64})
    return plan_study(
        "stabilizers",
        "demo",
        base,
        kw.pop("seeds", (0, 1)),
        kw.pop("only", ONLY),
        "cpu",
        experiment="abl",
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        tracking_uri=store,
        checkpoint_root=tmp_path / "ckpt",
        **kw,
    )


def test_variants_are_declared_once_with_rationales():
    names = [v.name for v in STABILIZERS]
    assert len(names) == len(set(names))
    for required in (
        "seed-report",
        "no-softplus",
        "no-clamp",
        "no-gradclip",
        "no-weightnorm",
        "no-l2",
        "amp-off",
        "paper",
        "paper-literal-exp",
        "chrischute",
    ):
        assert required in names
    base = preset_config("demo")
    for v in STABILIZERS:
        assert v.rationale and apply_values(base, v.overrides)  # every variant is a valid config
    by = {v.name: v.overrides for v in STABILIZERS}
    # each leave-one-out differs from seed-report in exactly one switch
    for name in ("no-softplus", "no-clamp", "no-gradclip", "no-weightnorm", "no-l2", "amp-off"):
        diff = {k for k in by[name] if by[name][k] != by["seed-report"][k]}
        assert len(diff) == 1, (name, diff)
    with pytest.raises(KeyError):
        get_study("nope")


def test_demo_study_runs_every_cell_once_under_one_parent(store, tmp_path):
    plan = _plan(tmp_path, store)
    lines = []
    rows = ab.run(plan, workers=1, echo=lines.append)
    parents, children = _children(store, "abl")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    cells = collections.Counter((r.data.tags["variant"], int(r.data.tags["seed"])) for r in children)
    assert cells == collections.Counter({(v, s): 1 for v in ONLY for s in (0, 1)})
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.tags["outcome"] in ("completed", "recovered", "diverged")
        assert r.data.tags["study"] == "stabilizers"
    assert {r["variant"] for r in rows} == set(ONLY) and all(r["done"] == 2 for r in rows)
    for r in rows:  # the n behind each mean test figure: the variant's runs that have one
        tested = [c for c in children if c.data.tags["variant"] == r["variant"] and "test_bpd" in c.data.metrics]
        assert r["test n"] == len(tested)
    assert any(line.startswith("cells done 6, running 0, left 0") for line in lines)
    # the parent shows the study at a glance: a description and summary metrics the UI charts
    parent = parents[0].data
    assert parent.tags["mlflow.note.content"].startswith("Study stabilizers at preset demo: which of")
    assert parent.metrics["cells_done"] == 6 and parent.metrics["cells_planned"] == 6
    means = {}
    for v in ONLY:
        tests = [r.data.metrics["test_bpd"] for r in children if r.data.tags["variant"] == v]
        means[v] = round(sum(tests) / len(tests), 4)
        assert parent.metrics[f"test_bpd/{ab.metric_key(v)}"] == pytest.approx(means[v], abs=1e-12)
    assert parent.metrics["test_bpd/best"] == pytest.approx(min(means.values()), abs=1e-12)
    assert ab.metric_key("exp+softplus") == "exp_softplus"
    # the progress lines show finished figures only, each variant's once per change
    text = "\n".join(lines)
    for v in ONLY:
        assert text.count(f"{v} {means[v]:.4f} (n=2; 2/2 seeds done)") == 1, text
    assert not any("val bpd" in line for line in lines if line.startswith("cells done"))  # no epoch in progress
    study = optuna.load_study(study_name=plan.optuna_name, storage=plan.storage)
    assert all(state == "COMPLETE" for state in ab.cell_states(study).values())
    # running it again trains nothing
    again = []
    ab.run(_plan(tmp_path, store), workers=1, echo=again.append)
    assert not any("training" in line for line in again)
    assert len(_children(store, "abl")[1]) == 6


def _cli(tmp_path, store, workers=1, grace=3, seeds=2):
    return start_study("ablation", "stabilizers", "--preset", "demo", "--seeds", seeds, "--epochs", 2, "--tracking-uri",
                       store, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--checkpoint-dir", tmp_path / "ckpt",
                       "--device", "cpu", "--experiment", "abl", "--workers", workers, "--grace", grace,
                       *[x for v in ONLY for x in ("--only", v)],
                       *tiny_overrides(**{"data.train_limit": 64, "train.epochs": 2}),
                       cwd=tmp_path, merged=True, own_group=True)  # fmt: skip


def _check_grid(store, tmp_path, seeds=2):
    parents, children = _children(store, "abl")
    cells = collections.Counter((r.data.tags["variant"], int(r.data.tags["seed"])) for r in children)
    assert cells == collections.Counter({(v, s): 1 for v in ONLY for s in range(seeds)}), cells
    assert len(parents) == 1
    # a diverged cell is FAILED in the UI, with its outcome; every other cell FINISHED
    assert all(r.info.status == ("FAILED" if r.data.tags["outcome"] == "diverged" else "FINISHED") for r in children)
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    return children


@pytest.mark.slow(25)
def test_killed_study_resumes_without_running_a_cell_twice(store, tmp_path):
    proc = _cli(tmp_path, store)
    two_done = False
    for line in proc.stdout:
        two_done = two_done or line.startswith("cells done 2")
        if two_done and "epoch 1/2" in line:  # the third cell is half trained: kill the whole study
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = _cli(tmp_path, store)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resuming run" in out and "after epoch 1" in out  # the interrupted cell continued
    assert "cells done 6, running 0, left 0" in out
    children = _check_grid(store, tmp_path)
    client = mlflow.MlflowClient(store)
    for r in children:  # every epoch logged exactly once, including the cell that was interrupted
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_bpd")) == [1, 2]


def test_a_trial_another_worker_is_setting_up_is_passed_over():
    """Another worker's new trial has its variant and not yet its seed (params arrive one at a time):
    reading the grid's state then must not fail (it raised KeyError and killed a worker)."""
    study = optuna.create_study()
    done = study.ask()
    done.suggest_categorical("variant", ["paper", "seed-report"])
    done.suggest_categorical("seed", [0, 1])
    study.tell(done, 1.0)
    half = study.ask()
    half.suggest_categorical("variant", ["paper", "seed-report"])
    assert "seed" not in half.params
    assert ab.cell_states(study) == {(done.params["variant"], done.params["seed"]): "COMPLETE"}


def test_a_worker_whose_trial_another_worker_ended_goes_on_and_the_cell_is_recorded_once(store, tmp_path, monkeypatch):
    """Optuna's SQLite storage can hand one re-queued trial to two workers asking at once (no row
    locks); the one that cannot own the run fails the trial. The worker that trained it used to crash
    on recording it ("Cannot tell a FAIL trial"), leaving the study a worker short: it must go on, and
    the study must still end with each cell trained once and recorded."""
    from optuna.trial import TrialState

    from study.run import engine

    plan = _plan(tmp_path, store, only=ONLY[:1])  # 2 cells
    real, lost = engine.train, []

    def train_then_lose_the_trial(spec, **kw):
        result = real(spec, **kw)
        if not lost:  # the other worker handed the same trial fails it while this one trains
            other = optuna.load_study(study_name=plan.optuna_name, storage=plan.storage)
            (running,) = other.get_trials(states=(TrialState.RUNNING,))
            other.tell(running.number, state=TrialState.FAIL)
            lost.append(running.number)
        return result

    monkeypatch.setattr(engine, "train", train_then_lose_the_trial)
    lines = []
    ab.run(plan, workers=1, echo=lines.append)
    assert any(f"trial {lost[0]} was ended by another worker" in line for line in lines), lines
    _, children = _children(store, "abl")
    cells = collections.Counter((r.data.tags["variant"], int(r.data.tags["seed"])) for r in children)
    assert cells == collections.Counter({(ONLY[0], 0): 1, (ONLY[0], 1): 1})  # one run per cell
    assert sum("epoch 1/1" in line for line in lines) == 2  # the lost trial's run was not trained again
    assert any("already finished" in line for line in lines)  # but recorded on a later trial
    study = optuna.load_study(study_name=plan.optuna_name, storage=plan.storage)
    assert set(ab.cell_states(study).values()) == {"COMPLETE"}


@pytest.mark.slow(40)
def test_two_workers_share_one_storage_without_duplicates(store, tmp_path):
    # 12 cells of about 2 s: enough that a worker whose start lags on a loaded host still finds cells
    # left (with 6, one worker once took them all before the other had imported torch)
    proc = _cli(tmp_path, store, workers=2, seeds=4)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "[worker 0]" in out and "[worker 1]" in out, out
    _check_grid(store, tmp_path, seeds=4)


def test_machines_starting_together_create_one_parent(store, tmp_path, monkeypatch):
    """Three "machines" prepare the same study at once, each finding no parent: exactly one creates it,
    the others use that one. Creating is slowed by a second so that, without the claim, every one of
    them would create its own (as two machines started 3 s apart did on a loaded host)."""
    import threading
    import time

    from study.store import Store
    from study.sweep import driver

    real_create = Store.create_run

    def slow_create(*args, **kwargs):
        time.sleep(1.0)
        return real_create(*args, **kwargs)

    monkeypatch.setattr(Store, "create_run", slow_create)
    sweep = _plan(tmp_path, store).sweep
    found, errors = [], []
    start = threading.Barrier(3)

    def machine():
        try:
            start.wait()
            found.append(driver.prepare(sweep))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=machine) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    parents, _ = _children(store, "abl")
    assert len(parents) == 1 and found == [parents[0].info.run_id] * 3
    assert parents[0].info.status == "RUNNING"
    # a later machine finds it in MLflow without the claim
    assert driver.prepare(sweep) == parents[0].info.run_id


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(run_study.cli, ["ablation", "stabilizers", "--dry-run", "--seeds", "2"])
    assert result.exit_code == 0, result.output
    assert "26 variants x 2 seeds = 52 cells" in result.stdout
    for family in ("necessity", "sufficiency", "decomposition", "readings", "references"):
        assert f"[{family}]" in result.stdout
    assert "no-gradclip" in result.stdout and "grad_clip=0.0" in result.stdout
    # each member shows the one switch it changes against its family's baseline
    lines = result.stdout.splitlines()
    at = lines.index(next(x for x in lines if x.strip().startswith("no-weightnorm")))
    assert lines[at + 1].split() == ["weight_norm=False"]
    assert list(tmp_path.iterdir()) == []
    listing = CliRunner().invoke(run_study.cli, ["ablation", "--list"])
    assert "stabilizers: 26 variants" in listing.stdout and "paper-literal-exp" in listing.stdout
    assert "factorial: 16 variants" in listing.stdout and "factorial-full: 32 variants" in listing.stdout


def test_bad_ablation_requests_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args, message in [
        (["ablation", "stabilizers", "--only", "no-such"], "--only 'no-such'"),
        (["ablation", "nope", "--dry-run"], "'nope' is not one of 'stabilizers'"),
        (["ablation", "stabilizers", "--seeds", "1,x"], "give a count (3) or a comma-separated list"),
        (["ablation", "stabilizers", "--seeds", "0"], "give at least one seed"),
        (["ablation", "stabilizers", "--seeds", "1,1"], "--seeds has duplicates"),
        (["ablation", "stabilizers", "--grace", "-5"], "Invalid value for '--grace'"),
        (["ablation", "stabilizers", "--storage", "foo://bar"], "--storage 'foo://bar'"),
    ]:
        result = CliRunner().invoke(run_study.cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError):
        plan_study("stabilizers", "demo", preset_config("demo"), (0, 0))


def test_a_cell_this_device_cannot_run_is_recorded_as_skipped(store, tmp_path, monkeypatch):
    from experiments import studies
    from experiments.ablation import Variant

    gpu_only = Variant("gpu-only", "a recipe that needs CUDA", {"stabilizers.amp": "bf16"}, needs_cuda=True)
    monkeypatch.setitem(studies.STUDIES, "tiny", (STABILIZERS[0], gpu_only))
    base = apply_values(preset_config("demo"), {**TINY_RUN, "train.epochs": 1, "data.train_limit": 64})
    plan = plan_study("tiny", "demo", base, (0,), device="cpu", experiment="skip",
                        storage=f"sqlite:///{tmp_path / 'optuna.db'}", tracking_uri=store,
                        checkpoint_root=tmp_path / "ckpt")  # fmt: skip
    if plan.skipped:  # a machine with CUDA runs it: nothing to skip
        ab.run(plan, workers=1, echo=lambda s: None)
        ab.run(plan, workers=1, echo=lambda s: None)  # again: recorded once, not twice
        client = mlflow.MlflowClient(store)
        runs = client.search_runs([client.get_experiment_by_name("skip").experiment_id])
        skipped = [r for r in runs if r.data.tags.get("variant") == "gpu-only"]
        assert len(skipped) == 1 and skipped[0].data.tags["outcome"] == "skipped"
        assert skipped[0].data.tags["skip_reason"] == "needs CUDA" and skipped[0].info.status == "KILLED"
        assert skipped[0].data.tags["mlflow.parentRunId"] == _children(store, "skip")[0][0].info.run_id
        assert "needs CUDA" in skipped[0].data.tags["mlflow.note.content"]
