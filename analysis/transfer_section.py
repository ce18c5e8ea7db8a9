"""The report of a scale ladder (`ablation transfer`, experiments/ladder.py): the learning-rate curves per
size, the largest stable learning rate, LR sensitivity, how each recipe's difference from the seed
report's moves with the model's weights, and the stated prediction for the paper's size beside the GPU
check's table when one is committed (analysis.transfer holds every measure; this module formats them).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd

from analysis import figures, transfer
from analysis.markdown import FINDINGS_END, FINDINGS_START, fmt_ci, fmt_num, fmt_p, md_table
from analysis.stats import with_result
from experiments.ladder import RUNGS
from experiments.presets import preset_config
from study.run.outcome import LABELS

PAPER_MODEL = preset_config("paper").model  # the paper's CIFAR-10 model: its maps and blocks
PAPER_CHECK = "paper-stability.csv"  # the GPU check's table, beside the study's mlflow.db
MEASURES = {"d_best": "best bits/dim on the grid", "d_sensitivity": "LR sensitivity",
            "d_unstable": "share of the grid unstable"}  # fmt: skip
# study.run.outcome's results, short enough for a grid cell
SHORT = {"diverges-in-training": "div", "fails-at-init": "init", "fails-in-eval": "eval", "trains-badly": "bad",
         "": "did not end"}  # fmt: skip


def is_ladder(study: str) -> bool:
    return study == "transfer"


@dataclasses.dataclass(frozen=True)
class Measures:
    """Every ladder figure the sections, the figures and the findings read, computed once."""

    curves: pd.DataFrame  # transfer.lr_curves of the runs that ended
    init: pd.DataFrame  # transfer.init_losses
    weights: dict[str, int]  # rung -> parameters of the baseline recipe's model
    paper_weights: int
    stable: pd.DataFrame  # transfer.largest_stable_lr
    sensitivity: pd.DataFrame  # transfer.lr_sensitivity, per seed
    sensitivity_over: pd.DataFrame  # transfer.over_seeds of it
    diffs: pd.DataFrame  # transfer.differences, per seed
    fits: pd.DataFrame  # transfer.slope_verdicts(transfer.trends(...))
    paper_check: pd.DataFrame | None  # the GPU check's table, when committed beside the store
    paper_check_path: str


def measure(runs: pd.DataFrame, data: dict[str, str] | None, check_path: Path | None) -> Measures:
    """The ladder's measures from collect_runs' pooled runs; ``data`` overrides the runs' recorded data
    source (the report's --data) for the losses at initialisation; ``check_path``: where the GPU check's
    table would be."""
    from study.config import unflatten
    from study.data import load_splits

    ended = with_result(runs)
    ended = ended[ended["result"] != ""].reset_index(drop=True)
    curves = transfer.lr_curves(ended)
    flat = {k: transfer.plain_value(ended.iloc[0][k]) for k in transfer.config_keys(ended)}
    splits = load_splits(dataclasses.replace(unflatten(flat).data, **(data or {})))
    init = transfer.init_losses(ended, splits)
    present = set(curves["rung"])
    weights = {name: transfer.weights_at(ended, transfer.BASELINE, maps, blocks) for name, maps, blocks in RUNGS
               if name in present}  # fmt: skip
    paper_weights = transfer.weights_at(ended, transfer.BASELINE, PAPER_MODEL.mid_channels, PAPER_MODEL.num_blocks)
    sens = transfer.lr_sensitivity(curves, init)
    diffs = transfer.differences(curves, sens)
    fits = transfer.slope_verdicts(transfer.trends(diffs, weights, paper_weights))
    check = transfer.read_paper_check(check_path) if check_path is not None else None
    return Measures(curves, init, weights, paper_weights, transfer.largest_stable_lr(curves), sens,
                    transfer.over_seeds(sens, "sensitivity"), diffs, fits, check,
                    str(check_path) if check_path is not None else "")  # fmt: skip


def draw(m: Measures, fig_dir: Path) -> None:
    figures.ladder_curves(m.curves, fig_dir / "ladder_curves.png", cap=transfer.UNIFORM_BPD)
    figures.ladder_sensitivity(m.sensitivity, m.sensitivity_over, m.weights, fig_dir / "ladder_sensitivity.png")


_f, _ci = fmt_num, fmt_ci


def _w(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def _decades(m: Measures) -> float:
    return math.log10(m.paper_weights / max(m.weights.values()))


def sections(m: Measures, epochs: list[int]) -> list[str]:
    rungs = list(m.weights)
    grid = sorted(set(m.curves["lr"]))
    lines = ["## The ladder", "",
             f"Each recipe trained at every learning rate of a log grid ({', '.join(f'{x:g}' for x in grid)}) at each "
             f"rung of a ladder of sizes: "
             f"{', '.join(f'{r} ({_w(m.weights[r])} weights)' for r in rungs)} maps x blocks, "
             f"against the paper's {PAPER_MODEL.mid_channels}x{PAPER_MODEL.num_blocks} ({_w(m.paper_weights)}), "
             f"{_decades(m):.2f} decades past the top rung. "
             f"{', '.join(map(str, epochs))} epochs a run, seeds {', '.join(map(str, sorted(set(m.curves['seed']))))} "
             "paired across every cell, every recipe in fp32 (precision held fixed). After Wortsman et al. 2023 "
             "(arXiv 2309.14322): an instability of a large model shows at small sizes when the learning rate is high, "
             "and a stabilizer that matters at scale flattens the curve of loss against learning rate.", "",
             "## Learning rate against bits/dim", "",
             "Final validation bits/dim (eval mode, fp32) of each seed's run, `seed 0 · seed 1`; a run that did not "
             f"train is named by its result: {', '.join(f'*{v}* {LABELS[k]}' for k, v in SHORT.items() if k)} "
             "(study.run.outcome), judged on the final validation bits/dim plotted here (a run's recorded result "
             "judges its test bits/dim, which can be below 8 when its validation is not). "
             "Failures are drawn in the figure as x at 8 bits/dim, never dropped.", "",
             md_table(_grid(m.curves)), "", "![learning rate against bits/dim](figures/ladder_curves.png)", "",
             "## Largest stable learning rate", "",
             "The largest learning rate at which no seed's run was an instability, nor at any smaller one on the grid "
             "(an instability below it ends the stable range even if a larger one trains again). An *instability*: a "
             "non-finite result anywhere, or worse than uniform at or above the best learning rate; worse than "
             "uniform below the best, a run learnt too slowly for its epochs, a failure to train but no instability. "
             "*first unstable*: the smallest learning rate with an instability.", "", md_table(_stable(m.stable)), "",
             "## LR sensitivity", "",
             "Wortsman et al.'s measure per seed: over the grid, the mean of min(L(lr), L0) - min L, where L is the "
             "final validation bits/dim, L0 the same seed's model at initialisation and a failed run scores L0. L0 "
             f"is capped at the uniform density's {transfer.UNIFORM_BPD:g} bits/dim, a bar every recipe shares (a "
             "flow at initialisation usually scores worse: *L0 as evaluated*). 0: every learning rate reaches the "
             "best; larger: a narrower basin. Interval: Student t over seeds (1 degree of freedom at 2 seeds: wide, "
             "and shown as it is).",
             "", md_table(_sensitivity(m)), "", "![LR sensitivity against size](figures/ladder_sensitivity.png)", "",
             *_against_baseline(m), *_prediction(m)]  # fmt: skip
    return lines


def _cell(g: pd.DataFrame) -> str:
    parts = [SHORT.get(r.result, r.result) if r.failed else _f(r.val_bpd) for r in g.sort_values("seed").itertuples()]
    return " · ".join(parts)


def _grid(curves: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (rung, recipe), g in curves.groupby(["rung", "recipe"], sort=False):
        row = {"rung": rung, "recipe": recipe}
        for lr, cell in g.groupby("lr", sort=True):
            row[f"lr {lr:g}"] = _cell(cell)
        rows.append(row)
    lrs = [f"lr {lr:g}" for lr in sorted(set(curves["lr"]))]
    return pd.DataFrame(rows, columns=["rung", "recipe", *lrs]).fillna("–")


def _stable(stable: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "rung": stable["rung"], "recipe": stable["recipe"],
        "largest stable lr": [("≥ " if top else "") + (f"{v:g}" if math.isfinite(v) else "none")
                              for v, top in zip(stable["largest_stable_lr"], stable["stable_to_top"], strict=True)],
        "first unstable lr": stable["first_unstable_lr"].map(lambda v: f"{v:g}" if math.isfinite(v) else "–"),
        "unstable / failed / runs": [f"{a}/{b}/{c}" for a, b, c in zip(stable["unstable_runs"], stable["failed_runs"],
                                                                        stable["runs"], strict=True)]})  # fmt: skip


def _sensitivity(m: Measures) -> pd.DataFrame:
    rows = []
    for r in m.sensitivity_over.itertuples():
        s = m.sensitivity
        per = s[(s["rung"] == r.rung) & (s["recipe"] == r.recipe)].sort_values("seed")
        init = m.init[(m.init["rung"] == r.rung) & (m.init["recipe"] == r.recipe)].sort_values("seed")
        rows.append({"rung": r.rung, "recipe": r.recipe,
                     "LR sensitivity [95% t] n": f"{_f(r.mean)} {_ci(r.ci_lo, r.ci_hi)} n={r.n}",
                     "per seed": " · ".join(_f(v) for v in per["sensitivity"]),
                     "best lr per seed": " · ".join(f"{v:g}" if math.isfinite(v) else "–" for v in per["best_lr"]),
                     "best bpd per seed": " · ".join(_f(v) for v in per["best_bpd"]),
                     "L0 as evaluated": " · ".join(_l0(v) for v in init["raw_bpd"])})  # fmt: skip
    return pd.DataFrame(rows)


def _l0(bpd: float) -> str:
    """A loss at initialisation as the report prints it: past the uniform density's 8 bits/dim only that it
    is worse (its digits come from a model far from any trained state, where fp32 kernels of different
    CPUs disagree, and a committed report must regenerate byte-identically on either)."""
    return _f(bpd, 2) if math.isfinite(bpd) and bpd < transfer.UNIFORM_BPD else f">= {transfer.UNIFORM_BPD:g}"


def _against_baseline(m: Measures) -> list[str]:
    d = m.diffs
    means = d.groupby(["recipe", "rung"], sort=False)[list(MEASURES)].mean()
    rows = []
    for r in m.fits.itertuples():
        per_rung = [f"{rung}: {_f(means.loc[(r.recipe, rung), r.measure], 3, True)}" for rung in m.weights
                    if (r.recipe, rung) in means.index]  # fmt: skip
        rows.append({"recipe": r.recipe, "measure": MEASURES[r.measure],
                     "mean difference per rung": ", ".join(per_rung),
                     "slope per decade [95% t]": f"{_f(r.slope, 3, True)} {_ci(r.slope_lo, r.slope_hi, 3, True)}",
                     "p (Holm)": f"{fmt_p(r.p)} ({fmt_p(r.p_holm)})",
                     "TOST ±m, Holm p": f"±{r.margin:g}: {fmt_p(r.tost_p_holm)}", "verdict": r.verdict})  # fmt: skip
    return ["## Each recipe against the seed report's, as the model grows", "",
            f"Per seed and rung, each recipe minus "
            f"`{transfer.BASELINE}` (the same seed and rung): in its best bits/dim on "
            "the grid, in LR sensitivity, and in the share of the grid whose run was an instability (positive: worse, "
            "more sensitive, more often unstable). Slope: OLS of those differences on log10(weights), one point per "
            "(rung, seed), with its t interval on n - 2 degrees of freedom. Verdicts typed and Holm-adjusted over "
            "every row: *grows* or *shrinks with size* (slope Holm p <= 0.05), *equivalent within ±m per decade* "
            "(two one-sided t tests of the slope against m: "
            f"{', '.join(f'{transfer.SLOPE_MARGINS[k]:g} for the {v}' for k, v in MEASURES.items())}),"
            " else *inconclusive*.", "", _table_or(pd.DataFrame(rows), "No recipe has a run paired with the baseline's "
            "yet."), ""]  # fmt: skip


def _table_or(table: pd.DataFrame, empty: str) -> str:
    return md_table(table) if len(table) else empty


def _prediction(m: Measures) -> list[str]:
    span = f"{_w(min(m.weights.values()))} to {_w(max(m.weights.values()))}"
    rows = []
    for r in m.fits.itertuples():
        rows.append({"recipe": r.recipe, "measure": MEASURES[r.measure],
                     f"predicted at {_w(m.paper_weights)} [95% prediction interval]":
                         f"{_f(r.predicted, 3, True)} {_ci(r.pred_lo, r.pred_hi, 3, True)}",
                     "refuted by a paper-size "
                     "difference": f"below {_f(r.pred_lo, 3, True)} or above {_f(r.pred_hi, 3, True)}"
                     if math.isfinite(r.pred_lo) else "–"})  # fmt: skip
    lines = ["## Prediction for the paper's size", "",
             f"**An extrapolation from {len(m.weights)} rungs** ({span} weights) to the paper's {_w(m.paper_weights)}, "
             f"{_decades(m):.2f} decades past the top rung: each line of the fit above evaluated at log10("
             f"{m.paper_weights}), with the 95% interval for one new (rung, seed) difference there. It assumes the "
             "difference stays linear in log(weights) and that 64 maps x 8 blocks change nothing else (the ladder "
             "grows the maps at 2 blocks). It is refuted by the same measurement at the paper's size (the same "
             "recipes, grid, epochs and images; one seed) falling outside the interval.", "",
             _table_or(pd.DataFrame(rows), "No prediction yet: no recipe has a run paired with the baseline's."),
             ""]  # fmt: skip
    return lines + _paper_check(m)


def _paper_check(m: Measures) -> list[str]:
    head = ["### At the paper's size, on a GPU", ""]
    if m.paper_check is None:
        return head + [f"No GPU check is committed (`{m.paper_check_path}`). `CHECK_ONLY=paper-stability bash "
                       "scripts/gpu/check.sh` on a lent GPU trains each recipe at the paper's size at the seed "
                       "report's learning rate and at 3x and 10x it for a fixed number of steps and writes that "
                       "table; this section then shows it beside the prediction.", ""]  # fmt: skip
    t = m.paper_check
    first = t.iloc[0]
    shown = t.assign(lr=t["lr"].map(lambda v: f"{v:g}"), train_bpd=t["train_bpd"].map(_f), val_bpd=t["val_bpd"].map(_f),
                     max_grad_norm=t["max_grad_norm"].map(lambda v: _f(v, 0)))  # fmt: skip
    cols = [c for c in transfer.PAPER_CHECK_COLUMNS if c not in ("device", "date", "commit")]
    flagged = t.assign(failed=t["result"] != "trained")
    fails = flagged.assign(unstable=transfer.mark_unstable(flagged, ["recipe"])).groupby("recipe")["unstable"]
    fails = fails.agg(["sum", "size"])
    base = fails.loc[transfer.BASELINE] if transfer.BASELINE in fails.index else None
    said = []
    for r in m.fits[m.fits["measure"] == "d_unstable"].itertuples():
        if r.recipe not in fails.index or base is None:
            continue
        seen = fails.loc[r.recipe, "sum"] / fails.loc[r.recipe, "size"] - base["sum"] / base["size"]
        inside = r.pred_lo <= seen <= r.pred_hi if math.isfinite(r.pred_lo) else None
        said.append(f"- `{r.recipe}`: unstable at {fails.loc[r.recipe, 'sum']} of {fails.loc[r.recipe, 'size']} "
                    f"learning rates against "
                    f"{base['sum']} of {base['size']} for `{transfer.BASELINE}`, an unstable-share difference "
                    f"of {seen:+.2f}; predicted {_f(r.predicted, 2, True)} {_ci(r.pred_lo, r.pred_hi, 2, True)} on the "
                    f"ladder's grid: {'inside' if inside else 'outside' if inside is not None else 'no prediction'} "
                    "(3 learning rates, not the ladder's 6: a consistency check, not the refuting "
                    "measurement).")  # fmt: skip
    return head + [f"`{m.paper_check_path}`: "
                   f"{first['device']}, {first['date']}, code `{first['commit']}`. Each recipe at "
                   f"{int(first['maps'])}x{int(first['blocks'])} maps x blocks for {int(t['steps'].max())} steps.", "",
                   md_table(shown[cols]), "", *said, ""]  # fmt: skip


def findings(m: Measures) -> list[str]:
    """One sentence per recipe, from the typed slope verdicts and the prediction."""
    lines = [FINDINGS_START, f"**scale ladder** ({len(m.weights)} rungs, {_w(min(m.weights.values()))} to "
             f"{_w(max(m.weights.values()))} weights; against `{transfer.BASELINE}`)", ""]  # fmt: skip
    for recipe, rows in m.fits.groupby("recipe", sort=False):
        parts = []
        for r in rows.itertuples():
            parts.append(f"{MEASURES[r.measure]}: slope "
                         f"{_f(r.slope, 3, True)} {_ci(r.slope_lo, r.slope_hi, 3, True)} per "
                         f"decade, Holm p {fmt_p(r.p_holm)}, **{r.verdict}**; at the paper's {_w(m.paper_weights)} "
                         f"{_f(r.predicted, 3, True)} {_ci(r.pred_lo, r.pred_hi, 3, True)} (extrapolated)")  # fmt: skip
        lines += [f"- `{recipe}` minus `{transfer.BASELINE}`: " + "; ".join(parts) + "."]
    return lines + ["", FINDINGS_END]


def cannot_say(m: Measures) -> list[str]:
    return [f"- Anything measured at the paper's size: the prediction extrapolates {_decades(m):.2f} decades past the "
            "largest rung and assumes a straight line in log(weights); the ladder grows the maps at 2 blocks, the "
            "paper has 8.",
            "- Long-run behaviour: every run is a few epochs on the CIFAR-10 slices, so a recipe whose instability "
            "appears late, or whose best learning rate moves with the run's length, is not seen.",
            f"- Slopes inside their intervals: at "
            f"{m.curves['seed'].nunique()} seeds a slope whose interval is wider than "
            "its margin is *inconclusive*, never *no change with size*."]  # fmt: skip
