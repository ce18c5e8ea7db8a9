"""The scale ladder's measures (`ablation transfer`, experiments/ladder.py), one pure function each, after
Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities", arXiv
2309.14322): the curve of final validation bits/dim against the learning rate, the largest stable
learning rate, LR sensitivity, and how a recipe's difference from the seed report's moves with
log(weights), extrapolated to the paper's size as a stated, refutable prediction.

Every run is counted: a run that did not train (diverged, failed at initialisation or in evaluation,
trained badly: study.run.outcome) is a failure at its learning rate, drawn and counted as one, and in
LR sensitivity it scores the loss at initialisation, as Wortsman et al. cap a diverged run. A failure
is an *instability* (what the largest stable learning rate and the unstable share count) when it is
non-finite, or finite but worse than uniform at or above the best learning rate; worse than uniform
below it, the run learnt too slowly for its epochs, which is no instability (`unstable`). At the two
seeds a ladder affords, every interval is Student t over seeds (n - 1 = 1 degree of freedom: wide, and
said so); a trend over rungs is an OLS fit with its t interval on n - 2 degrees of freedom.

Shapes are stated in each docstring.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.stats import CONF, t_interval, with_result
from experiments.ablation import EQUIVALENCE_MARGIN
from experiments.ladder import BASELINE  # every recipe is read against it
from study.metrics import UNIFORM_BPD


def lr_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell (rung, recipe, lr, seed) of a ladder's runs: the final validation bits/dim of a
    run that trained (NaN otherwise), its result, ``failed`` (any result but *trained*) and ``unstable``
    (:func:`unstable`). The result is the run's own (study.run.outcome, which judges the test bits/dim),
    except that a run no better than uniform on the final validation bits/dim, the measure this curve
    plots, is *trains-badly* here whatever its test bits/dim.

    runs: analysis.collect.collect_runs' runs (variant names ``RUNG/RECIPE/lrLR``: experiments.ladder),
    with val_bpd (last epoch), result (or outcome and test_bpd) and seed. Returns columns rung, recipe,
    lr, seed, val_bpd, result, failed, unstable, run_id; sorted by rung, recipe, lr, seed."""
    from experiments.ladder import parse

    runs = with_result(runs)
    parsed = [parse(v) for v in runs["variant"]]
    out = pd.DataFrame({
        "rung": [p[0] for p in parsed], "recipe": [p[1] for p in parsed], "lr": [p[2] for p in parsed],
        "seed": runs["seed"].astype(int).to_numpy(), "result": runs["result"].to_numpy(),
        "run_id": runs["run_id"].to_numpy() if "run_id" in runs else "",
    })  # fmt: skip
    # The curve's measure is the final validation bits/dim, so a run is judged on it too: a run whose
    # recorded result says *trained* (that judges its test bits/dim) but whose validation is no better than
    # uniform did not train on this curve (seen: validation 34.3 against test 7.04 at 32x2 without clipping)
    val = runs["val_bpd"].astype(float).to_numpy()
    worse_on_val = (out["result"] == "trained") & (val >= UNIFORM_BPD)
    out.loc[worse_on_val, "result"] = "trains-badly"
    out["failed"] = out["result"] != "trained"
    out["val_bpd"] = np.where(out["failed"], math.nan, val)
    out["unstable"] = mark_unstable(out, ["rung", "recipe"])
    return out.sort_values(["rung", "recipe", "lr", "seed"], key=_rung_order).reset_index(drop=True)


INSTABILITIES = ("diverges-in-training", "fails-at-init", "fails-in-eval")  # non-finite: study.run.outcome


