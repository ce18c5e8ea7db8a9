"""What a long run measures that a short one cannot: the seed report's own statistic (Table 2: mean
and std of validation bits/dim over the last 40 of 100 epochs), the split of its spread into
epoch-to-epoch noise and seed-to-seed differences, whether short-run verdicts hold, overfitting, and
late divergence or recovery events. Pure functions over analysis.collect's frames.

The seed report states its statistic as "Mean and Std of Validation NLL (Bits per dim) on the last 40
epochs" of 100. It leaves unstated: the std's denominator (n or n - 1), what its validation set was,
whether batch norm was in eval mode, and how an epoch's value was formed. Chosen here: an epoch's
value is bits/dim of the whole validation split in eval mode (fp32); the window is the run's last 40
epochs (61-100 of 100); the std divides by n (numpy's default, the likelier tool; n - 1 would be
sqrt(40/39) = 1.3% larger).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.stats import summarize

WINDOW = 40  # the seed report's window, epochs
EARLY = 6  # the epoch the committed studies stop at: their verdicts are read there


def window_span(used: int, epochs: int, window: int = WINDOW) -> str:
    """The epochs a window statistic covers, by number, and so its real length: "epochs 61-100" when
    the run reached the full window, "epochs 1-6 (6 of the 40 wanted)" when it is shorter."""
    span = f"epochs {epochs - used + 1}-{epochs}"
    return span if used >= window else f"{span} ({used} of the {window} wanted)"


def window_stats(history: pd.DataFrame, window: int = WINDOW, metric: str = "val_bpd") -> pd.DataFrame:
    """Per run, the seed report's statistic over its last ``window`` epochs.

    history: one row per (run_id, epoch) with variant, seed and ``metric``.
    Returns one row per run: run_id, variant, seed, epochs (the last epoch), used (epochs in the
    window: fewer than ``window`` for a shorter run), span (window_span), mean, std (ddof 0), std1
    (ddof 1), nonfinite (non-finite epochs in the window: they make mean and std non-finite, never
    dropped).
    """
    rows = []
    for run_id, h in history.sort_values("epoch").groupby("run_id", sort=True):
        tail = h.tail(window)
        values = tail[metric].to_numpy(dtype=float)
        epochs = int(h["epoch"].max())
        rows.append({
            "run_id": run_id, "variant": h["variant"].iloc[0], "seed": int(h["seed"].iloc[0]), "epochs": epochs,
            "used": len(values), "span": window_span(len(values), epochs, window), "mean": float(values.mean()),
            "std": float(values.std(ddof=0)), "std1": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
            "nonfinite": int((~np.isfinite(values)).sum()),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["run_id", "variant", "seed", "epochs", "used", "span", "mean", "std", "std1",
                                       "nonfinite"])  # fmt: skip


def lag1(values) -> float:
    """Lag-1 autocorrelation of ``values`` (n,) about their mean; NaN for fewer than 3 or no spread."""
    x = np.asarray(values, dtype=float)
    if len(x) < 3 or not np.all(np.isfinite(x)):
        return math.nan
    d = x - x.mean()
    denom = float((d * d).sum())
    return float((d[1:] * d[:-1]).sum() / denom) if denom > 0 else math.nan


def ar1_mean_sd(sd: float, r: float, k: int) -> float:
    """The sd of the mean of ``k`` consecutive values of an AR(1) series with lag-1 correlation ``r``
    whose sample sd (ddof 1, about its own mean) is ``sd``: var(mean) = s2 g / k with
    g = (1 + r) / (1 - r) - 2 r (1 - r^k) / (k (1 - r)^2), and the process variance s2 recovered from
    the sample's, which the estimated mean shrinks: E[sd^2] = k / (k - 1) (s2 - var(mean))."""
    if k < 2 or not (math.isfinite(sd) and math.isfinite(r)):
        return math.nan
    g = (1 + r) / (1 - r) - 2 * r * (1 - r**k) / (k * (1 - r) ** 2)
    sigma2 = sd**2 * (k - 1) / k / (1 - g / k)
    return math.sqrt(sigma2 * g / k)


