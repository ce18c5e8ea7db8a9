"""The report's long-run sections: the seed report's Table 2 in form, and what 100 epochs change
(variance split, the short-run verdicts re-read, overfitting, late events), from analysis.longrun.

Rendered for a study whose runs are planned at least as long as the window; a shorter study keeps the
short-run report, whose window the per-variant table labels with its real length.
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd

from analysis import longrun
from analysis.markdown import fmt_ci, fmt_num, fmt_p, md_table
from analysis.reference import PAPER_BPD, SEED_BPD, SEED_SPREAD
from experiments.ablation import EQUIVALENCE_MARGIN, label

Beside = tuple  # (study.store.Store, experiment) of a committed short study


_f, _ci = fmt_num, fmt_ci


def _summary(s: dict) -> str:
    return f"{_f(s['mean'])} ± {_f(s['std'])} {_ci(s['ci_lo'], s['ci_hi'])} n={s['n']}"


def is_long(runs: pd.DataFrame, window: int) -> bool:
    """Whether the study's runs are planned to cover the seed report's window."""
    planned = pd.to_numeric(runs.get("train.epochs", runs["epochs"]), errors="coerce")
    return bool(len(runs)) and bool((planned >= window).all())


@dataclasses.dataclass(frozen=True)
class Measures:
    """What the long-run sections and the findings both read, computed once."""

    per_run: pd.DataFrame  # longrun.window_stats, by variant and seed
    recipes: pd.DataFrame  # longrun.recipe_table
    verdicts: pd.DataFrame  # longrun.verdicts_over_time (empty when no family contrast has runs)


def measure(runs: pd.DataFrame, history: pd.DataFrame, window: int, families) -> Measures:
    per_run = longrun.window_stats(history, window).sort_values(["variant", "seed"])
    return Measures(per_run, longrun.recipe_table(per_run, runs),
                    longrun.verdicts_over_time(runs, history, families, longrun.EARLY, window))  # fmt: skip


def beside_figures(beside: tuple[Beside, ...], variants: list[str]) -> dict[str, dict[str, str]]:
    """For each committed short study: {column title: {variant: its test bits/dim over the seeds that
    trained, mean ± sd [95% t] n}}, for the variants it ran."""
    from analysis.collect import collect_runs
    from analysis.stats import summarize

    out = {}
    for store, experiment in beside:
        runs, _, _ = collect_runs(store, experiment)
        runs = runs[runs["excluded"] == ""]
        # the length its runs trained for: a run that failed at initialisation ran 0 epochs of it
        epochs = sorted({int(e) for e in runs.loc[runs["result"] == "trained", "epochs"]})
        column = f"test bpd, `{experiment}` ({'/'.join(map(str, epochs))} epochs)"
        out[column] = {v: _summary(summarize(r.loc[r["result"] == "trained", "test_bpd"]))
                       for v, r in runs.groupby("variant") if v in variants}  # fmt: skip
    return out


def table2(runs: pd.DataFrame, history: pd.DataFrame, window: int, m: Measures, beside: tuple[Beside, ...],
           caveat: str) -> list[str]:  # fmt: skip
    """The seed report's Table 2 in form: per recipe over seeds, per run, and the reference figures."""
    from analysis.stats import summarize

    per_run, recipes = m.per_run, m.recipes
    early = longrun.at_epoch(history, longrun.EARLY)
    trained = runs[runs["result"] == "trained"]
    variants = list(recipes["variant"])
    others = beside_figures(beside, variants)
    rows = []
    for r in recipes.itertuples():
        ids = trained.loc[trained["variant"] == r.variant, "run_id"]
        rows.append({
            "recipe": label(r.variant), "trained / runs": f"{r.trained}/{r.runs}",
            "window": r.spans or "–",
            "val bpd, window mean over seeds": _summary(
                {"mean": r.mean, "std": r.std, "ci_lo": r.ci_lo, "ci_hi": r.ci_hi, "n": r.n}),
            "within-run std (mean over seeds)": _f(r.within_std),
            f"val bpd at epoch {longrun.EARLY}, same runs": _summary(summarize(ids.map(early))),
            **{col: figs.get(r.variant, "not run") for col, figs in others.items()},
            "test bpd, final model": _summary(summarize(trained.loc[trained["variant"] == r.variant, "test_bpd"])),
        })  # fmt: skip
    refs = pd.DataFrame([
        {"source": "paper (Dinh et al. 2017, Table 1)", "bits/dim": _f(PAPER_BPD, 2), "std": "–",
         "what": "test bits/dim, 64 maps x 8 blocks, 50,000 training images"},
        {"source": "seed report, Table 2", "bits/dim": _f(SEED_BPD, 2), "std": _f(SEED_SPREAD),
         "what": "validation bits/dim, mean and std over the last 40 of 100 epochs of its one run"},
    ])  # fmt: skip
    runs_by_id = runs.set_index("run_id")
    per = per_run.assign(
        recipe=per_run["variant"].map(label),
        result=per_run["run_id"].map(runs_by_id["result"]),
        mean=per_run["mean"].map(_f), std=per_run["std"].map(_f), std1=per_run["std1"].map(_f),
        test=per_run["run_id"].map(runs_by_id["test_bpd"]).map(_f),
    )  # fmt: skip
    per = per[["recipe", "seed", "result", "span", "mean", "std", "std1", "test", "run_id"]].rename(columns={
        "span": "window", "mean": "val bpd, window mean", "std": "std (n)", "std1": "std (n - 1)",
        "test": "test bpd, final"})  # fmt: skip
    return ["## The seed report's Table 2, in form", "",
            f"> {caveat}", "",
            "The seed report's Table 2 is the mean and std of validation bits/dim over the last 40 of its 100 "
            "epochs, of one run. It does not say how its std divides (n or n - 1), what its validation set was, or "
            "whether batch norm was in eval mode. Here each epoch's value is bits/dim of the whole validation split "
            f"in eval mode (fp32), the window is each run's last {window} epochs, labelled with the epochs it "
            "covers, and std divides by n (n - 1 is shown beside it). Per recipe, the window means of the runs that "
            "trained: mean ± sd over seeds [95% Student-t interval, n - 1 df], n = seeds. The epoch-6 column is the "
            "same runs where the committed studies stop (validation; the learning rate is constant, so it is a "
            "6-epoch run of the same seed); the committed studies' own 6-epoch figures are their test bits/dim.", "",
            md_table(pd.DataFrame(rows)), "", "Reference figures:", "", md_table(refs), "",
            "Each run:", "", md_table(per), ""]  # fmt: skip