def unstable(grid: pd.DataFrame) -> np.ndarray:
    """Which runs of one recipe's grid at one size are instabilities: a non-finite result anywhere, or a
    failure to train (worse than uniform) at or above the best learning rate (the lowest mean validation
    bits/dim over the runs that trained; with none trained, every failure counts). Below the best, a run
    worse than uniform learnt too slowly for its epochs: a failure, not an instability.

    grid: rows with lr, result, failed and val_bpd (lr_curves' of one rung and recipe). Returns (n,) bool."""
    trained = grid[~grid["failed"]]
    best = trained.groupby("lr")["val_bpd"].mean().idxmin() if len(trained) else -math.inf
    return (grid["result"].isin(INSTABILITIES) | (grid["failed"] & (grid["lr"] >= best))).to_numpy()


def mark_unstable(frame: pd.DataFrame, by: list[str]) -> pd.Series:
    """:func:`unstable` of each ``by`` group of ``frame`` (one recipe's grid each), aligned on its index."""
    flags = pd.Series(False, index=frame.index)
    for _, grid in frame.groupby(by, sort=False):
        flags[grid.index] = unstable(grid)
    return flags


def _rung_order(column: pd.Series) -> pd.Series:
    """Rungs by size (8x2 < 16x2 < 32x2), every other column as it is."""
    if column.name != "rung":
        return column
    return column.map(lambda r: tuple(int(x) for x in r.split("x")))


