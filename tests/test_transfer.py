"""The scale ladder's measures (analysis/transfer.py) against hand computations and statsmodels, on
synthetic ladders whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis import transfer

LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def _runs(table: dict[tuple[str, str, int], list[float | str | None]]) -> pd.DataFrame:
    """Runs of a ladder: (rung, recipe, seed) -> final val bits/dim per learning rate, None = diverged, a
    string = that result (study.run.outcome's keys)."""
    rows = []
    for (rung, recipe, seed), values in table.items():
        for lr, v in zip(LRS, values, strict=True):
            result = "trained" if isinstance(v, float) else "diverges-in-training" if v is None else v
            rows.append({"variant": f"{rung}/{recipe}/lr{lr:g}", "seed": seed, "run_id": f"{rung}{recipe}{lr}{seed}",
                         "result": result, "val_bpd": v if isinstance(v, float) else math.nan})  # fmt: skip
    return pd.DataFrame(rows)


def test_curves_count_every_run_and_a_failure_has_no_figure():
    runs = _runs({("16x2", "paper", 0): [5.0, 4.6, 4.3, 4.4, 4.9, None],
                  ("8x2", "paper", 0): [5.1, 4.7, 4.4, 4.5, None, None]})  # fmt: skip
    c = transfer.lr_curves(runs)
    assert len(c) == 12 and list(c["rung"].unique()) == ["8x2", "16x2"]  # by size, not as text
    assert c["failed"].sum() == 3 and c.loc[c["failed"], "val_bpd"].isna().all()
    row = c[(c.rung == "16x2") & (c.lr == 3e-3)].iloc[0]
    assert row["val_bpd"] == 4.4 and row["recipe"] == "paper" and not row["failed"]


def test_largest_stable_lr_is_the_top_of_the_grid_where_every_seed_trained():
    runs = _runs({("8x2", "paper", 0): [5.0, 4.6, 4.3, 4.4, 4.9, None],
                  ("8x2", "paper", 1): [5.0, 4.6, 4.3, None, 4.8, None],  # one seed fails at 3e-3, recovers at 1e-2
                  ("8x2", "seed-report-fp32", 0): [5.0, 4.6, 4.3, 4.4, 4.9, 5.5],
                  ("8x2", "seed-report-fp32", 1): [5.0, 4.6, 4.3, 4.4, 4.9, 5.6]})  # fmt: skip
    s = transfer.largest_stable_lr(transfer.lr_curves(runs)).set_index("recipe")
    assert s.loc["paper", "largest_stable_lr"] == 1e-3 and s.loc["paper", "first_unstable_lr"] == 3e-3
    assert s.loc["paper", "unstable_runs"] == s.loc["paper", "failed_runs"] == 3 and not s.loc["paper", "stable_to_top"]
    assert s.loc["seed-report-fp32", "largest_stable_lr"] == 3e-2 and s.loc["seed-report-fp32", "stable_to_top"]
    assert math.isnan(s.loc["seed-report-fp32", "first_unstable_lr"])


def test_too_slow_below_the_best_rate_is_a_failure_but_no_instability():
    """Worse than uniform at 1e-4 (3 epochs too few at that step size): it fails to train and scores L0 in LR
    sensitivity, but does not end the stable range; worse than uniform above the best rate does."""
    runs = _runs({("8x2", "paper", 0): ["trains-badly", 6.0, 4.3, 4.4, "trains-badly", None],
                  ("8x2", "paper", 1): ["trains-badly", 6.1, 4.2, 4.5, 4.9, "fails-in-eval"]})  # fmt: skip
    c = transfer.lr_curves(runs)
    assert c["failed"].sum() == 5 and c["unstable"].sum() == 3
    assert not c.loc[c["lr"] == 1e-4, "unstable"].any() and c.loc[c["lr"] == 1e-4, "failed"].all()
    s = transfer.largest_stable_lr(c).iloc[0]
    assert s["largest_stable_lr"] == 3e-3 and s["first_unstable_lr"] == 1e-2
    assert (s["unstable_runs"], s["failed_runs"], s["runs"]) == (3, 5, 12)
    nothing = transfer.lr_curves(_runs({("8x2", "paper", 0): ["trains-badly"] * 5 + [None]}))
    assert nothing["unstable"].all()  # with no run trained there is no best rate: every failure counts


def test_a_run_no_better_than_uniform_on_validation_fails_on_the_curve_whatever_its_test():
    """The curve plots the final validation bits/dim; a run whose recorded result is *trained* (judged on
    its test bits/dim) but whose validation is >= 8 bits/dim (the ladder saw 34.3 against test 7.04) is a
    failure there, and above the best rate an instability."""
    runs = _runs({("16x2", "no-gradclip-fp32", 0): [6.0, 5.4, 5.0, 5.1, 14.1, 8.3]})
    c = transfer.lr_curves(runs)
    assert list(c["result"])[-2:] == ["trains-badly"] * 2 and list(c["failed"]) == [False] * 4 + [True] * 2
    assert c.loc[c["failed"], "val_bpd"].isna().all() and list(c["unstable"]) == [False] * 4 + [True] * 2
    s = transfer.largest_stable_lr(c).iloc[0]
    assert s["largest_stable_lr"] == 3e-3 and s["first_unstable_lr"] == 1e-2


def test_lr_sensitivity_by_hand():
    """L = [5.0, 4.5, 4.2, 4.4, diverged, 7.0], L0 = 6.0: min(L, L0) = [5.0, 4.5, 4.2, 4.4, 6.0, 6.0],
    best 4.2, sensitivity = mean([0.8, 0.3, 0, 0.2, 1.8, 1.8]) = 4.9 / 6."""
    runs = _runs({("8x2", "paper", 0): [5.0, 4.5, 4.2, 4.4, None, 7.0],
                  ("8x2", "paper", 1): [4.3, 4.3, 4.3, 4.3, 4.3, 4.3],  # flat: 0
                  ("8x2", "exp+zero-init", 0): [None] * 6})  # fmt: skip
    init = pd.DataFrame({"rung": "8x2", "recipe": ["paper", "paper", "exp+zero-init"], "seed": [0, 1, 0],
                         "init_bpd": [6.0, 6.5, 6.0]})  # fmt: skip
    s = transfer.lr_sensitivity(transfer.lr_curves(runs), init).set_index(["recipe", "seed"])
    assert s.loc[("paper", 0), "sensitivity"] == pytest.approx(4.9 / 6)
    assert s.loc[("paper", 0), "best_lr"] == 1e-3 and s.loc[("paper", 0), "best_bpd"] == 4.2
    assert s.loc[("paper", 1), "sensitivity"] == pytest.approx(0.0)
    assert math.isnan(s.loc[("exp+zero-init", 0), "sensitivity"])  # nothing trained: no best to measure from
    agg = transfer.over_seeds(s.reset_index(), "sensitivity").set_index("recipe")
    assert agg.loc["paper", "mean"] == pytest.approx(4.9 / 12) and agg.loc["paper", "n"] == 2
    half = 12.706204736 * np.std([4.9 / 6, 0.0], ddof=1) / math.sqrt(2)  # t(0.975, 1 df)
    assert agg.loc["paper", "ci_hi"] - agg.loc["paper", "mean"] == pytest.approx(half, rel=1e-6)


def test_differences_pair_each_recipe_with_the_baseline_by_seed():
    runs = _runs({("8x2", "seed-report-fp32", 0): [5.0, 4.6, 4.3, 4.4, 4.9, 5.5],
                  ("8x2", "paper", 0): [4.9, 4.5, 4.1, 4.2, None, None]})  # fmt: skip
    curves = transfer.lr_curves(runs)
    init = pd.DataFrame({"rung": "8x2", "recipe": ["seed-report-fp32", "paper"], "seed": 0, "init_bpd": 6.0})
    d = transfer.differences(curves, transfer.lr_sensitivity(curves, init)).iloc[0]
    assert d["recipe"] == "paper" and d["d_best"] == pytest.approx(4.1 - 4.3)
    assert d["d_unstable"] == pytest.approx(2 / 6)
    base = np.mean([0.7, 0.3, 0.0, 0.1, 0.6, 1.2])
    paper = np.mean([0.8, 0.4, 0.0, 0.1, 1.9, 1.9])
    assert d["d_sensitivity"] == pytest.approx(paper - base)


def test_the_trend_and_its_prediction_agree_with_statsmodels():
    import statsmodels.api as sm

    rng = np.random.default_rng(0)
    x = np.repeat(np.log10([2.0e4, 8.0e4, 3.2e5]), 2)
    y = 0.05 - 0.03 * x + rng.normal(0, 0.01, len(x))
    at = math.log10(1.9e7)
    fit = transfer.trend(x, y, at)
    ols = sm.OLS(y, sm.add_constant(x)).fit()
    assert fit["slope"] == pytest.approx(ols.params[1])
    lo, hi = ols.conf_int(0.05)[1]
    assert (fit["slope_lo"], fit["slope_hi"]) == pytest.approx((lo, hi))
    assert fit["p"] == pytest.approx(ols.pvalues[1])
    pred = ols.get_prediction(np.array([[1.0, at]])).summary_frame(alpha=0.05).iloc[0]
    assert fit["predicted"] == pytest.approx(pred["mean"])
    assert (fit["pred_lo"], fit["pred_hi"]) == pytest.approx((pred["obs_ci_lower"], pred["obs_ci_upper"]))
    assert fit["n"] == 6 and fit["x_max"] < at  # an extrapolation: the paper's size lies past the rungs


def test_a_trend_needs_three_points_and_a_spread():
    assert math.isnan(transfer.trend([1.0, 2.0], [0.1, 0.2], 3.0)["slope"])
    assert math.isnan(transfer.trend([1.0, 1.0, 1.0], [0.1, 0.2, 0.3], 3.0)["slope"])


def test_trends_recover_a_planted_slope_per_recipe():
    weights = {"8x2": 20_000, "16x2": 80_000, "32x2": 320_000}
    rows = []
    for rung, w in weights.items():
        for seed in (0, 1):
            lw = math.log10(w)
            rows.append({"rung": rung, "recipe": "paper", "seed": seed, "d_best": -0.1 * lw + 0.001 * seed,
                         "d_sensitivity": 0.2, "d_unstable": 0.0})  # fmt: skip
    t = transfer.trends(pd.DataFrame(rows), weights, 19_000_000).set_index("measure")
    assert t.loc["d_best", "slope"] == pytest.approx(-0.1, abs=1e-9) and t.loc["d_best", "rungs"] == 3
    assert t.loc["d_best", "predicted"] == pytest.approx(-0.1 * math.log10(19e6) + 0.0005, abs=1e-9)
    assert t.loc["d_sensitivity", "slope"] == pytest.approx(0.0, abs=1e-12)


def test_the_loss_at_initialisation_is_the_seeds_model_before_any_step():
    """Rebuilt from the runs' recorded configs: one figure per (rung, recipe, seed) whatever the learning
    rate, equal to evaluating study.run.state.new_state's model directly, and capped at 8 bits/dim."""
    import torch

    from experiments.presets import preset_config
    from study.config import apply_values, flatten
    from study.data import load_splits
    from study.run.state import new_state
    from study.run.step import evaluate
    from tests.conftest import TINY_RUN

    base = apply_values(preset_config("demo"), {**TINY_RUN, "data.train_limit": 64})
    rows = []
    for seed in (0, 1):
        for lr in (1e-4, 1e-2):
            cfg = apply_values(base, {"train.seed": seed, "train.lr": lr, "stabilizers.zero_init": False})
            rows.append({"variant": f"8x2/paper/lr{lr:g}", "seed": seed, "run_id": f"{seed}-{lr}", **flatten(cfg)})
    runs = pd.DataFrame(rows)
    splits = load_splits(base.data)
    init = transfer.init_losses(runs, splits)
    assert len(init) == 2 and list(init["seed"]) == [0, 1]
    direct = new_state(apply_values(base, {"train.seed": 1, "stabilizers.zero_init": False}), splits.shape,
                       torch.device("cpu"))  # fmt: skip
    assert init.loc[1, "raw_bpd"] == pytest.approx(evaluate(direct.model, splits.val, base.train.eval_batch_size))
    assert init.loc[0, "raw_bpd"] != init.loc[1, "raw_bpd"]  # a seed's own random initialisation
    for r in init.itertuples():
        assert r.init_bpd == min(r.raw_bpd, transfer.UNIFORM_BPD) and r.capped == (r.raw_bpd > transfer.UNIFORM_BPD)


def _null_ladder(rng, slope: float, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """The ladder's design: 3 rungs 4x apart in weights, 2 seeds each; y = slope * log10(w) + noise."""
    x = np.repeat(np.log10([94_436, 331_516, 1_234_220]), 2)
    return x, slope * x + rng.normal(0.0, noise, len(x))


def test_the_slope_test_keeps_its_error_rate_and_its_interval_covers():
    """No planted slope: the two-sided t test rejects at about 5% (3,000 ladders, inside the 99.9% binomial
    band); a planted one: the 95% interval covers it at about 95%; a large one is found nearly always."""
    from scipy import stats

    rng = np.random.default_rng(0)
    n = 3000
    null = [transfer.trend(*_null_ladder(rng, 0.0, 0.05), at=7.27) for _ in range(n)]
    rejected = sum(f["p"] <= 0.05 for f in null)
    lo, hi = stats.binom.ppf([0.0005, 0.9995], n, 0.05)
    assert lo <= rejected <= hi, rejected
    planted = [transfer.trend(*_null_ladder(rng, 0.2, 0.05), at=7.27) for _ in range(n)]
    covered = sum(f["slope_lo"] <= 0.2 <= f["slope_hi"] for f in planted)
    lo, hi = stats.binom.ppf([0.0005, 0.9995], n, 0.95)
    assert lo <= covered <= hi, covered
    assert sum(f["p"] <= 0.05 for f in planted) / n > 0.9  # 0.2 per decade against 0.05 noise: power near 1
    # the prediction interval for one new point at the paper's size covers a fresh draw there at ~95%
    hits = 0
    for f in planted:
        y_new = 0.2 * 7.27 + rng.normal(0.0, 0.05)
        hits += f["pred_lo"] <= y_new <= f["pred_hi"]
    assert lo <= hits <= hi, hits


def test_slope_verdicts_are_typed_and_holm_adjusted():
    weights = {"8x2": 94_436, "16x2": 331_516, "32x2": 1_234_220}
    rng = np.random.default_rng(1)
    rows = []
    for rung, w in weights.items():
        for seed in (0, 1):
            lw = math.log10(w)
            rows.append({"rung": rung, "recipe": "grows", "seed": seed, "d_best": 0.5 * lw + rng.normal(0, 0.01),
                         "d_sensitivity": 0.001 * (-1) ** seed, "d_unstable": rng.normal(0, 1.0)})  # fmt: skip
    v = transfer.slope_verdicts(transfer.trends(pd.DataFrame(rows), weights, 18_519_436)).set_index("measure")
    assert v.loc["d_best", "verdict"] == "grows with size"
    assert v.loc["d_sensitivity", "verdict"] == "equivalent within ±0.05 per decade"
    assert v.loc["d_unstable", "verdict"].startswith("inconclusive")
    assert (v["p_holm"] >= v["p"]).all() and v.loc["d_best", "p_holm"] == pytest.approx(min(1.0, 3 * v["p"].min()))
    down = pd.DataFrame(rows).assign(d_best=lambda d: -d["d_best"])
    assert transfer.slope_verdicts(transfer.trends(down, weights, 18_519_436)).iloc[0]["verdict"] == "shrinks with size"


def test_the_paper_check_table_is_read_only_when_whole(tmp_path):
    assert transfer.read_paper_check(tmp_path / "absent.csv") is None
    bad = tmp_path / "bad.csv"
    bad.write_text("recipe,lr\npaper,0.001\n")
    with pytest.raises(ValueError, match="missing lr_multiple, maps, blocks, result"):
        transfer.read_paper_check(bad)


def test_the_paper_check_table_counts_steps_and_keeps_failures():
    runs = pd.DataFrame([
        {"variant": "paper-size/paper/lr0.01", "seed": 0, "run_id": "a", "result": "diverges-in-training",
         "val_bpd": math.nan, "train.batch_size": 64, "model.mid_channels": 64, "model.num_blocks": 8, "device": "cuda",
         "git_commit": "abc"},
        {"variant": "paper-size/paper/lr0.001", "seed": 0, "run_id": "b", "result": "trained", "val_bpd": 4.2,
         "train.batch_size": 64, "model.mid_channels": 64, "model.num_blocks": 8, "device": "cuda",
         "git_commit": "abc"}])  # fmt: skip
    history = pd.DataFrame([
        {"run_id": "b", "epoch": 1, "train_bpd": 5.0, "grad_norm_max": 30.0, "epoch_seconds": 10.0},
        {"run_id": "b", "epoch": 2, "train_bpd": 4.5, "grad_norm_max": 20.0, "epoch_seconds": 11.0},
        {"run_id": "a", "epoch": 1, "train_bpd": 9.0, "grad_norm_max": 1e6, "epoch_seconds": 10.0}])  # fmt: skip
    t = transfer.paper_check_table(runs, history, train_images=3600, date="2026-12-06").set_index("lr")
    assert list(t.columns) == [c for c in transfer.PAPER_CHECK_COLUMNS if c != "lr"]
    assert t.loc[0.001, "steps"] == 2 * 56 and t.loc[0.01, "steps"] == 56  # 3600 // 64 a epoch
    assert t.loc[0.001, "train_bpd"] == 4.5 and t.loc[0.001, "max_grad_norm"] == 30.0
    assert t.loc[0.001, "seconds"] == 21.0
    assert t.loc[0.01, "result"] == "diverges-in-training" and math.isnan(t.loc[0.01, "val_bpd"])
    assert t.loc[0.01, "lr_multiple"] == 10.0 and t.loc[0.001, "lr_multiple"] == 1.0
    assert (t["maps"] == 64).all() and (t["blocks"] == 8).all()