def _verdict(t: str, d: str, diff: float, lo: float, hi: float, p: float) -> str:
    if not math.isfinite(diff):
        return "–"
    words = {"effect": f"**effect** ({d})", "equivalent": f"**equivalent within ±{EQUIVALENCE_MARGIN:g}**"}
    word = words.get(t, f"**{t}**")
    return f"{diff:+.3f} {_ci(lo, hi, sign=True)}, Holm {fmt_p(p)}: {word}"


def changes(runs: pd.DataFrame, history: pd.DataFrame, window: int, m: Measures) -> list[str]:
    """What 100 epochs change: the variance split, the short-run verdicts re-read, overfitting, events."""
    trained = set(runs.loc[runs["result"] == "trained", "run_id"])
    split = longrun.variance_split(history[history["run_id"].isin(trained)], window)
    split_t = pd.DataFrame({
        "recipe": split["variant"].map(label), "runs": split["runs"], "K": split["K"],
        "within-run sd (epoch to epoch)": split["within_sd"].map(_f), "lag-1 r": split["lag1"].map(lambda v: _f(v, 2)),
        "sd of a window mean from epoch noise": split["noise_sd"].map(_f),
        "between-seed sd of the window mean": split["between_sd"].map(_f),
        "seed component": split["seed_sd"].map(_f),
    })  # fmt: skip
    v = m.verdicts
    lines = ["## What 100 epochs change", "",
             "### Epoch noise against seeds", "",
             f"The seed report's ± {SEED_SPREAD} is a within-run std: how much one run's validation figure moves "
             "from epoch to epoch. A second seed moves the window *mean* by the between-seed sd. Part of that is "
             "epoch noise itself, the sd of a K-epoch mean of a series as noisy and as autocorrelated as the window "
             "(an AR(1) reading, lag-1 r bias-corrected); the rest is the seed component (method of moments, 0 when "
             f"noise explains it all). Runs that trained only; at {runs['seed'].nunique()} seeds a between-seed sd is "
             "itself uncertain by a factor of about 2.", "",
             md_table(split_t), ""]  # fmt: skip
    if len(v):
        table = pd.DataFrame({
            "family": v["family"], "contrast": [f"{label(a)} vs {label(b)}" for a, b in zip(v["variant"], v["against"],
                                                                                             strict=True)],
            "pairs": v["pairs"],
            **{title: [_verdict(*row) for row in zip(v[f"{r}_type"], v[f"{r}_dir"], v[f"{r}_diff"], v[f"{r}_lo"],
                                                     v[f"{r}_hi"], v[f"{r}_p_holm"], strict=True)]
               for r, title in (("early", f"val bpd at epoch {longrun.EARLY}"),
                                ("window", f"val bpd, last {window} mean"), ("test", "test bpd, final model"))},
            "6-epoch verdict held": v["change"].map({"held": "yes", "resolved": "resolved", "did not hold": "**no**"}),
        })  # fmt: skip
        lines += ["### The short-run verdicts at 100 epochs", "",
                  f"Each contrast the study declares, paired over the seeds where both runs trained, read at epoch "
                  f"{longrun.EARLY} (where the committed studies stop), over the last {window} epochs, and on the "
                  "final model's test split; each reading Holm-corrected within its family, with the typed verdicts "
                  f"of the stabilizer studies (effect, equivalent within ±{EQUIVALENCE_MARGIN:g}, inconclusive). "
                  f"*Held*: the window reading has the epoch-{longrun.EARLY} reading's type and direction; "
                  f"*resolved*: the epoch-{longrun.EARLY} reading was inconclusive, so it claimed nothing the window "
                  "could overturn; *no*: a typed verdict whose type or direction changed.", "",
                  md_table(table), ""]  # fmt: skip
    o = longrun.overfitting(history).sort_values(["variant", "seed"])
    o_t = pd.DataFrame({
        "recipe": o["variant"].map(label), "seed": o["seed"], "epochs": o["epochs"], "best val epoch": o["best_epoch"],
        "best val bpd": o["best_val"].map(_f), "last epoch above best": o["last_above_best"].map(lambda x: f"{x:+.3f}"),
        f"val - train, epoch {longrun.EARLY}": o["gap_early"].map(lambda x: f"{x:+.3f}"),
        "val - train, last epoch": o["gap_last"].map(lambda x: f"{x:+.3f}"),
    })  # fmt: skip
    lines += ["### Overfitting", "",
              "Per run: the epoch of its best validation figure, how far its last epoch is above it, and the gap "
              "between validation and training bits/dim (training is the epoch's running mean in train mode, so an "
              "early gap also holds the within-epoch improvement; a gap that grows over the epochs is overfitting).",
              "", md_table(o_t), "",
              "### Divergence and recovery late in training", "",
              "Per recipe, non-finite steps that the run recovered from (skipped and restored), counted by when they "
              "happened, and the runs that ended diverged (with the epoch of their first non-finite step).", "",
              md_table(longrun.late_events(history, runs, window).assign(recipe=lambda t: t["variant"].map(label))
                       .drop(columns="variant").set_index("recipe").reset_index()), "",
              "![long runs](figures/long_run.png)", ""]  # fmt: skip
    return lines


