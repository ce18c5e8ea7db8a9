"""Statistics a reviewer accepts: intervals whose coverage holds at n = 3 (checked by simulation),
Holm by hand, TOST, the window named for what it is, every failure counted, runs pooled by their
configuration and never by their tag alone, and verdicts only from corrected tests and activity."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.stats import (
    failures,
    holm,
    last_window,
    paired_effect,
    paired_t_pvalue,
    summarize,
    t_interval,
    tost,
    variant_table,
    window_label,
)


def _history(values_by_run):
    return pd.DataFrame(
        [{"run_id": r, "epoch": e + 1, "val_bpd": v} for r, vals in values_by_run.items() for e, v in enumerate(vals)]
    )


# --- intervals -----------------------------------------------------------------------------------


def test_t_interval_matches_scipy_and_is_not_min_max():
    x = np.array([4.10, 4.31, 4.05])
    lo, hi = t_interval(x)
    ref = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert (lo, hi) == pytest.approx(ref, rel=1e-12)
    assert lo < x.min() and hi > x.max()  # at n = 3 the 95% interval is wider than the data (t = 4.303)
    assert all(math.isnan(v) for v in t_interval([1.0]))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_t_interval_covers_the_true_mean_95_percent_of_the_time(n):
    """2,000 synthetic normal studies at the study's n: the stated 95% must be 93-97% (a percentile
    bootstrap gives about 75% at n = 3 and 50% at n = 2)."""
    rng = np.random.default_rng(1234 + n)
    mu, sigma, trials = 4.7, 0.05, 2000
    samples = rng.normal(mu, sigma, size=(trials, n))
    covered = 0
    for s in samples:
        lo, hi = t_interval(s)
        covered += lo <= mu <= hi
    assert 0.93 <= covered / trials <= 0.97, covered / trials
    # the bootstrap this replaced, for the record: min-max at n = 3 covers far less
    if n == 3:
        minmax = np.mean((samples.min(1) <= mu) & (mu <= samples.max(1)))
        assert 0.70 <= minmax <= 0.80


def test_summarize_counts_only_finite_values():
    s = summarize([1.0, 2.0, 3.0, float("nan"), float("inf")])
    assert s["n"] == 3 and s["mean"] == 2.0 and s["std"] == 1.0
    assert (s["ci_lo"], s["ci_hi"]) == pytest.approx(t_interval([1.0, 2.0, 3.0]))


def test_paired_t_pvalue_known_value_and_degenerate_cases():
    # diffs 1, 2, 3: t = 2 / (1 / sqrt 3) = 3.4641 with 2 df -> two-sided p = 0.07418
    assert math.isclose(paired_t_pvalue([1.0, 2.0, 3.0]), 0.0741799, rel_tol=1e-5)
    assert math.isnan(paired_t_pvalue([1.0]))
    assert paired_t_pvalue([0.0, 0.0]) == 1.0 and paired_t_pvalue([0.2, 0.2, 0.2]) == 0.0


def test_paired_effect_reports_scipys_paired_t_and_t_interval():
    base, variant = [4.10, 4.31, 4.05], [4.22, 4.30, 4.33]
    per_run = pd.DataFrame(
        [{"variant": "a", "seed": s, "outcome": "completed", "v": v} for s, v in enumerate(base)]
        + [{"variant": "b", "seed": s, "outcome": "completed", "v": v} for s, v in enumerate(variant)]
    )
    e = paired_effect(per_run, "v", "b", "a")
    diffs = np.subtract(variant, base)
    assert math.isclose(e["p_value"], stats.ttest_rel(variant, base).pvalue, rel_tol=1e-9)
    assert not math.isclose(e["p_value"], stats.ttest_ind(variant, base).pvalue, rel_tol=1e-3)  # paired, not unpaired
    ref = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (e["ci_lo"], e["ci_hi"]) == pytest.approx(ref, rel=1e-9)
    assert e["n_pairs"] == 3 and not e["identical"] and e["mde"] > abs(e["mean_diff"]) * 0  # a number
    from statsmodels.stats.power import TTestPower

    d = TTestPower().solve_power(nobs=3, alpha=0.05, power=0.8)
    assert e["mde"] == pytest.approx(d * diffs.std(ddof=1), rel=1e-9)


def test_paired_effect_leaves_out_unfinished_pairs_and_says_so():
    per_run = pd.DataFrame([
        {"variant": "a", "seed": 0, "outcome": "completed", "v": 4.0},
        {"variant": "a", "seed": 1, "outcome": "completed", "v": 4.1},
        {"variant": "a", "seed": 2, "outcome": "completed", "v": 4.2},
        {"variant": "b", "seed": 0, "outcome": "completed", "v": 4.0},
        {"variant": "b", "seed": 1, "outcome": "diverged", "v": float("nan")},
        {"variant": "b", "seed": 2, "outcome": "completed", "v": 4.2},
    ])  # fmt: skip
    e = paired_effect(per_run, "v", "b", "a")
    assert e["n_pairs"] == 2 and e["excluded"] == 1 and e["identical"] and e["mean_diff"] == 0.0


# --- many comparisons ----------------------------------------------------------------------------


def test_holm_by_hand():
    # m = 4 (the NaN is not a test): sorted 0.01, 0.02, 0.04, 0.30 -> x4, x3, x2, x1, made monotone
    adjusted = holm([0.04, 0.01, float("nan"), 0.30, 0.02])
    expected = [0.08, 0.04, float("nan"), 0.30, 0.06]
    assert np.allclose(adjusted, expected, equal_nan=True)
    assert holm([0.9, 0.8])[0] == 1.0 or np.allclose(holm([0.9, 0.8]), [0.9, 0.9])  # capped, monotone
    from statsmodels.stats.multitest import multipletests

    p = np.array([0.001, 0.2, 0.013, 0.04, 0.5, 0.0001])
    assert np.allclose(holm(p), multipletests(p, method="holm")[1])


def test_tost_against_a_target():
    rng = np.random.default_rng(0)
    close = rng.normal(3.49, 0.01, size=5)
    far = rng.normal(3.70, 0.01, size=5)
    assert tost(close, 3.49, 0.05)["p"] < 0.05  # equivalent within the margin
    assert tost(far, 3.49, 0.05)["p"] > 0.5
    t = tost(close, 3.49, 0.05)
    lo, hi = t_interval(close, 0.90)
    assert (t["ci90_lo"], t["ci90_hi"]) == pytest.approx((lo, hi)) and 3.44 < lo and hi < 3.54


# --- windows -------------------------------------------------------------------------------------


def test_last_window_edges_final_value_and_label():
    h = _history({"a": [5.0, 4.0, 3.0, 2.0]})
    at = {w: last_window(h, window=w).iloc[0] for w in (1, 3, 4, 9)}
    assert at[1]["window_mean"] == 2.0 and at[1]["window_used"] == 1 and at[1]["window_std"] == 0.0
    assert at[3]["window_mean"] == 3.0 and at[3]["window_used"] == 3  # epochs 2-4, not 1-3
    assert at[9]["window_mean"] == 3.5 and at[9]["window_used"] == 4 and at[9]["epochs"] == 4
    assert at[9]["final"] == 2.0
    assert last_window(h.sample(frac=1.0, random_state=0), window=3).iloc[0]["window_mean"] == 3.0
    assert window_label(40, 100, 40) == "last 40 epochs"
    assert window_label(6, 6, 40) == "last 6 of 6 epochs"


def test_a_non_finite_epoch_in_the_window_is_not_dropped():
    h = _history({"a": [5.0, float("nan"), 3.0], "b": [5.0, float("inf"), 3.0]})
    w = last_window(h, window=3).set_index("run_id")
    assert math.isnan(w.loc["a", "window_mean"]) and w.loc["a", "nonfinite"] == 1
    assert math.isinf(w.loc["b", "window_mean"]) and w.loc["b", "nonfinite"] == 1


# --- every run counted ------------------------------------------------------------------------------


def test_every_kind_of_failure_is_planted_and_counted():
    nan, inf = float("nan"), float("inf")
    runs = pd.DataFrame([
        {"run_id": "ok", "variant": "x", "outcome": "completed", "test_bpd": 4.0, "first_nonfinite_epoch": None},
        {"run_id": "div", "variant": "x", "outcome": "diverged", "test_bpd": nan, "first_nonfinite_epoch": "2"},
        {"run_id": "allnan", "variant": "x", "outcome": "completed", "test_bpd": nan, "first_nonfinite_epoch": None},
        {"run_id": "inf", "variant": "x", "outcome": "completed", "test_bpd": inf, "first_nonfinite_epoch": None},
        {"run_id": "onenan", "variant": "x", "outcome": "recovered", "test_bpd": 4.2, "first_nonfinite_epoch": "1"},
        {"run_id": "skip", "variant": "x", "outcome": "skipped", "test_bpd": nan, "first_nonfinite_epoch": None},
        {"run_id": "crash", "variant": "x", "outcome": "unfinished", "test_bpd": nan, "first_nonfinite_epoch": None},
    ])  # fmt: skip
    hist = _history({"ok": [5.0, 4.0], "div": [5.0], "allnan": [nan, nan], "inf": [5.0, inf],
                     "onenan": [5.0, nan, 4.0], "crash": [5.0]})  # fmt: skip
    f = failures(runs, hist).iloc[0]
    assert f["runs"] == 7 and f["completed"] == 3 and f["recovered"] == 1 and f["diverged"] == 1
    assert f["skipped"] == 1 and f["unfinished"] == 1
    assert f["nonfinite_val"] == 3  # allnan, inf, onenan
    assert f["all_nan_val"] == 1  # allnan (the skipped run has no history and is not counted here)
    assert f["infinite"] == 1 and f["nonfinite_test"] == 2  # allnan's NaN test, inf's inf test
    assert f["first_nonfinite_epoch"] == 1
    table = variant_table(runs.assign(seed=range(7), images_per_s=1.0), hist, window=2).iloc[0]
    # means over finished runs with finite values only, and the n says how many
    assert table["finished"] == 4 and table["test_n"] == 2 and table["test_mean"] == pytest.approx(4.1)
    assert math.isnan(table["val_mean"]) or table["val_n"] < 4  # a non-finite window is not averaged in


def test_a_run_whose_config_disagrees_with_its_variant_is_not_pooled():
    from analysis.collect import pooling_check
    from experiments.ablation import SEED_REPORT
    from study.config import Config, apply_values, flatten

    base = {k: str(v) for k, v in flatten(Config()).items()}

    def row(run_id, variant, seed, **changes):
        cfg = apply_values(Config(), {**SEED_REPORT, "train.seed": seed, **changes})
        return {"run_id": run_id, "parent_run_id": "p", "variant": variant, "seed": seed, "outcome": "completed",
                "end_time": int(run_id[-1]), **flatten(cfg)}  # fmt: skip

    runs = pd.DataFrame([
        row("r1", "seed-report", 0),
        row("r2", "seed-report", 1, **{"stabilizers.grad_clip": 0.0}),  # drifted: really no-gradclip
        row("r3", "made-up", 2),
        row("r4", "seed-report", 0),  # a second run of the same cell, newer
        row("r5", "no-gradclip", 1, **{"stabilizers.grad_clip": 0.0}),
    ])  # fmt: skip
    why = dict(zip(runs["run_id"], pooling_check(runs, {"p": base}), strict=True))
    assert why["r5"] == "" and why["r4"] == ""
    assert why["r2"].startswith("config disagrees with its variant") and "grad_clip" in why["r2"]
    assert "not a known variant" in why["r3"]
    assert why["r1"].startswith("duplicate")  # the older of two runs of one cell


# --- verdicts ------------------------------------------------------------------------------------


def _family_runs():
    """Three variants over 3 seeds: 'base'; 'same' bit-identical to it; 'worse' +0.2 on every seed with
    a little noise; their only switches differ as the names say."""
    rows, hist = [], []
    for s in range(3):
        for name, shift, clip in (("base", 0.0, 100.0), ("same", 0.0, 100.0), ("worse", 0.2 + 0.01 * s, 0.0)):
            run_id = f"{name}{s}"
            value = 4.0 + 0.05 * s + shift
            rows.append({"run_id": run_id, "variant": name, "seed": s, "outcome": "completed",
                         "test_bpd": value, "stabilizers.grad_clip": clip,
                         "stabilizers.input_clamp": 0.0 if name == "same" else 3.0})  # fmt: skip
            hist.append({"run_id": run_id, "epoch": 1, "val_bpd": value, "clip_fraction": 1.0 if clip else 0.0,
                         "input_clamp_fraction": 0.0})  # fmt: skip
    return pd.DataFrame(rows), pd.DataFrame(hist)


def test_verdicts_come_from_activity_and_corrected_tests():
    from analysis.comparisons import family_comparisons, sentence
    from experiments.ablation import Family

    runs, hist = _family_runs()
    fam = Family("f", "?", "base", ("base", "same", "worse"))
    c = family_comparisons(runs, hist, [fam]).set_index("variant")
    # input clamp never moved a value, and identical results
    assert c.loc["same", "verdict"] == "inconclusive: did not act" and c.loc["same", "verdict_type"] == "inconclusive"
    assert c.loc["worse", "acted"] and c.loc["worse", "verdict"] == "effect: worse"
    # Holm counts both declared comparisons, the untested one as p = 1: the only test is doubled
    assert c.loc["worse", "m"] == 2 and math.isnan(c.loc["same", "p_holm"])
    assert c.loc["worse", "p_holm"] == pytest.approx(min(1.0, 2 * c.loc["worse", "p_value"]))
    assert "did not act" in sentence(c.reset_index().iloc[0]) and "no effect" not in sentence(c.reset_index().iloc[0])
    assert "**effect**, worse" in sentence(c.reset_index().iloc[1])


def test_failing_to_train_is_compared_by_fishers_exact_test_holm_corrected():
    """The sufficiency question (which addition makes a failing recipe train) is a comparison of failure
    counts: Fisher's exact test on them, by hand, corrected within the family."""
    from analysis.comparisons import family_comparisons, sentence
    from experiments.ablation import Family

    rows, hist = [], []
    for s in range(6):  # 'fails' diverges on every seed, 'fixed' on none, 'half' on seeds 0-2
        for name, diverged in (("fails", True), ("fixed", False), ("half", s < 3)):
            rows.append({"run_id": f"{name}{s}", "variant": name, "seed": s,
                         "outcome": "diverged" if diverged else "completed",
                         "test_bpd": math.nan if diverged else 4.0 + 0.01 * s + (name == "half") * 0.1,
                         "stabilizers.grad_clip": 100.0 if name != "fails" else 0.0})  # fmt: skip
            hist.append({"run_id": f"{name}{s}", "epoch": 1, "val_bpd": 4.0, "clip_fraction": float(name != "fails")})
    fam = Family("suff", "?", "fails", ("fails", "fixed", "half"))
    c = family_comparisons(pd.DataFrame(rows), pd.DataFrame(hist), [fam]).set_index("variant")
    # 0/6 against 6/6 failed: p = 2 / C(12, 6) = 2/924; 3/6 against 6/6: p = 2 * C(6,3)C(6,6)/C(12,9) = 40/220
    assert c.loc["fixed", "fail_p"] == pytest.approx(2 / 924)
    assert c.loc["half", "fail_p"] == pytest.approx(2 * 20 / 220)
    assert c.loc["fixed", "fail_p_holm"] == pytest.approx(2 * 2 / 924)  # the smaller of two, times 2
    assert c.loc["half", "fail_p_holm"] == pytest.approx(40 / 220)
    text = sentence(c.reset_index().iloc[0])
    assert "Failing to train: 0/6 runs against 6/6" in text and "Holm 0.004: effect" in text
    assert "Holm 0.182: inconclusive" in sentence(c.reset_index().iloc[1])
    assert math.isnan(family_comparisons(*_family_runs(), [Family("f", "?", "base", ("base", "worse"))])["fail_p"][0])
