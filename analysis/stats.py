"""Statistics of the study as small pure functions over pandas frames and numpy arrays, honest at the
few seeds a study affords (../shared/design/STATISTICS.md).

- Intervals are Student t on per-seed values or on paired differences: at n = 3 a percentile
  bootstrap is [min, max], which covers the mean about 75% of the time, not 95%. The coverage of
  these intervals is checked by simulation (tests/test_statistics.py).
- Comparisons within a family are corrected for multiplicity with Holm's step-down procedure
  (family-wise error rate, any dependence).
- Every run is counted: a mean over finished runs says so, and failures are tabled by kind.

Shapes are stated in each docstring.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

CONF = 0.95
ALPHA = 0.05


def with_result(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with a ``result`` column (study.run.outcome): kept where present, else classified from
    outcome and test_bpd alone (a frame built by hand, without the runs' divergence events)."""
    if "result" in runs:
        return runs
    from study.run.outcome import classify

    return runs.assign(result=[classify(o, [], float(t)) or "" for o, t in zip(runs["outcome"], runs["test_bpd"],
                                                                                strict=True)])  # fmt: skip


def finite(values) -> np.ndarray:
    """The finite entries of ``values`` (n,) as float."""
    x = np.asarray(values, dtype=float)
    return x[np.isfinite(x)]


def t_interval(values, conf: float = CONF) -> tuple[float, float]:
    """Student-t interval for the mean of ``values`` (n,): mean +- t(1 - a/2, n - 1) s / sqrt(n).
    NaN for n < 2 (no interval exists); a zero-width interval when every value is equal."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (math.nan, math.nan)
    half = stats.t.ppf(0.5 + conf / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean() - half), float(x.mean() + half)


def summarize(values) -> dict[str, float]:
    """mean, std (ddof=1), 95% t interval and n of the finite entries of ``values`` (n,)."""
    x = finite(values)
    lo, hi = t_interval(x)
    return {"mean": float(x.mean()) if len(x) else math.nan, "std": float(x.std(ddof=1)) if len(x) > 1 else math.nan,
            "ci_lo": lo, "ci_hi": hi, "n": len(x)}  # fmt: skip


def paired_t_pvalue(diffs) -> float:
    """Two-sided paired t-test p-value for differences (n,); NaN when n < 2; 1.0 when all are zero
    (no evidence of a difference) and 0.0 when they are equal and non-zero (no spread to test)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return math.nan
    if np.all(d == d[0]):
        return 1.0 if d[0] == 0 else 0.0
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def sign_flip_pvalue(diffs) -> float:
    """Exact two-sided paired permutation p-value for differences (n,): the share of the 2^n sign
    assignments whose |mean| is at least the observed |mean| (the observed one included). Assumes only
    that each difference is symmetric about 0 under the null, no normality; its smallest possible value
    is 2 / 2^n (0.25 at n = 3, 0.0625 at n = 5). NaN when n < 1."""
    import itertools

    d = np.asarray(diffs, dtype=float)
    if len(d) < 1:
        return math.nan
    observed = abs(d.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    means = np.abs((signs * d).mean(axis=1))
    # a relative tolerance, so the observed assignment and its mirror always count despite rounding
    return float((means >= observed * (1 - 1e-12) - 1e-15).mean())


def fisher_failures(variant_failed: int, variant_ok: int, other_failed: int, other_ok: int) -> float:
    """Two-sided Fisher exact p of failing to train, one arm against another (counts of runs). NaN when
    no run of either arm failed: there is nothing to test, and a 1.0 would read as a test that found
    nothing. The one Fisher test of the project (the factorial's per-factor tables use it too)."""
    from scipy.stats import fisher_exact

    if variant_failed + other_failed == 0:
        return math.nan
    if variant_ok + other_ok == 0:  # every run of both arms failed: no contrast either
        return math.nan
    return float(fisher_exact([[variant_failed, variant_ok], [other_failed, other_ok]]).pvalue)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values for ``pvalues`` (m,), NaN entries left NaN and not counted:
    the i-th smallest of m is m - i + 1 times itself, made monotone, capped at 1. Reject where the
    adjusted value is <= alpha."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(len(p), math.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m, running = len(order), 0.0
    for i, idx in enumerate(order):
        running = max(running, (m - i) * p[idx])
        out[idx] = min(1.0, running)
    return out


def holm_alphas(pvalues, alpha: float = ALPHA) -> np.ndarray:
    """The level each of ``pvalues`` (m,) is tested at in Holm's step-down procedure: alpha / (m - i)
    for the i-th smallest (0-based), every entry counted (a NaN, an untested member, ranks last)."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(np.where(np.isfinite(p), p, np.inf), kind="stable")
    out = np.empty(len(p))
    for i, idx in enumerate(order):
        out[idx] = alpha / (len(p) - i)
    return out


def min_detectable_effect(n: int, sd: float, alpha: float = ALPHA, power: float = 0.8) -> float:
    """Smallest mean paired difference a two-sided t-test on ``n`` pairs with spread ``sd`` detects with
    ``power`` (statsmodels TTestPower): what "no detectable effect" means at this n."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    from statsmodels.stats.power import TTestPower

    d = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="two-sided")
    return float(d * sd)