def largest_stable_lr(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (rung, recipe): the largest stable learning rate, the largest such that no seed's run was an
    instability (:func:`unstable`) at it or at any smaller one on the grid (an instability below it ends
    the stable range, even if a larger learning rate trains again: the conservative reading at two seeds),
    and the smallest at which any seed's run was one (NaN where none was); ``stable_to_top`` when none on
    the grid was. A run that learnt too slowly below the best learning rate does not end the range; it is
    counted in ``failed_runs`` with every other run that did not train.

    curves: lr_curves. Returns columns rung, recipe, largest_stable_lr, first_unstable_lr, unstable_runs,
    failed_runs, runs, stable_to_top."""
    rows = []
    for (rung, recipe), g in curves.groupby(["rung", "recipe"], sort=False):
        any_bad = g.groupby("lr")["unstable"].any().sort_index()
        bad = any_bad.index[any_bad.to_numpy()]
        ok = any_bad.index[any_bad.index < bad.min()] if len(bad) else any_bad.index
        rows.append({"rung": rung, "recipe": recipe,
                     "largest_stable_lr": float(ok.max()) if len(ok) else math.nan,
                     "first_unstable_lr": float(bad.min()) if len(bad) else math.nan,
                     "unstable_runs": int(g["unstable"].sum()), "failed_runs": int(g["failed"].sum()), "runs": len(g),
                     "stable_to_top": not len(bad)})  # fmt: skip
    return pd.DataFrame(rows)


def lr_sensitivity(curves: pd.DataFrame, init_bpd: pd.DataFrame) -> pd.DataFrame:
    """Wortsman et al.'s LR sensitivity per (rung, recipe, seed): over the learning-rate grid, the mean of
    min(L(lr), L0) - min over the grid of L, where L is the final validation bits/dim, L0 the validation
    bits/dim of the same seed's model at initialisation, and a run that did not train scores L0 (it is no
    better than where it started). 0: every learning rate reaches the best; larger: a narrower basin.
    NaN where no run of the seed trained (there is no best to measure from).

    curves: lr_curves. init_bpd: columns rung, recipe, seed, init_bpd (one row each; the learning rate
    does not change a model at initialisation). Returns columns rung, recipe, seed, sensitivity,
    best_bpd, best_lr, lrs (grid points counted)."""
    merged = curves.merge(init_bpd[["rung", "recipe", "seed", "init_bpd"]], on=["rung", "recipe", "seed"],
                          how="left", validate="many_to_one")  # fmt: skip
    rows = []
    for (rung, recipe, seed), g in merged.groupby(["rung", "recipe", "seed"], sort=False):
        l0 = float(g["init_bpd"].iloc[0])
        scored = np.where(g["failed"], l0, np.minimum(g["val_bpd"].to_numpy(dtype=float), l0))
        trained = g.loc[~g["failed"]]
        if trained.empty or not math.isfinite(l0):
            rows.append({"rung": rung, "recipe": recipe, "seed": seed, "sensitivity": math.nan,
                         "best_bpd": math.nan, "best_lr": math.nan, "lrs": len(g)})  # fmt: skip
            continue
        best = trained.loc[trained["val_bpd"].idxmin()]
        best_bpd = min(float(best["val_bpd"]), l0)
        rows.append({"rung": rung, "recipe": recipe, "seed": seed, "sensitivity": float(np.mean(scored - best_bpd)),
                     "best_bpd": float(best["val_bpd"]), "best_lr": float(best["lr"]), "lrs": len(g)})  # fmt: skip
    return pd.DataFrame(rows)


def over_seeds(per_seed: pd.DataFrame, value: str, conf: float = CONF) -> pd.DataFrame:
    """Per (rung, recipe): mean of ``value`` over seeds with its Student-t interval (n - 1 df) and n.

    per_seed: rows of (rung, recipe, seed, value) (lr_sensitivity's). Returns columns rung, recipe, mean,
    ci_lo, ci_hi, n."""
    rows = []
    for (rung, recipe), g in per_seed.groupby(["rung", "recipe"], sort=False):
        x = g[value].to_numpy(dtype=float)
        x = x[np.isfinite(x)]
        lo, hi = t_interval(x, conf)
        rows.append({"rung": rung, "recipe": recipe, "mean": float(x.mean()) if len(x) else math.nan,
                     "ci_lo": lo, "ci_hi": hi, "n": len(x)})  # fmt: skip
    return pd.DataFrame(rows)


def differences(curves: pd.DataFrame, sensitivity: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Each recipe against ``baseline`` at each rung, paired by seed: the difference in best validation
    bits/dim on the grid (``d_best``), in LR sensitivity (``d_sensitivity``) and in the share of the grid
    whose run was an instability (``d_unstable``: :func:`unstable`). Positive: the recipe is worse, more
    sensitive, more often unstable.

    curves: lr_curves. sensitivity: lr_sensitivity. Returns columns rung, recipe, seed, d_best,
    d_sensitivity, d_unstable (NaN where either side has no trained run for d_best and d_sensitivity)."""
    share = curves.groupby(["rung", "recipe", "seed"])["unstable"].mean().rename("unstable_share").reset_index()
    per = sensitivity.merge(share, on=["rung", "recipe", "seed"], how="outer")
    base = per[per["recipe"] == baseline].set_index(["rung", "seed"])
    rows = []
    for r in per[per["recipe"] != baseline].itertuples():
        if (r.rung, r.seed) not in base.index:
            continue
        b = base.loc[(r.rung, r.seed)]
        rows.append({"rung": r.rung, "recipe": r.recipe, "seed": r.seed, "d_best": r.best_bpd - b["best_bpd"],
                     "d_sensitivity": r.sensitivity - b["sensitivity"],
                     "d_unstable": r.unstable_share - b["unstable_share"]})  # fmt: skip
    return pd.DataFrame(rows, columns=["rung", "recipe", "seed", "d_best", "d_sensitivity", "d_unstable"])


def trend(x, y, at: float, conf: float = CONF) -> dict[str, float]:
    """OLS of ``y`` (n,) on ``x`` (n,) (here log10 of the model's weights): slope with its t interval on
    n - 2 df, and the fitted value at ``x = at`` with its prediction interval for one new observation
    there (an extrapolation when ``at`` lies outside x). NaN where n < 3 or x does not vary.

    Returns slope, slope_lo, slope_hi, se (of the slope), df, p (slope = 0, two-sided), at, predicted,
    pred_lo, pred_hi, n, x_min, x_max."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    span = (float(x.min()), float(x.max())) if len(x) else (math.nan, math.nan)
    out = {"slope": math.nan, "slope_lo": math.nan, "slope_hi": math.nan, "se": math.nan, "df": len(x) - 2,
           "p": math.nan, "at": at,
           "predicted": math.nan, "pred_lo": math.nan, "pred_hi": math.nan, "n": len(x), "x_min": span[0],
           "x_max": span[1]}  # fmt: skip
    if len(x) < 3 or np.ptp(x) == 0:
        return out
    n = len(x)
    xm = x.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - y.mean())).sum() / sxx)
    intercept = float(y.mean() - slope * xm)
    resid = y - (intercept + slope * x)
    s = math.sqrt(float((resid**2).sum()) / (n - 2))
    t = stats.t.ppf(0.5 + conf / 2, n - 2)
    se_slope = s / math.sqrt(sxx)
    se_pred = s * math.sqrt(1 + 1 / n + (at - xm) ** 2 / sxx)
    predicted = intercept + slope * at
    p = float(2 * stats.t.sf(abs(slope / se_slope), n - 2)) if se_slope > 0 else (0.0 if slope else 1.0)
    out.update(slope=slope, slope_lo=slope - t * se_slope, slope_hi=slope + t * se_slope, se=se_slope, p=p,
               predicted=predicted, pred_lo=predicted - t * se_pred, pred_hi=predicted + t * se_pred)  # fmt: skip
    return out


def trends(diffs: pd.DataFrame, weights: dict[str, int], paper_weights: int) -> pd.DataFrame:
    """For each recipe and each measure of ``differences``: the trend over log10(weights) of its per-seed
    differences from the baseline, and the prediction at the paper's size (``paper_weights``), labelled
    with the number of rungs it extrapolates from.

    diffs: differences. weights: rung -> the model's parameter count. Returns one row per (recipe,
    measure) with trend()'s columns, rungs, and measure in d_best / d_sensitivity / d_unstable."""
    rows = []
    for recipe, g in diffs.groupby("recipe", sort=False):
        x = np.log10([weights[r] for r in g["rung"]])
        for measure in ("d_best", "d_sensitivity", "d_unstable"):
            fit = trend(x, g[measure], math.log10(paper_weights))
            rows.append({"recipe": recipe, "measure": measure, "rungs": g["rung"].nunique(), **fit})
    columns = ["recipe", "measure", "rungs", *trend([], [], 0.0)]  # an unfinished ladder may have no pair yet
    return pd.DataFrame(rows, columns=columns)


