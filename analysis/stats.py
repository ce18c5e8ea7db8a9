"""Statistics of the study as small pure functions over pandas frames and numpy arrays.

Shapes are stated in each docstring. Across-seed intervals are percentile bootstraps (rliable
style); with 3 seeds they are wide and coarse, which is the honest answer, and the tables always
say how many runs each number stands on.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

N_BOOT = 10_000


def bootstrap_ci(values, alpha: float = 0.05, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (n,). NaN for n < 2 (no interval exists)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def last_window(history: pd.DataFrame, metric: str = "val_bpd", window: int = 40) -> pd.DataFrame:
    """Per run, mean and std of ``metric`` over its last ``window`` epochs (the seed report's statistic).

    history: one row per (run_id, epoch) with a ``metric`` column.
    Returns one row per run_id: window_mean, window_std (ddof=0 over epochs), window_used (epochs
    actually averaged: fewer than ``window`` when the run is shorter, never silently), last_epoch.
    """
    rows = []
    for run_id, h in history.dropna(subset=[metric]).sort_values("epoch").groupby("run_id", sort=True):
        tail = h[metric].to_numpy()[-window:]
        rows.append({
            "run_id": run_id,
            "window_mean": float(tail.mean()),
            "window_std": float(tail.std(ddof=0)),
            "window_used": len(tail),
            "last_epoch": int(h["epoch"].max()),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["run_id", "window_mean", "window_std", "window_used", "last_epoch"])


def across_seeds(values) -> dict[str, float]:
    """mean, std (ddof=1), 95% bootstrap CI and n of finite ``values`` (n,)."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    lo, hi = bootstrap_ci(x)
    return {
        "mean": float(x.mean()) if len(x) else math.nan,
        "std": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
        "ci_lo": lo,
        "ci_hi": hi,
        "n": len(x),
    }


def paired_t_pvalue(diffs) -> float:
    """Two-sided paired t-test p-value for differences (n,); NaN when n < 2 or all equal."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2 or np.allclose(d, d[0]):
        return math.nan
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def paired_effects(per_run: pd.DataFrame, value: str, baseline: str = "seed-report") -> pd.DataFrame:
    """Effect of each variant against ``baseline`` on shared seeds.

    per_run: one row per run with columns variant, seed, outcome and ``value``.
    Returns one row per variant (baseline excluded): n_pairs (seeds where both runs finished with a
    finite value), mean_diff (variant - baseline; positive = worse bits/dim), ci_lo, ci_hi (bootstrap
    over pairs), p_value (paired t-test), diverged (runs of the variant that diverged, "k/n"). A
    diverged run is excluded from the pairs and counted, never averaged in.
    """
    base = per_run[per_run["variant"] == baseline].set_index("seed")
    rows = []
    for variant, runs in per_run[per_run["variant"] != baseline].groupby("variant", sort=True):
        runs = runs.set_index("seed")
        shared = sorted(set(runs.index) & set(base.index))
        ok = [
            s for s in shared
            if runs.loc[s, "outcome"] != "diverged" and base.loc[s, "outcome"] != "diverged"
            and math.isfinite(runs.loc[s, value]) and math.isfinite(base.loc[s, value])
        ]  # fmt: skip
        diffs = np.array([runs.loc[s, value] - base.loc[s, value] for s in ok], dtype=float)
        lo, hi = bootstrap_ci(diffs)
        rows.append({
            "variant": variant,
            "n_pairs": len(ok),
            "mean_diff": float(diffs.mean()) if len(diffs) else math.nan,
            "ci_lo": lo,
            "ci_hi": hi,
            "p_value": paired_t_pvalue(diffs),
            "diverged": f"{int((runs['outcome'] == 'diverged').sum())}/{len(runs)}",
        })  # fmt: skip
    return pd.DataFrame(rows)


def variant_table(runs: pd.DataFrame, history: pd.DataFrame, window: int = 40) -> pd.DataFrame:
    """One row per variant: divergence, the last-window validation statistic across seeds, final
    test bits/dim across seeds, and speed.

    runs: one row per run (run_id, variant, seed, outcome, test_bpd, first_nonfinite_epoch, images_per_s).
    history: one row per (run_id, epoch) with val_bpd.
    """
    win = last_window(history, "val_bpd", window).set_index("run_id")
    rows = []
    for variant, r in runs.groupby("variant", sort=True):
        ids = [i for i in r["run_id"] if i in win.index]
        finished = r[r["outcome"] != "diverged"]
        val = across_seeds(win.loc[[i for i in ids if i in set(finished["run_id"])], "window_mean"])
        test = across_seeds(finished["test_bpd"])
        first_bad = pd.to_numeric(r["first_nonfinite_epoch"], errors="coerce").dropna()
        used = sorted(set(win.loc[ids, "window_used"])) if ids else []
        rows.append({
            "variant": variant,
            "runs": len(r),
            "diverged": int((r["outcome"] == "diverged").sum()),
            "recovered": int((r["outcome"] == "recovered").sum()),
            "first_nonfinite_epoch": int(first_bad.min()) if len(first_bad) else None,
            "window": "/".join(map(str, used)),
            "val_mean": val["mean"], "val_std_seeds": val["std"], "val_ci_lo": val["ci_lo"], "val_ci_hi": val["ci_hi"],
            "val_std_within": float(win.loc[ids, "window_std"].mean()) if ids else math.nan,
            "test_mean": test["mean"], "test_std": test["std"], "test_ci_lo": test["ci_lo"], "test_ci_hi": test["ci_hi"],
            "images_per_s": float(r["images_per_s"].mean()),
        })  # fmt: skip
    return pd.DataFrame(rows)