def variance_split(history: pd.DataFrame, window: int = WINDOW, metric: str = "val_bpd") -> pd.DataFrame:
    """Per variant, the spread of the window statistic split into its two sources.

    - within_sd: epoch-to-epoch sd inside a run's window (ddof 1, pooled over runs as the root of the
      mean variance): what the seed report's 0.137 is;
    - between_sd: sd over seeds of the window means (ddof 1): what a second seed would move the mean by;
    - lag1: the window's lag-1 autocorrelation, bias-corrected (r + (1 + 3r) / K, Marriott-Pope),
      taken as 0 when negative and at most 0.95: adjacent epochs are not independent draws;
    - noise_sd: the part of between_sd that epoch noise alone explains, the sd of a K-epoch mean of an
      AR(1) series with that lag1 and within_sd (:func:`ar1_mean_sd`); within_sd / sqrt(K) when r = 0;
    - seed_sd: sqrt(max(0, between_sd^2 - noise_sd^2)), the seed-to-seed component of the window mean
      (one-way random effects, method of moments, truncated at 0).

    history: one row per (run_id, epoch) with variant, seed and ``metric``; runs with a non-finite
    epoch in the window are left out of the split and counted in ``left_out``. Returns one row per
    variant: variant, runs, left_out, K, within_sd, lag1, noise_sd, between_sd, seed_sd.
    """
    rows = []
    per_run = window_stats(history, window, metric)
    in_window = history.sort_values("epoch").groupby("run_id").tail(window).set_index("run_id")[metric]
    for variant, w in per_run.groupby("variant", sort=True):
        ok = w[w["nonfinite"] == 0]
        tails = [in_window.loc[[r]].to_numpy(dtype=float) for r in ok["run_id"]]
        k = int(ok["used"].min()) if len(ok) else 0
        within = math.sqrt(float(np.mean([t.var(ddof=1) for t in tails]))) if tails and k > 1 else math.nan
        lags = [x for x in (lag1(t) for t in tails) if math.isfinite(x)]
        raw = float(np.mean(lags)) if lags and k > 2 else math.nan
        r = min(max(raw + (1 + 3 * raw) / k, 0.0), 0.95) if math.isfinite(raw) else math.nan
        noise = ar1_mean_sd(within, r, k)
        between = float(ok["mean"].std(ddof=1)) if len(ok) > 1 else math.nan
        known = math.isfinite(between) and math.isfinite(noise)
        seed = math.sqrt(max(0.0, between**2 - noise**2)) if known else math.nan
        rows.append({"variant": variant, "runs": len(w), "left_out": len(w) - len(ok), "K": k, "within_sd": within,
                     "lag1": r, "noise_sd": noise, "between_sd": between, "seed_sd": seed})  # fmt: skip
    columns = ["variant", "runs", "left_out", "K", "within_sd", "lag1", "noise_sd", "between_sd", "seed_sd"]
    return pd.DataFrame(rows, columns=columns)