def tost(values, target: float, margin: float) -> dict[str, float]:
    """Equivalence of the mean of ``values`` (n,) with ``target`` within +-``margin`` (two one-sided
    t-tests): p is the larger one-sided p-value; equivalent when p < 0.05, i.e. the 90% t interval
    lies inside [target - margin, target + margin]."""
    from scipy import stats

    x = finite(values)
    if len(x) < 2:
        return {"p": math.nan, "ci90_lo": math.nan, "ci90_hi": math.nan, "n": len(x)}
    se = x.std(ddof=1) / math.sqrt(len(x))
    df = len(x) - 1
    if se == 0:
        p = 0.0 if abs(x.mean() - target) < margin else 1.0
    else:
        p_low = stats.t.sf((x.mean() - (target - margin)) / se, df)  # H0: mean <= target - margin
        p_high = stats.t.cdf((x.mean() - (target + margin)) / se, df)  # H0: mean >= target + margin
        p = float(max(p_low, p_high))
    lo, hi = t_interval(x, 0.90)
    return {"p": p, "ci90_lo": lo, "ci90_hi": hi, "n": len(x)}


def last_window(history: pd.DataFrame, metric: str = "val_bpd", window: int = 40) -> pd.DataFrame:
    """Per run, the seed report's statistic: mean and std of ``metric`` over the run's last
    ``window`` epochs, and the final epoch's value.

    history: one row per (run_id, epoch) with a ``metric`` column.
    Returns one row per run_id: window_mean, window_std (ddof=0 over epochs), window_used (K: epochs
    averaged, fewer than ``window`` when the run is shorter), epochs (N: the run's last epoch), final
    (the value at epoch N), nonfinite (epochs whose value is NaN or infinite). A non-finite value in
    the window makes the window mean non-finite: it is counted, never dropped.
    """
    rows = []
    for run_id, h in history.sort_values("epoch").groupby("run_id", sort=True):
        values = h[metric].to_numpy(dtype=float)
        tail = values[-window:]
        rows.append({
            "run_id": run_id,
            "window_mean": float(tail.mean()),
            "window_std": float(tail.std(ddof=0)),
            "window_used": len(tail),
            "epochs": int(h["epoch"].max()),
            "final": float(values[-1]),
            "nonfinite": int((~np.isfinite(values)).sum()),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["run_id", "window_mean", "window_std", "window_used", "epochs", "final",
                                       "nonfinite"])  # fmt: skip


def window_label(used: int, epochs: int, window: int) -> str:
    """What the window statistic is: "last 40 epochs" only when the runs are long enough for it."""
    return f"last {window} epochs" if used == window else f"last {used} of {epochs} epochs"


def failures(runs: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Every way a run can fail, counted per variant; no run is left out.

    runs: one row per run (run_id, variant, outcome, test_bpd, first_nonfinite_epoch).
    history: one row per (run_id, epoch) with val_bpd.
    Returns one row per variant: runs, completed, recovered, diverged, skipped, nonfinite_val (runs with
    a NaN or infinite validation epoch), all_nan_val (no finite validation epoch at all), infinite
    (runs with an infinite validation or test value), nonfinite_test (finished runs without a finite
    test value), first_nonfinite_epoch (the earliest over runs).
    """
    val = history.groupby("run_id")["val_bpd"].agg(list).to_dict() if len(history) else {}
    rows = []
    for variant, r in runs.groupby("variant", sort=True):
        outcomes = r["outcome"]
        vals = [np.asarray(val.get(i, []), dtype=float) for i in r["run_id"]]
        finished = r[outcomes.isin(["completed", "recovered"])]
        first = pd.to_numeric(r["first_nonfinite_epoch"], errors="coerce").dropna()
        test = r["test_bpd"].to_numpy(dtype=float)
        rows.append({
            "variant": variant,
            "runs": len(r),
            "completed": int((outcomes == "completed").sum()),
            "recovered": int((outcomes == "recovered").sum()),
            "diverged": int((outcomes == "diverged").sum()),
            "skipped": int((outcomes == "skipped").sum()),
            "unfinished": int((~outcomes.isin(["completed", "recovered", "diverged", "skipped"])).sum()),
            "nonfinite_val": sum(bool(len(v)) and bool((~np.isfinite(v)).any()) for v in vals),
            "all_nan_val": sum(not np.isfinite(v).any() for v, o in zip(vals, outcomes, strict=True) if o != "skipped"),
            "infinite": sum(bool(np.isinf(v).any()) or bool(np.isinf(t)) for v, t in zip(vals, test, strict=True)),
            "nonfinite_test": int((~np.isfinite(finished["test_bpd"].to_numpy(dtype=float))).sum()),
            "first_nonfinite_epoch": int(first.min()) if len(first) else None,
        })  # fmt: skip
    return pd.DataFrame(rows)


def paired_effect(per_run: pd.DataFrame, value: str, variant: str, against: str) -> dict:
    """``variant`` minus ``against`` on ``value`` over the seeds both finished with a finite value.

    per_run: one row per run with columns variant, seed, outcome and ``value``.
    Returns n_pairs, mean_diff (positive = the variant is worse in bits/dim), sd_diff, ci_lo, ci_hi (95%
    t interval of the mean difference), p_value (paired t), mde (smallest effect detectable with 80%
    power at this n and spread), identical (every pair exactly equal: the change did not act),
    excluded (seeds left out because a run did not finish with a finite value).
    """
    a = per_run[per_run["variant"] == variant].set_index("seed")
    b = per_run[per_run["variant"] == against].set_index("seed")
    shared = sorted(set(a.index) & set(b.index))
    ok = [s for s in shared if a.loc[s, "outcome"] in ("completed", "recovered") and b.loc[s, "outcome"] in
          ("completed", "recovered") and math.isfinite(a.loc[s, value]) and math.isfinite(b.loc[s, value])]  # fmt: skip
    diffs = np.array([a.loc[s, value] - b.loc[s, value] for s in ok], dtype=float)
    lo, hi = t_interval(diffs)
    sd = float(diffs.std(ddof=1)) if len(diffs) > 1 else math.nan
    return {
        "n_pairs": len(ok),
        "mean_diff": float(diffs.mean()) if len(diffs) else math.nan,
        "sd_diff": sd,
        "ci_lo": lo,
        "ci_hi": hi,
        "p_value": paired_t_pvalue(diffs),
        "p_signflip": sign_flip_pvalue(diffs),
        "mde": min_detectable_effect(len(diffs), sd),
        "identical": bool(len(diffs)) and bool(np.all(diffs == 0.0)),
        "excluded": len(shared) - len(ok),
        "diffs": diffs,
    }


def paired_effects(per_run: pd.DataFrame, value: str, baseline: str = "seed-report") -> pd.DataFrame:
    """:func:`paired_effect` of every other variant against ``baseline``, one row per variant."""
    others = sorted(set(per_run["variant"]) - {baseline})
    rows = [{"variant": v, "against": baseline, **paired_effect(per_run, value, v, baseline)} for v in others]
    for r in rows:
        r.pop("diffs")
    return pd.DataFrame(rows)


def variant_table(runs: pd.DataFrame, history: pd.DataFrame, window: int = 40) -> pd.DataFrame:
    """One row per variant: the last-window validation statistic, the final-epoch validation and the
    final test bits/dim across seeds (mean, std, 95% t interval, n: finished runs only), and speed.

    runs: one row per run (run_id, variant, seed, outcome, test_bpd, images_per_s).
    history: one row per (run_id, epoch) with val_bpd.
    """
    win = last_window(history, "val_bpd", window).set_index("run_id")
    rows = []
    for variant, r in runs.groupby("variant", sort=True):
        finished = r[r["outcome"].isin(["completed", "recovered"])]
        ids = [i for i in finished["run_id"] if i in win.index]
        val = summarize(win.loc[ids, "window_mean"]) if ids else summarize([])
        final = summarize(win.loc[ids, "final"]) if ids else summarize([])
        test = summarize(finished["test_bpd"])
        used = sorted(set(win.loc[ids, "window_used"])) if ids else []
        epochs = sorted(set(win.loc[ids, "epochs"])) if ids else []
        rows.append({
            "variant": variant,
            "runs": len(r),
            "finished": len(finished),
            "window": "/".join(window_label(u, max(epochs), window) for u in used) if used else "",
            **{f"val_{k}": v for k, v in val.items()},
            **{f"final_{k}": v for k, v in final.items()},
            **{f"test_{k}": v for k, v in test.items()},
            "val_std_within": float(win.loc[ids, "window_std"].mean()) if ids else math.nan,
            "images_per_s": float(r["images_per_s"].mean()),
        })  # fmt: skip
    return pd.DataFrame(rows)