# per decade of weights, the slope inside which a recipe's difference from the baseline counts as not
# moving with size: the reports' equivalence margin (0.05 bits/dim) for the two measures in bits/dim,
# and a tenth of the grid for the unstable share (under one of the 6 learning rates)
SLOPE_MARGINS = {"d_best": EQUIVALENCE_MARGIN, "d_sensitivity": EQUIVALENCE_MARGIN, "d_unstable": 0.1}


def slope_verdicts(fits: pd.DataFrame, margins: dict[str, float] = SLOPE_MARGINS, alpha: float = 0.05) -> pd.DataFrame:
    """``fits`` (trends' rows) with each slope's typed verdict, Holm-adjusted over every row that has a fit:
    *grows with size* / *shrinks with size* (the difference from the baseline; Holm p <= alpha),
    *equivalent within +-m per decade* (two one-sided t tests of the slope against the measure's margin,
    Holm-adjusted the same way), else *inconclusive*. Adds columns p_holm, margin, tost_p, tost_p_holm,
    verdict."""
    from scipy import stats

    from analysis.stats import holm

    out = fits.copy()
    out["margin"] = out["measure"].map(margins)
    fitted = np.isfinite(out["p"].to_numpy(dtype=float))
    tost = []
    for r in out.itertuples():
        if not (math.isfinite(r.se) and r.df > 0):
            tost.append(math.nan)
        elif r.se == 0:
            tost.append(0.0 if abs(r.slope) < r.margin else 1.0)
        else:
            lower = stats.t.sf((r.slope + r.margin) / r.se, r.df)  # H0: slope <= -m
            upper = stats.t.cdf((r.slope - r.margin) / r.se, r.df)  # H0: slope >= +m
            tost.append(float(max(lower, upper)))
    out["tost_p"] = tost
    out["p_holm"] = holm(np.where(fitted, out["p"], math.nan))
    out["tost_p_holm"] = holm(np.where(fitted, out["tost_p"], math.nan))
    verdicts = []
    for r in out.itertuples():
        if not math.isfinite(r.p_holm):
            verdicts.append(f"inconclusive: no fit ({r.n} points)")
        elif r.p_holm <= alpha:
            verdicts.append("grows with size" if r.slope > 0 else "shrinks with size")
        elif r.tost_p_holm <= alpha:
            verdicts.append(f"equivalent within ±{r.margin:g} per decade")
        else:
            verdicts.append(f"inconclusive: slope interval wider than ±{r.margin:g} per decade")
    out["verdict"] = verdicts
    return out


