"""The long-run statistics against hand computations and planted components: the seed report's window
statistic, its real length on a short run, the split of its spread into epoch noise and seeds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import longrun
from study.store import Store


def _history(curves: dict[tuple[str, int], list[float]], train_offset: float = -0.1) -> pd.DataFrame:
    rows = []
    for (variant, seed), values in curves.items():
        for epoch, v in enumerate(values, start=1):
            rows.append({"run_id": f"{variant}-{seed}", "variant": variant, "seed": seed, "epoch": epoch, "val_bpd": v,
                         "train_bpd": v + train_offset, "nonfinite_events": 0.0})  # fmt: skip
    return pd.DataFrame(rows)


def test_the_window_statistic_is_the_mean_and_std_of_epochs_61_to_100_by_hand():
    values = [5.0 - 0.01 * e + (0.05 if e % 3 == 0 else -0.02) for e in range(1, 101)]
    w = longrun.window_stats(_history({("a", 0): values})).iloc[0]
    window = values[60:]  # epochs 61..100
    mean = sum(window) / 40
    std = math.sqrt(sum((v - mean) ** 2 for v in window) / 40)  # divides by n, as stated in the module
    assert w["used"] == 40 and w["epochs"] == 100 and w["span"] == "epochs 61-100"
    assert w["mean"] == pytest.approx(mean, abs=1e-12) and w["std"] == pytest.approx(std, abs=1e-12)
    assert w["std1"] == pytest.approx(std * math.sqrt(40 / 39), abs=1e-12)
    # epoch 60 must not be in it: move it and nothing changes
    moved = list(values)
    moved[59] += 10.0
    assert longrun.window_stats(_history({("a", 0): moved})).iloc[0]["mean"] == pytest.approx(mean, abs=1e-12)


def test_a_run_shorter_than_the_window_is_labelled_with_its_real_length():
    w = longrun.window_stats(_history({("a", 0): [5.0, 4.8, 4.7, 4.65, 4.6, 4.58]})).iloc[0]
    assert w["used"] == 6 and w["span"] == "epochs 1-6 (6 of the 40 wanted)"
    assert "last 40" not in w["span"] and w["mean"] == pytest.approx(sum([5.0, 4.8, 4.7, 4.65, 4.6, 4.58]) / 6)
    assert longrun.window_span(40, 100) == "epochs 61-100"
    assert longrun.window_span(39, 39) == "epochs 1-39 (39 of the 40 wanted)"


def test_a_non_finite_epoch_in_the_window_is_counted_not_dropped():
    values = [4.0] * 100
    values[80] = float("nan")
    w = longrun.window_stats(_history({("a", 0): values})).iloc[0]
    assert w["nonfinite"] == 1 and math.isnan(w["mean"])
    split = longrun.variance_split(_history({("a", 0): values, ("a", 1): [4.0] * 100}))
    assert split.iloc[0]["left_out"] == 1 and split.iloc[0]["runs"] == 2


@pytest.mark.parametrize("seed_sd", [0.0, 0.05])
def test_the_variance_split_recovers_planted_noise_and_seed_components(seed_sd):
    rng = np.random.default_rng(7)
    noise_sd, runs = 0.137, 400
    curves = {("a", s): list(4.0 + rng.normal(0, seed_sd) + rng.normal(0, noise_sd, 100)) for s in range(runs)}
    row = longrun.variance_split(_history(curves)).iloc[0]
    assert row["K"] == 40 and row["runs"] == runs and row["left_out"] == 0
    assert row["within_sd"] == pytest.approx(noise_sd, rel=0.03)
    assert row["lag1"] < 0.05  # independent epochs (clipped at 0 below)
    # between-seed sd of a window mean: the seed component plus noise / sqrt(40)
    assert row["between_sd"] == pytest.approx(math.sqrt(seed_sd**2 + noise_sd**2 / 40), rel=0.1)
    assert row["seed_sd"] == pytest.approx(seed_sd, abs=0.01)


def test_autocorrelated_epochs_are_not_mistaken_for_seed_differences():
    """Slow epoch-to-epoch wander (AR(1), r = 0.8) moves a window mean more than independent noise would;
    the split must not credit that to the seeds."""
    rng = np.random.default_rng(3)
    r, sd = 0.8, 0.1
    curves = {}
    for s in range(400):
        e = np.zeros(100)
        e[0] = rng.normal(0, sd)
        for t in range(1, 100):
            e[t] = r * e[t - 1] + rng.normal(0, sd * math.sqrt(1 - r * r))
        curves[("a", s)] = list(4.0 + e)
    row = longrun.variance_split(_history(curves)).iloc[0]
    assert row["lag1"] == pytest.approx(r, abs=0.15)
    # read as independent epochs, the noise would explain within_sd^2 / 40 of the window means' variance
    # and the seeds the rest (about 90% here); the AR(1) reading leaves the seeds under a fifth of it
    naive = max(0.0, row["between_sd"] ** 2 - row["within_sd"] ** 2 / 40)
    assert naive > 0.8 * row["between_sd"] ** 2
    assert row["seed_sd"] ** 2 < 0.2 * row["between_sd"] ** 2, row.to_dict()


def test_overfitting_and_the_best_epoch():
    values = [5.0, 4.5, 4.2, 4.1, 4.05, 4.0, 4.02, 4.08]
    o = longrun.overfitting(_history({("a", 0): values}, train_offset=-0.2), early=6).iloc[0]
    assert o["best_epoch"] == 6 and o["best_val"] == 4.0 and o["last_above_best"] == pytest.approx(0.08)
    assert o["gap_early"] == pytest.approx(0.2) and o["gap_last"] == pytest.approx(0.2)


def test_late_events_are_counted_by_when_they_happened():
    h = _history({("a", 0): [4.0] * 100, ("a", 1): [4.0] * 100})
    h.loc[(h["seed"] == 0) & (h["epoch"].isin([3, 70, 90])), "nonfinite_events"] = 1.0
    h.loc[(h["seed"] == 1) & (h["epoch"] == 30), "nonfinite_events"] = 2.0
    runs = pd.DataFrame({"run_id": ["a-0", "a-1"], "variant": "a", "outcome": ["recovered", "recovered"],
                         "first_nonfinite_epoch": [3, 30], "train.epochs": 100})  # fmt: skip
    e = longrun.late_events(h, runs).iloc[0]
    assert e["recovered, epochs 1-6"] == 1 and e["recovered, epochs 7-60"] == 2
    assert e["recovered, epochs 61-100"] == 2 and e["runs recovered"] == 2 and e["runs diverged (at epoch)"] == "0"


# --- the report's long-run sections, from a real MLflow store ----------------------------------------------

RECIPES = ("seed-report", "paper", "exp+softplus")


def _long_study(store: str, epochs: int = 100, experiment: str = "long") -> None:
    """A long-run study in a real store: paper 0.2 bits/dim worse than seed-report up to epoch 10 and
    level with it from epoch 30 on; exp+softplus 0.1 better throughout; seeds 0.01 apart, epoch noise."""
    import mlflow
    from mlflow.entities import Metric, Param

    from experiments.presets import PRESETS
    from experiments.studies import find_variant
    from study.config import Config, apply_values, flatten

    client = mlflow.MlflowClient(store)
    exp = client.create_experiment(experiment)
    parent = client.create_run(exp, tags={"kind": "study-parent", "study": "long-run", "preset": "cifar-long",
                                          "git_commit": "abc", "cells_planned": "9"}).info.run_id  # fmt: skip
    rng = np.random.default_rng(0)
    for v in RECIPES:
        values = {**PRESETS["cifar-long"], "train.epochs": epochs, **find_variant(v).overrides}
        cfg = flatten(apply_values(Config(), values))
        for s in range(3):
            run = client.create_run(exp, tags={"variant": v, "seed": str(s), "outcome": "completed", "device": "cpu",
                                               "mlflow.parentRunId": parent, "git_commit": "abc",
                                               "preset": "cifar-long"}).info.run_id  # fmt: skip
            metrics = []
            for e in range(1, epochs + 1):
                gap = {"paper": 0.2 if e <= 10 else max(0.0, 0.2 - 0.01 * (e - 10)), "exp+softplus": -0.1}.get(v, 0.0)
                val = 4.0 + 1.5 * math.exp(-e / 8) + gap + 0.01 * s + rng.normal(0, 0.02)
                metrics += [Metric("val_bpd", val, 0, e), Metric("train_bpd", val - 0.05 - 0.001 * e, 0, e),
                            Metric("images_per_s", 100.0, 0, e), Metric("nonfinite_events", 0.0, 0, e)]  # fmt: skip
            metrics.append(Metric("test_bpd", 4.0 + {"exp+softplus": -0.1}.get(v, 0.0) + 0.01 * s, 0, epochs))
            for i in range(0, len(metrics), 900):
                client.log_batch(run, metrics=metrics[i : i + 900])
            client.log_batch(run, params=[Param(k, str(x)) for k, x in cfg.items()])
            client.set_terminated(run, "FINISHED")


@pytest.mark.slow(20)
def test_a_long_study_reports_table_2_and_which_short_run_verdicts_held(store, tmp_path):
    from analysis.report import generate_report

    _long_study(store)
    _long_study(store, epochs=6, experiment="short")  # a committed 6-epoch study to stand beside it
    readme = generate_report(Store(store), "long", tmp_path / "r", window=40, run_audit=False, command="x",
                             beside=((Store(store), "short"),))  # fmt: skip
    text = readme.read_text()
    assert "## The seed report's Table 2, in form" in text and "**Reduced scale.**" in text
    assert "epochs 61-100" in text and "| 3.47 | 0.137 |" in text and "| 3.49 |" in text
    assert "test bpd, `short` (6 epochs)" in text  # the short study's figures beside
    assert "## What 100 epochs change" in text and (tmp_path / "r" / "figures" / "long_run.png").exists()
    findings = text[text.index("<!-- findings:start -->"):text.index("<!-- findings:end -->")]
    # paper: worse than seed-report at epoch 6, level over epochs 61-100: the short verdict did not hold
    paper = next(line for line in findings.splitlines() if line.startswith("- `paper` vs `seed-report`"))
    assert "effect (worse) at epoch 6" in paper and "**did not hold**" in paper, paper
    softplus = next(line for line in findings.splitlines() if line.startswith("- `exp+softplus` vs `seed-report`"))
    assert "effect (better) at epoch 6" in softplus and ": held." in softplus, softplus
    assert "validation bits/dim over epochs 61-100" in findings
    # a short study keeps the short report: no Table 2, its window labelled by its real length
    short = generate_report(Store(store), "short", tmp_path / "s", window=40, run_audit=False, command="x").read_text()
    assert "Table 2, in form" not in short and "last 6 of 6 epochs" in short


def test_a_short_verdict_held_resolved_or_did_not_hold():
    """An inconclusive 6-epoch reading claims nothing, so a typed window verdict resolves it; a typed
    reading holds only with the same type and direction."""
    assert longrun.verdict_change("effect", "better", "effect", "better") == "held"
    assert longrun.verdict_change("inconclusive", "", "inconclusive", "") == "held"
    assert longrun.verdict_change("inconclusive", "", "equivalent", "") == "resolved"
    assert longrun.verdict_change("inconclusive", "", "effect", "worse") == "resolved"
    assert longrun.verdict_change("effect", "worse", "equivalent", "") == "did not hold"
    assert longrun.verdict_change("effect", "worse", "effect", "better") == "did not hold"
    assert longrun.verdict_change("equivalent", "", "inconclusive", "") == "did not hold"