def recipe_table(per_run: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per variant, the window statistic over seeds: the window means' mean, sd and 95% Student-t
    interval (n - 1 df), the mean of the runs' within-window std, over the runs that trained.

    per_run: window_stats rows; runs: one row per run with run_id and result."""
    trained = set(runs.loc[runs["result"] == "trained", "run_id"])
    rows = []
    for variant, w in per_run.groupby("variant", sort=True):
        ok = w[w["run_id"].isin(trained)]
        s = summarize(ok["mean"])
        rows.append({"variant": variant, "runs": len(w), "trained": len(ok), **s,
                     "within_std": float(ok["std"].mean()) if len(ok) else math.nan,
                     "spans": ", ".join(sorted(set(ok["span"])))})  # fmt: skip
    return pd.DataFrame(rows)


def at_epoch(history: pd.DataFrame, epoch: int, metric: str = "val_bpd") -> pd.Series:
    """``metric`` of each run at ``epoch`` (run_id -> value; NaN where the run did not reach it)."""
    h = history[history["epoch"] == epoch].set_index("run_id")[metric]
    return h.astype(float)


def overfitting(history: pd.DataFrame, early: int = EARLY) -> pd.DataFrame:
    """Per run: the best validation epoch and value, how far the last epoch is above it, and the
    generalisation gap (validation minus training bits/dim; positive: the model fits training images
    better) at ``early`` and at the last epoch. Training bits/dim is the epoch's running mean in train
    mode, validation the end-of-epoch model in eval mode, so the gap at an epoch also holds the
    within-epoch improvement: compare gaps across epochs, not with 0."""
    rows = []
    for run_id, h in history.sort_values("epoch").groupby("run_id", sort=True):
        val = h["val_bpd"].to_numpy(dtype=float)
        finite = np.isfinite(val)
        best = int(h["epoch"].to_numpy()[finite][np.argmin(val[finite])]) if finite.any() else None
        last = h.iloc[-1]
        first = h[h["epoch"] == early]
        gap_early = float(first["val_bpd"].iloc[0] - first["train_bpd"].iloc[0]) if len(first) else math.nan
        rows.append({
            "run_id": run_id, "variant": h["variant"].iloc[0], "seed": int(h["seed"].iloc[0]),
            "epochs": int(last["epoch"]),
            "best_epoch": best, "best_val": float(np.nanmin(val[finite])) if finite.any() else math.nan,
            "last_above_best": float(last["val_bpd"]) - float(np.nanmin(val[finite])) if finite.any() else math.nan,
            "gap_early": gap_early, "gap_last": float(last["val_bpd"] - last["train_bpd"]),
        })  # fmt: skip
    return pd.DataFrame(rows)


def late_events(history: pd.DataFrame, runs: pd.DataFrame, window: int = WINDOW, early: int = EARLY) -> pd.DataFrame:
    """Per variant, divergence events (non-finite steps: each one recovered from or ending the run)
    counted by when they happened: by epoch ``early``, after it and before the window, inside the
    last ``window`` epochs; and how the runs ended (recovered, diverged).

    history: one row per (run_id, epoch) with nonfinite_events; runs: outcome, epochs, train.epochs."""
    rows = []
    for variant, r in runs.groupby("variant", sort=True):
        h = history[history["run_id"].isin(set(r["run_id"]))]
        events = h["nonfinite_events"].fillna(0).to_numpy(dtype=float)
        epoch = h["epoch"].to_numpy()
        planned = int(r["train.epochs"].max()) if "train.epochs" in r else int(epoch.max(initial=0))
        start = planned - window + 1
        rows.append({
            "variant": variant, "runs": len(r),
            f"recovered, epochs 1-{early}": int(events[epoch <= early].sum()),
            f"recovered, epochs {early + 1}-{start - 1}": int(events[(epoch > early) & (epoch < start)].sum()),
            f"recovered, epochs {start}-{planned}": int(events[epoch >= start].sum()),
            "runs recovered": int((r["outcome"] == "recovered").sum()),
            "runs diverged (at epoch)": _diverged_at(r),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _diverged_at(r: pd.DataFrame) -> str:
    d = r[r["outcome"] == "diverged"]
    if d.empty:
        return "0"
    at = sorted(int(e) for e in pd.to_numeric(d["first_nonfinite_epoch"], errors="coerce").dropna())
    return f"{len(d)} ({', '.join(map(str, at))})" if at else str(len(d))


READINGS = ("early", "window", "test")  # validation at epoch EARLY, the last-WINDOW mean, test at the end


def verdict_change(early_type: str, early_dir: str, window_type: str, window_dir: str) -> str:
    """What became of a short run's verdict over the long window: ``held`` (the same type and direction),
    ``resolved`` (the short reading was inconclusive, so it claimed nothing a typed window verdict could
    overturn), or ``did not hold`` (a typed verdict whose type or direction changed, or was lost)."""
    if early_type == window_type and early_dir == window_dir:
        return "held"
    if early_type == "inconclusive":
        return "resolved"
    return "did not hold"


def verdicts_over_time(runs: pd.DataFrame, history: pd.DataFrame, families, early: int = EARLY,
                       window: int = WINDOW) -> pd.DataFrame:  # fmt: skip
    """Each declared contrast read three ways on the same runs: validation bits/dim at epoch ``early``
    (where the committed studies stop), the mean over the last ``window`` epochs, and test bits/dim
    of the final model. Each reading is analysis.comparisons.family_comparisons with its own Holm
    correction within the family; pairs are the seeds where both runs trained (by their final result,
    so the three readings use the same pairs).

    Returns one row per (family, variant, against): for each reading R in READINGS, R_diff, R_lo,
    R_hi, R_p_holm, R_type (effect / equivalent / inconclusive) and R_dir (better / worse / ''),
    ``held``: whether the window reading has the early reading's type and direction, and ``change``:
    :func:`verdict_change` (held / resolved / did not hold).
    """
    from analysis.comparisons import family_comparisons

    early_val = at_epoch(history, early)
    win = window_stats(history, window).set_index("run_id")["mean"]
    values = {"early": runs["run_id"].map(early_val), "window": runs["run_id"].map(win), "test": runs["test_bpd"]}
    merged = None
    for reading in READINGS:
        c = family_comparisons(runs.assign(test_bpd=values[reading].astype(float)), history, families)
        if c.empty:
            return pd.DataFrame()
        part = pd.DataFrame({
            "family": c["family"], "variant": c["variant"], "against": c["against"], "pairs": c["n_pairs"],
            f"{reading}_diff": c["mean_diff"], f"{reading}_lo": c["ci_lo"], f"{reading}_hi": c["ci_hi"],
            f"{reading}_p_holm": c["p_holm"], f"{reading}_type": c["verdict_type"],
            f"{reading}_dir": [("worse" if d > 0 else "better") if t == "effect" else ""
                               for d, t in zip(c["mean_diff"], c["verdict_type"], strict=True)],
        })  # fmt: skip
        merged = part if merged is None else merged.merge(part, on=["family", "variant", "against", "pairs"])
    merged["held"] = (merged["early_type"] == merged["window_type"]) & (merged["early_dir"] == merged["window_dir"])
    merged["change"] = [verdict_change(*row) for row in zip(merged["early_type"], merged["early_dir"],
                                                            merged["window_type"], merged["window_dir"], strict=True)]
    return merged