PAPER_CHECK_COLUMNS = ("recipe", "lr", "lr_multiple", "maps", "blocks", "result", "steps", "train_bpd", "val_bpd",
                       "max_grad_norm", "seconds", "device", "date", "commit")  # fmt: skip


def paper_check_table(runs: pd.DataFrame, history: pd.DataFrame, train_images: int, date: str) -> pd.DataFrame:
    """The GPU check's paper-size stability table from its runs (experiments.ladder.PAPER_CHECK cells): one
    row per run, PAPER_CHECK_COLUMNS (maps and blocks: the size it ran at). ``steps``: the updates its
    epochs made (train_images // batch per epoch: study.data.train_batches drops the last incomplete
    batch); ``train_bpd``: the last epoch's train bits/dim (train mode); ``val_bpd``: the last validation
    (NaN for a run that did not train); ``max_grad_norm``: the largest per-epoch maximum of the gradient
    norm before clipping; ``seconds``: its epochs' time.

    runs, history: analysis.collect.collect_runs' of the check's experiment. train_images: the training split's
    size. date: when it ran (ISO date), written into every row with the device and commit."""
    from experiments.ladder import SEED_REPORT_LR, parse

    runs = with_result(runs)
    rows = []
    for _, r in runs.sort_values(["variant", "seed"]).iterrows():
        _, recipe, lr = parse(r["variant"])
        h = history[history["run_id"] == r["run_id"]].sort_values("epoch")
        per_epoch = train_images // min(int(r["train.batch_size"]), train_images) if train_images else 0
        result = r["result"] or "did not end"
        rows.append({"recipe": recipe, "lr": lr, "lr_multiple": round(lr / SEED_REPORT_LR, 6),
                     "maps": int(r["model.mid_channels"]), "blocks": int(r["model.num_blocks"]), "result": result,
                     "steps": int(len(h)) * per_epoch,
                     "train_bpd": float(h["train_bpd"].iloc[-1]) if len(h) else math.nan,
                     "val_bpd": float(r["val_bpd"]) if result == "trained" else math.nan,
                     "max_grad_norm": float(h["grad_norm_max"].max()) if len(h) else math.nan,
                     "seconds": round(float(h["epoch_seconds"].sum()), 1) if len(h) else math.nan,
                     "device": r["device"], "date": date, "commit": r["git_commit"]})  # fmt: skip
    return pd.DataFrame(rows, columns=list(PAPER_CHECK_COLUMNS))


class PaperCheckError(ValueError):
    """A paper-stability table that is not one (a one-line message naming the fix)."""


def read_paper_check(path) -> pd.DataFrame | None:
    """The GPU check's paper-size stability table (scripts/gpu/check.sh, step paper-stability), or None when
    ``path`` does not exist. Columns PAPER_CHECK_COLUMNS, one row per (recipe, learning rate); a file
    without them raises PaperCheckError naming the missing ones."""
    from pathlib import Path

    if not Path(path).exists():
        return None
    table = pd.read_csv(path)
    missing = [c for c in PAPER_CHECK_COLUMNS if c not in table.columns]
    if missing:
        raise PaperCheckError(f"{path}: not a paper-stability table (missing {', '.join(missing)}); rewrite it with "
                         "scripts/gpu/check.sh (CHECK_ONLY=paper-stability)")  # fmt: skip
    return table.sort_values(["recipe", "lr"]).reset_index(drop=True)