def findings(m: Measures, window: int) -> list[str]:
    """The long run's sentences for the findings block: Table 2's headline and which verdicts held."""
    lines = ["**the seed report's statistic**", ""]
    for r in m.recipes.itertuples():
        lines.append(f"- {label(r.variant)}: validation bits/dim over {r.spans or 'no window'} "
                     f"{_f(r.mean)} [{_f(r.ci_lo)}, {_f(r.ci_hi)}] over {r.n} seeds (between-seed sd {_f(r.std)}), "
                     f"within-run std {_f(r.within_std)}; {r.trained}/{r.runs} runs trained. Beside the seed report's "
                     f"{SEED_BPD} ± {SEED_SPREAD} at the paper's scale: not comparable.")  # fmt: skip
    if len(m.verdicts):
        lines += ["", "**the 6-epoch verdicts at 100 epochs**", ""]
        for r in m.verdicts.itertuples():
            before = f"{r.early_type}{' (' + r.early_dir + ')' if r.early_dir else ''}"
            after = f"{r.window_type}{' (' + r.window_dir + ')' if r.window_dir else ''}"
            measured = (f"{r.window_diff:+.3f} {_ci(r.window_lo, r.window_hi, sign=True)}, {r.pairs} pairs"
                        if math.isfinite(r.window_diff) else f"{r.pairs} pairs trained")  # fmt: skip
            lines.append(f"- {label(r.variant)} vs {label(r.against)} ({r.family}): {before} at epoch {longrun.EARLY}, "
                         f"{after} over the last {window} epochs ({measured}): "
                         + {"held": "held.", "did not hold": "**did not hold**.",
                            "resolved": "resolved (an inconclusive 6-epoch reading claimed nothing to overturn)."}[
                             r.change])  # fmt: skip
    return lines + [""]