def init_losses(runs: pd.DataFrame, splits) -> pd.DataFrame:
    """The loss at initialisation of each (rung, recipe, seed): validation bits/dim (eval mode, fp32) of the
    model its runs start from, rebuilt from a run's recorded config and seed (the learning rate does not
    change a model at initialisation, and the build is deterministic for a seed on the CPU). A model that
    scores worse than the uniform density's 8 bits/dim, or not finitely, at initialisation is capped at 8:
    LR sensitivity then measures from a bar every recipe shares.

    runs: collect_runs' runs of a ladder (variant, seed and every ``section.key`` param). splits: the
    ImageSplits the runs trained on (study.data.load_splits). Returns columns rung, recipe, seed,
    init_bpd (capped), raw_bpd (as evaluated), capped. Flows at
    initialisation often score above 8 bits/dim (the zero-initialised identity flow leaves the logit-space
    density of the data), so the cap is the usual case: the bar is then the one study.run.outcome's *trains
    badly* uses."""
    import torch

    from experiments.ladder import parse
    from study.config import unflatten
    from study.run.state import new_state
    from study.run.step import evaluate

    keys = config_keys(runs)
    rows, seen = [], set()
    for _, row in runs.sort_values(["variant", "seed"]).iterrows():
        rung, recipe, _ = parse(row["variant"])
        cell = (rung, recipe, int(row["seed"]))
        if cell in seen:
            continue
        seen.add(cell)
        flat = {k: plain_value(row[k]) for k in keys}
        cfg = unflatten({**flat, "train.compile": "off", "train.threads": 0})
        st = new_state(cfg, splits.shape, torch.device("cpu"))
        bpd = evaluate(st.model, splits.val, cfg.train.eval_batch_size)
        capped = not (math.isfinite(bpd) and bpd <= UNIFORM_BPD)
        rows.append({"rung": rung, "recipe": recipe, "seed": cell[2], "init_bpd": UNIFORM_BPD if capped else bpd,
                     "raw_bpd": bpd, "capped": capped})  # fmt: skip
    return pd.DataFrame(rows, columns=["rung", "recipe", "seed", "init_bpd", "raw_bpd", "capped"])


def config_keys(runs: pd.DataFrame) -> list[str]:
    return [c for c in runs.columns if "." in c and c.split(".", 1)[0] in ("data", "model", "stabilizers", "train")]


def weights_at(runs: pd.DataFrame, recipe: str, maps: int, blocks: int) -> int:
    """The parameter count of ``recipe``'s model (as its lowest-seed run recorded it) at ``maps`` x
    ``blocks``: the paper's size is 64 x 8 (its preset; the ladder keeps the paper's 2 scales). Any
    recipe's run stands in while ``recipe`` has none (an unfinished ladder).

    runs: collect_runs' runs of a ladder, with every ``section.key`` param."""
    import torch

    from experiments.ladder import parse
    from study.config import unflatten
    from study.flows.realnvp import num_parameters
    from study.model import build_model

    mine = runs[[parse(v)[1] == recipe for v in runs["variant"]]].sort_values(["seed", "variant"])
    mine = mine if len(mine) else runs.sort_values(["seed", "variant"])  # none of it yet: the size is what counts
    flat = {k: plain_value(mine.iloc[0][k]) for k in config_keys(runs)}
    cfg = unflatten({**flat, "model.mid_channels": maps, "model.num_blocks": blocks, "train.compile": "off",
                     "train.threads": 0})  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # a count: the global random state is left as it was
        return num_parameters(build_model(cfg, in_channels=3, image_size=32))


def plain_value(value):
    """A pandas cell back to a Python value (numpy scalars and NaN for a param some runs lack)."""
    if isinstance(value, np.generic):
        return value.item()
    return value
