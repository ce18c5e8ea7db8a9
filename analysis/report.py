"""report/README.md regenerated from an MLflow experiment: every run counted, what acted, each family's
corrected comparisons, the factorial's effects, diagnoses, figures, and the findings they support.

Everything is computed from the runs (analysis.collect -> stats, activity, comparisons, factorial,
diagnosis), then rendered; re-running on the same store writes the same bytes (no timestamps, sorted
rows, no random resampling).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from analysis import figures, longrun_section, transfer_section
from analysis.collect import collect_lr_search, collect_runs
from analysis.comparisons import family_comparisons, sentence
from analysis.markdown import FINDINGS_END, FINDINGS_START, fmt_ci, fmt_num, fmt_p, md_table
from analysis.reference import PAPER_BPD, REFERENCES, TOST_MARGIN
from analysis.stats import failures, tost, variant_table
from experiments.ablation import EQUIVALENCE_MARGIN, label
from study import schema
from study.metrics import UNIFORM_BPD
from study.run.outcome import LABELS

MARGIN_REASON = ("below every gap between successive published CIFAR-10 flows (Real NVP 3.49, Glow 3.35, Flow++ "
                 "3.08) and about a third of the seed report's epoch-to-epoch spread, 0.137")  # fmt: skip

METHOD = "mean ± sd over seeds [95% Student-t interval], n = runs averaged"


_fmt, _ci = fmt_num, fmt_ci




_md = md_table


@dataclasses.dataclass
class Study:
    """Everything the report shows, computed once from the store (render functions only format it)."""

    uri: str
    experiment: str
    window: int
    study: str  # the ablation study's name (stabilizers, factorial, ...)
    all_runs: pd.DataFrame  # every run of the experiment
    runs: pd.DataFrame  # the pooled ones: one per (variant, seed), config as its variant says
    history: pd.DataFrame
    parents: pd.DataFrame
    table: pd.DataFrame
    fails: pd.DataFrame
    comparisons: pd.DataFrame
    factorial: tuple | None  # (failure effects, EffectsFit, coded runs) of a factorial study
    diagnosis: tuple[pd.DataFrame | None, str]
    audits: list
    lr_trials: pd.DataFrame
    beside: tuple = ()  # (Store, experiment) of short studies a long study's Table 2 shows beside its own

    @property
    def long(self) -> bool:
        """Runs planned to cover the seed report's window: the long-run sections are rendered."""
        return longrun_section.is_long(self.runs, self.window)

    @functools.cached_property
    def long_measures(self) -> longrun_section.Measures:
        """The long-run figures the sections and the findings share, computed once."""
        from experiments.studies import families

        return longrun_section.measure(self.runs, self.history, self.window, families(self.study))


def collect_study(store, experiment: str, window: int, data: dict[str, str] | None, run_audit: bool,
                  lr_experiment: str | None, say=lambda line: None) -> Study:  # fmt: skip
    """The study's runs and every figure the report prints, computed once; ``say`` hears each stage."""
    from analysis import diagnosis
    from experiments.studies import FACTORIAL_STUDIES, families

    all_runs, all_history, parents = collect_runs(store, experiment)  # nothing said before: bad input is one line
    epochs = int(all_history["epoch"].max()) if len(all_history) else 0
    say(f"read {len(all_runs)} runs of {experiment} (up to {epochs} epochs); comparing")
    name = parents["study"].dropna().iloc[0] if parents["study"].notna().any() else "stabilizers"
    runs = all_runs[all_runs["excluded"] == ""].reset_index(drop=True)
    history = all_history[all_history["run_id"].isin(set(runs["run_id"]))].reset_index(drop=True)
    factorial = None
    ladder = transfer_section.is_ladder(name)  # its measures are curves over the grid: analysis.transfer_section
    if name in FACTORIAL_STUDIES:
        from analysis.factorial import bpd_effects, coded, failure_effects

        done = runs[runs["outcome"] != "skipped"]
        factorial = (failure_effects(done), bpd_effects(done), coded(done))
        comparisons = pd.DataFrame()
    else:
        comparisons = pd.DataFrame() if ladder else family_comparisons(runs, history, families(name))
    run_audit = run_audit and not ladder
    if run_audit:
        say("diagnosis and accounting audit: re-evaluating checkpoints on the data")
    diag = diagnosis.diagnose(runs, history, store, data) if run_audit else (None, "not run (--no-audit)")
    audits = diagnosis.audits(runs, store, data) if run_audit else []
    lr_trials = collect_lr_search(store, lr_experiment or f"lr-search-{runs.iloc[0].get('preset')}")
    return Study(store.uri, experiment, window, name, all_runs, runs, history, parents, variant_table(runs, history, window),
                 failures(runs, history), comparisons, factorial, diag, audits, lr_trials)  # fmt: skip


def _figures(st: Study, fig_dir: Path, store) -> None:
    _fresh(fig_dir)
    runs, history = st.runs, st.history
    figures.learning_curves(history, fig_dir / "learning_curves.png")
    events = runs.dropna(subset=["first_nonfinite_epoch"]).rename(columns={"first_nonfinite_epoch": "epoch"})
    figures.gradient_traces(history, fig_dir / "gradient_norms.png", events=events.assign(epoch=pd.to_numeric(events["epoch"])))
    if len(st.comparisons):
        figures.family_effects(st.comparisons, fig_dir / "effects.png")
    if st.factorial is not None and st.factorial[1].estimable:
        _, fit, data = st.factorial
        figures.half_normal(fit.effects, fig_dir / "half_normal.png")
        pairs = _interaction_pairs(fit)
        if pairs:  # none when every interaction is aliased or dropped among the runs that trained
            figures.interaction_plots(data[~data["failed"]], pairs, fig_dir / "interactions.png")
    with tempfile.TemporaryDirectory() as tmp:
        grids = _samples(runs, Path(tmp), store)
        if grids:
            figures.sample_panel(grids, fig_dir / "samples.png")
    if len(st.lr_trials):
        figures.lr_search(st.lr_trials, fig_dir / "lr_search.png")
    if st.long:
        figures.long_run(history, fig_dir / "long_run.png", st.window)


def _fresh(fig_dir: Path) -> None:
    """An empty figures/ folder: a figure a re-run no longer draws must not stay behind."""
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    fig_dir.mkdir(parents=True)


def _interaction_pairs(fit) -> list[tuple[str, str]]:
    """The Holm-significant interactions, else the two largest: [(coded column a, coded column b)]."""
    inter = fit.effects[fit.effects["kind"] == "interaction"]
    chosen = inter[inter["p_holm"] <= 0.05]
    if chosen.empty:
        chosen = inter.reindex(inter["effect"].abs().sort_values(ascending=False).index).head(2)
    return [tuple(x.replace("-", "_") for x in t.split(" x ")) for t in chosen["term"]]


def _samples(runs: pd.DataFrame, tmp: Path, store) -> dict[str, Path]:
    """The last sample grid at temperature 0.7 of each variant's lowest-seed run, where it is stored."""
    grids = {}
    for variant, r in runs[runs["outcome"] != "skipped"].groupby("variant", sort=True):
        first = r.sort_values("seed").iloc[0]
        try:
            grids[variant] = store.download_artifact(first["run_id"], schema.sample_artifact(int(first["epochs"]), 0.7),
                                                     tmp / variant)  # fmt: skip
        except FileNotFoundError:  # artifacts of another machine's store may not be reachable here
            continue
    return grids


def _header(st: Study, command: str) -> list[str]:
    runs, parents, everything = st.runs, st.parents, st.all_runs
    first = runs.iloc[0]
    epochs = sorted({int(e) for e in runs.get("train.epochs", runs["epochs"])})  # configured, not reached
    commits = sorted(set(everything["git_commit"]) | set(parents["git_commit"].dropna()))
    dirty = int(everything["git_commit"].str.endswith("-dirty").sum())
    lines = [f"# Real NVP stabilizer study: {st.experiment}", "", *_unfinished(st),
             f"Generated from MLflow by `{command or 'python run_study.py report'}`. Do not edit by hand: "
             "re-running the command rewrites this file and figures/ identically.", ""]  # fmt: skip
    if transfer_section.is_ladder(st.study):
        sizes = sorted({(int(a), int(b)) for a, b in zip(runs["model.mid_channels"], runs["model.num_blocks"], strict=True)})
        model = f"{', '.join(f'{a}x{b}' for a, b in sizes)} feature maps x residual blocks (the ladder's rungs)"
    else:
        model = (f"{int(first.get('model.mid_channels', 0))} feature maps, {int(first.get('model.num_blocks', 0))} residual "
                 "blocks")  # fmt: skip
    if first.get("preset") != "paper":
        lines += [f"> **Reduced scale.** Preset `{first.get('preset')}`: {int(first.get('model.num_scales', 0))} scales, "
                  f"{model}, {', '.join(map(str, epochs))} epochs, batch {int(first.get('train.batch_size', 0))}, "
                  f"{_images(first)}. The paper trains 64 maps x 8 blocks for 100 epochs on 50,000 images. Numbers here are "
                  "comparable with each other, **not with the paper's 3.49**: no equivalence test against it is made.", ""]  # fmt: skip
    provenance = "all from one clean commit" if len(commits) == 1 and not dirty else f"{dirty} runs from modified trees"
    return lines + [
        "## Provenance", "",
        f"- tracking store: `{st.uri}`, experiment `{st.experiment}`, study `{st.study}`",
        f"- data: `{first.get('data.source')}` {('`' + str(first.get('data.path')) + '`') if first.get('data.path') else '(embedded)'}, "
        f"validation fraction {first.get('data.val_fraction')}, split seed {first.get('data.split_seed')}",
        f"- seeds: {', '.join(map(str, sorted(set(runs['seed']))))} (shared across variants, so comparisons pair up)",
        f"- runs: {len(everything)} recorded, {len(runs)} pooled, {len(everything) - len(runs)} not pooled (listed at the end)",
        f"- code: {', '.join(f'`{c}`' for c in commits)} ({provenance}); hardware: {', '.join(sorted(set(everything['device'])))}",
        f"- study parent runs: {', '.join(f'`{p}`' for p in parents['run_id'])}", "",
        "## Reference figures", "",
        _md(pd.DataFrame([{**r, "spread": _fmt(r["spread"]) if r["spread"] else "–"} for r in REFERENCES])), "",
        *_paper_equivalence(st), ]  # fmt: skip


def unfinished_cells(all_runs: pd.DataFrame, parents: pd.DataFrame) -> dict | None:
    """How far an unfinished study got: {finished, running, planned (None when a parent predates the
    count)}; None when every planned cell (every recorded one, without a count) has ended.
    all_runs: one row per child run (status, outcome); parents: one row per study parent (cells_planned)."""
    ended = (all_runs["status"] != "RUNNING") & ~all_runs["outcome"].isin(["unfinished", "interrupted"])
    finished, running = int(ended.sum()), int((all_runs["status"] == "RUNNING").sum())
    known = parents["cells_planned"].dropna()
    planned = int(known.sum()) if len(known) == len(parents) and len(parents) else None
    if finished >= (planned if planned is not None else len(all_runs)):
        return None
    return {"finished": finished, "running": running, "planned": planned}


def _unfinished(st: Study) -> list[str]:
    state = unfinished_cells(st.all_runs, st.parents)
    if state is None:
        return []
    of = f" of {state['planned']} planned" if state["planned"] is not None else f" of {len(st.all_runs)} recorded"
    return [f"> **Unfinished study: {state['finished']}{of} cells have finished** ({state['running']} running). "
            "Every table and figure below covers the runs that ended so far: run the study's command again to "
            "complete it, then regenerate this report.", ""]  # fmt: skip


def _images(first: pd.Series) -> str:
    limit = int(first.get("data.train_limit", 0) or 0)
    return f"the first {limit} training images" if limit else "all training images of the source"


def _paper_equivalence(st: Study) -> list[str]:
    """TOST against the paper's 3.49, at the paper's scale only."""
    if st.runs.iloc[0].get("preset") != "paper":
        return []
    rows = []
    for variant, r in st.runs.groupby("variant", sort=True):
        t = tost(r["test_bpd"], PAPER_BPD, TOST_MARGIN)
        rows.append({"variant": variant, "n": t["n"], "90% t interval": _ci(t["ci90_lo"], t["ci90_hi"]),
                     "TOST p": fmt_p(t["p"]), "equivalent to 3.49 ± " + f"{TOST_MARGIN}": "yes" if t["p"] < 0.05 else "no"})  # fmt: skip
    return ["## Against the paper (equivalence)", "",
            f"Two one-sided t-tests of test bits/dim against {PAPER_BPD} with a margin of ±{TOST_MARGIN} stated before "
            "looking: equivalent when the 90% interval lies inside the margin.", "", _md(pd.DataFrame(rows)), ""]  # fmt: skip


def _results(st: Study) -> list[str]:
    """Per variant, how many runs ended in each result (study.run.outcome)."""
    r = st.runs.assign(result=st.runs["result"].replace("", "did not end"))
    kinds = [k for k in (*LABELS, "did not end") if k in set(r["result"])]
    table = (r.groupby("variant")["result"].value_counts().unstack(fill_value=0).reindex(columns=kinds, fill_value=0)
             .reset_index())  # fmt: skip
    table["variant"] = table["variant"].map(label)
    return ["## What happened to each run", "",
            "Per variant, each run's result: *fails at initialisation* (non-finite before any update; GradScaler's own "
            "skipped steps are not updates), *diverges in training* (non-finite after some updates), *fails in "
            "evaluation* (training finite, eval-mode validation or test not; its cause says whether batch statistics "
            "score the same images finitely), *trains badly* (finite, but the final model no better than the uniform "
            "density's 8 bits/dim, a bar that does not move with the model's size or the run's length), *trained*. "
            "Only *trained* runs enter a bits/dim comparison; every other result is a failure to train.", "",
            _md(table.rename(columns={k: LABELS.get(k, k) for k in kinds})), ""]  # fmt: skip


def _counted(st: Study) -> list[str]:
    f = st.fails
    shown = f.assign(first_nonfinite_epoch=f["first_nonfinite_epoch"].map(lambda v: "–" if v is None or pd.isna(v) else int(v)))
    return ["## Every run counted", "",
            "Per variant: how each run ended. *non-finite val*: a NaN or infinite validation epoch; *all-NaN val*: not one "
            "finite validation epoch; *infinite*: an infinite validation or test value; *non-finite test*: a finished run "
            "without a finite test value; *unfinished*: still running or crashed. Means below are over finished runs only.",
            "", _md(shown.rename(columns={"nonfinite_val": "non-finite val", "all_nan_val": "all-NaN val",
                                          "nonfinite_test": "non-finite test", "first_nonfinite_epoch": "first non-finite epoch"})),
            ""]  # fmt: skip


def _variants(st: Study) -> list[str]:
    t = st.table
    span = ", ".join(sorted(set(w for w in t["window"] if w))) or "last epochs (no run has finished yet)"
    rows = pd.DataFrame({
        "variant": t["variant"].map(label),
        "finished / runs": [f"{a}/{b}" for a, b in zip(t["finished"], t["runs"], strict=True)],
        f"val bpd, {span}": [f"{_fmt(m)} ± {_fmt(s)} {_ci(lo, hi)} n={n}" for m, s, lo, hi, n in
                              zip(t["val_mean"], t["val_std"], t["val_ci_lo"], t["val_ci_hi"], t["val_n"], strict=True)],
        "val bpd, final epoch": [f"{_fmt(m)} ± {_fmt(s)} n={n}" for m, s, n in zip(t["final_mean"], t["final_std"], t["final_n"], strict=True)],
        "within-run std of a still-falling curve": t["val_std_within"].map(_fmt),
        "test bpd": [f"{_fmt(m)} ± {_fmt(s)} {_ci(lo, hi)} n={n}" for m, s, lo, hi, n in
                     zip(t["test_mean"], t["test_std"], t["test_ci_lo"], t["test_ci_hi"], t["test_n"], strict=True)],
        "img/s": t["images_per_s"].map(lambda v: _fmt(v, 0)),
    })  # fmt: skip
    if st.long:
        about = (f"Validation bits/dim (eval mode, fp32, whole validation split) averaged over each run's {span} (the "
                 "seed report's window; its Table 2 in form follows) and the final epoch's value; test bits/dim of the "
                 f"final model, whole test split. Each cell: {METHOD}; finished runs only.")  # fmt: skip
        return ["## Per variant", "", about, "", _md(rows.rename(columns={
            "within-run std of a still-falling curve": "within-run std"})), ""]  # fmt: skip
    return ["## Per variant", "",
            f"Validation bits/dim (eval mode, fp32, whole validation split) averaged over each run's {span} — the seed "
            f"report's statistic is the last 40 of 100 epochs, which these runs are too short for — and the final epoch's "
            f"value; test bits/dim of the final model, whole test split. Each cell: {METHOD}; finished runs only. The within-run "
            "std is the spread of a curve that is still falling over so short a window, not comparable with the seed "
            "report's 0.137 over epochs 61-100.",
            "", _md(rows), ""]  # fmt: skip


def _long_run(st: Study) -> list[str]:
    if not st.long:
        return []
    first = st.runs.iloc[0]
    caveat = (f"**Reduced scale.** {int(first.get('model.mid_channels', 0))} feature maps x "
              f"{int(first.get('model.num_blocks', 0))} residual blocks, batch {int(first.get('train.batch_size', 0))}, "
              f"{_images(first)}: these figures are comparable with each other and with the committed short studies "
              "at the same size, **not with the paper's 3.49 or the seed report's 3.47 ± 0.137**, both at 64 maps x 8 "
              "blocks on 50,000 images.")  # fmt: skip
    return [*longrun_section.table2(st.runs, st.history, st.window, st.long_measures, st.beside, caveat),
            *longrun_section.changes(st.runs, st.history, st.window, st.long_measures)]  # fmt: skip


def _families(st: Study) -> list[str]:
    from experiments.studies import families

    c = st.comparisons
    if c.empty:
        return []
    lines = ["## What acted, and each family's answer", "",
             "Each member against its comparator, paired over the seeds where both runs *trained*: test bits/dim of the "
             "variant minus the comparator's (positive = worse), 95% Student-t interval of the mean difference, the paired "
             "t p and the exact sign-flip p (no normality; its floor is 2/2^n: 0.25 at 3 pairs, 0.0625 at 5), and Holm's "
             "step-down adjustment within the family over *m*, every comparison the family declares (fixed before the "
             "runs; a member that did not act or lacks pairs counts as p = 1). Each verdict is typed: *effect* (Holm "
             "p <= 0.05), *equivalent within ±m* (TOST of the paired differences against the family's margin, Holm-"
             f"adjusted; m = {EQUIVALENCE_MARGIN:g} bits/dim: {MARGIN_REASON}), or *inconclusive* with why. *could "
             "see*: the smallest mean difference detectable with 80% power at the level Holm tested it at, on its n - 1 "
             "df. *acted* comes from the activity metrics and from bit-identical results alone. *failed*: runs whose "
             "result is not *trained* (see *Every run counted*), variant · comparator, with Fisher's exact p (two-sided) "
             "and its Holm adjustment within the family where any run failed.", ""]  # fmt: skip
    if st.study == "stabilizers":
        lines += ["The stabilizer study's runs were made before the equivalence margin was declared, so its TOST column "
                  "is tested at a margin fixed after its runs (the same for every family, for the reason above); the "
                  "headline study's runs test it as declared before them.", ""]  # fmt: skip
    for fam in families(st.study):
        rows = c[c["family"] == fam.name]
        if rows.empty:
            continue
        table = pd.DataFrame({
            "variant": rows["variant"].map(label), "vs": rows["against"].map(label), "switches": rows["switches"],
            "acted": [("yes" if a else "**no**") + f": {w}" for a, w in zip(rows["acted"], rows["why"], strict=True)],
            "pairs": rows["n_pairs"],
            "Δ test bpd [95% t]": [f"{m:+.3f} {_ci(lo, hi, sign=True)}" if math.isfinite(m) else "–"
                                   for m, lo, hi in zip(rows["mean_diff"], rows["ci_lo"], rows["ci_hi"], strict=True)],
            "t p": rows["p_value"].map(fmt_p), "sign-flip p": rows["p_signflip"].map(fmt_p),
            "Holm p (m)": [f"{fmt_p(p)} ({m})" for p, m in zip(rows["p_holm"], rows["m"], strict=True)],
            "TOST ±m, Holm p": [f"±{g:g}: {fmt_p(p)}" for g, p in zip(rows["margin"], rows["tost_p_holm"], strict=True)],
            "could see": rows["mde_holm"].map(_fmt),
            "failed (v/c), Fisher p [Holm]": [
                f"{r.variant_failed}/{r.variant_runs} · {r.comparator_failed}/{r.comparator_runs}"
                + (f", {fmt_p(r.fail_p)} [{fmt_p(r.fail_p_holm)}]" if math.isfinite(r.fail_p) else "")
                for r in rows.itertuples()],
            "verdict": rows["verdict"],
        })  # fmt: skip
        lines += [f"### {fam.name}: {fam.question}", "", _md(table), ""]
    return lines + ["![effects per family](figures/effects.png)", ""]


def _precision(st: Study) -> list[str]:
    """What the study's precisions are, beside the seed report's own (fp16 + GradScaler on a T4)."""
    amps = sorted(set(st.runs.get("stabilizers.amp", pd.Series(dtype=str)).dropna()))
    if amps == ["off"] or not amps:
        return []
    return ["## Precision as the seed report ran it", "",
            "The seed report trained in fp16 autocast with a GradScaler on a T4 GPU. `seed-report` substitutes bf16 "
            "(every table names it so); `seed-report-fp16` is the literal recipe, and the headline study's *precision* "
            "family contrasts fp16, bf16 and fp32 inside that recipe. "
            f"Precisions in these runs: {', '.join(f'`{a}`' for a in amps)}.", "",
            "What fp16 on this CPU means for fp16 on a GPU: the s/t convolutions run through the project's own kernel "
            "(`study/flows/resnet.py`) with fp16 activations, weights and gradients, fp16 overflow (GradScaler then "
            "skips the step) and fp16 rounding of every result, the weight gradient accumulated in fp32 and rounded to "
            "fp16 as GPU kernels do. It does not share with a GPU run: which operations autocast casts to fp16 (CPU and "
            "CUDA autocast keep different lists), the kernels' accumulation order, or tensor-core rounding. A CPU fp16 "
            "result therefore says what fp16 storage, range and GradScaler do to the recipe, not what a T4 run's exact "
            "numbers would be; the GPU check (`scripts/gpu/`) runs the fp16 recipe on CUDA where a device is lent.", ""]  # fmt: skip


def _factorial(st: Study) -> list[str]:
    if st.factorial is None:
        return []
    from analysis.factorial import sentences
    from experiments.factorial import FACTORS

    fails, fit, data = st.factorial
    design = data.groupby("variant", sort=True).agg(runs=("run_id", "size"), failed=("failed", "sum"),
                                                    test=("test_bpd", "mean")).reset_index()  # fmt: skip
    lines = ["## Factorial: every main effect and two-factor interaction", "",
             "Factors (-1 / +1): " + "; ".join(f"`{f.name}`: {f.label}" for f in FACTORS) + ".", "",
             _md(design.assign(test=design["test"].map(_fmt)).rename(columns={"test": "mean test bpd (finished)"})), "",
             "### Failing to train", "",
             "Per factor, runs that failed to train (any result but *trained*) at each level; two-sided Fisher exact test, "
             "Holm-adjusted over the factors.", "",
             _md(fails.assign(**{"rate difference": fails["rate difference"].map(lambda v: f"{v:+.2f}"),
                                 "p": fails["p"].map(fmt_p), "p_holm": fails["p_holm"].map(fmt_p)})), "",
             "### Bits/dim among runs that trained", ""]  # fmt: skip
    if not fit.estimable:
        return lines + [f"Not estimable: {fit.why}.", ""]
    e = fit.effects
    table = pd.DataFrame({"term": e["term"], "kind": e["kind"], "measured": e["given"].replace("", "over the others"),
                          "effect (high - low)": e["effect"].map(lambda v: f"{v:+.3f}"),
                          "95% t": [_ci(a, b, sign=True) for a, b in zip(e["ci_lo"], e["ci_hi"], strict=True)],
                          "p": e["p"].map(fmt_p), "Holm p": e["p_holm"].map(fmt_p)})  # fmt: skip
    return lines + [f"OLS of test bits/dim on the factors coded -1/+1, all two-factor interactions and seed as a block, over "
                    f"the {fit.n} runs that trained ({fit.df_resid} residual degrees of freedom), with HC3 "
                    f"(heteroscedasticity-robust) standard errors and t intervals; Holm over the {len(e)} terms reported. "
                    "Conditioned on training: read it beside the failure table.", "",
                    *([f"Aliased among the runs that trained, so not reported as effects: {'; '.join(fit.aliased)}.", ""]
                      if fit.aliased else []),
                    *([f"Not estimable from the runs that trained, so left out of the model: {'; '.join(fit.dropped)}. "
                       "A main effect of a factor in such a pair is measured only where runs of that pair trained "
                       "(its *measured* column).", ""] if fit.dropped else []),
                    _md(table), "",
                    "![half-normal plot](figures/half_normal.png)", "",
                    *(["![interactions](figures/interactions.png)", ""] if _interaction_pairs(fit) else []),
                    "What the factorial supports:", "", *sentences(fit, fails, EQUIVALENCE_MARGIN), ""]  # fmt: skip


def _figure_sections(fig_dir: Path) -> list[str]:
    lines = ["## Learning curves", "", "Off-scale variants (a non-finite value, or worse than the uniform density's "
             "8 bits/dim) are drawn in their own row.", "", "![learning curves](figures/learning_curves.png)", "",
             "## Gradient norms", "",
             "Global gradient norm before clipping (the clip threshold is 100 where clipping is on).", "",
             "![gradient norms](figures/gradient_norms.png)", ""]  # fmt: skip
    if (fig_dir / "samples.png").exists():
        lines += ["## Samples", "", "Final model of each variant's first seed, temperature 0.7.", "",
                  "![samples](figures/samples.png)", ""]  # fmt: skip
    return lines


def _diagnosis_section(st: Study) -> list[str]:
    table, source = st.diagnosis
    if table is None:
        return ["## Diagnosis of `paper-literal-exp`", "", f"Not made: {source}.", ""] if "no run" not in source else []
    cols = [c for c in table.columns if not c.startswith("se ")]
    shown = table[cols].copy()

    def cell(v, se) -> str:
        # past the uniform density a figure says only "worse than uniform", and its digits come from a model
        # far from any trained state, where fp32 kernels of different CPUs disagree (the stabilizer study's
        # initial paper-literal-exp models: 120.05 on an AMD EPYC, 121.27 on an AMX Xeon)
        if isinstance(v, float) and math.isfinite(v) and v >= UNIFORM_BPD:
            return f">= {UNIFORM_BPD:g}"
        return f"{_fmt(v)} ± {_fmt(se)}" if se is not None else _fmt(v)

    for c in cols[3:]:
        se = table.get("se " + c[4:]) if c.startswith("val ") else None
        shown[c] = [cell(v, s) for v, s in zip(table[c], [None] * len(table) if se is None else se, strict=True)]
    return ["## Diagnosis of `paper-literal-exp`", "",
            f"{source}: the same checkpoint in eval mode (running batch-norm statistics), in train mode (each batch's "
            "own statistics) and in eval mode after re-estimating the running statistics from training batches "
            "(`run_study.py evaluate --mode train` / `--bn-recalibrate N` compute the same). ± is the standard error over "
            f"images. A value at or above the uniform density's {UNIFORM_BPD:g} bits/dim is shown as `>= {UNIFORM_BPD:g}`: "
            "past it the figure says only that the model is worse than uniform, and its digits differ between CPUs.",
            "", _md(shown), ""]  # fmt: skip


def _audit_section(st: Study) -> list[str]:
    lines = ["## Accounting audit", ""]
    if not st.audits:
        return lines + ["Not run (no finished run of `seed-report` or `paper`, or --no-audit).", ""]
    for source, table in st.audits:
        if table is None:
            lines += [f"Audit of {source}.", ""]
            continue
        shown = table.assign(**{"bits/dim": table["bits/dim"].map(_fmt), "shift": table["shift"].map(lambda v: f"{v:+.3f}")})
        lines += [f"One trained model ({source}) evaluated on its validation split under each accounting that public "
                  "Real NVP code has used. The shift is what such a bug adds to a reported figure.", "", _md(shown), ""]  # fmt: skip
    return lines


def _lr_section(lr_trials: pd.DataFrame) -> list[str]:
    if not len(lr_trials):
        return []
    best = []
    for (search, variant), t in lr_trials.groupby(["search", "variant"], sort=True):
        done = t[t["outcome"] == "completed"]
        top = done.loc[done["val_bpd"].idxmin()] if len(done) else None
        best.append({"variant": variant, "trials": len(t), "pruned": int((t["outcome"] == "pruned").sum()),
                     "diverged": int((t["outcome"] == "diverged").sum()),
                     "best lr": f"{top['lr']:.3g}" if top is not None else "–",
                     "best val bpd": _fmt(top["val_bpd"]) if top is not None else "–",
                     "epochs": int(t["epochs"].max()), "search": f"`{search}`"})  # fmt: skip
    return ["## Learning-rate search", "",
            "Optuna searches (objective: validation bits/dim in eval mode, never the test split). Best completed trial "
            "per variant; pruned trials stopped early at the pruner's decision.", "",
            _md(pd.DataFrame(best)), "", "![learning-rate search](figures/lr_search.png)", ""]  # fmt: skip


def findings(st: Study) -> list[str]:
    """The findings block (between markers, so the project README can quote it verbatim)."""
    lines = [FINDINGS_START]
    if len(st.comparisons):
        for fam, rows in st.comparisons.groupby("family", sort=False):
            lines += [f"**{fam}**", "", *[sentence(r) for _, r in rows.iterrows()], ""]
    if st.factorial is not None:
        from analysis.factorial import sentences

        lines += ["**factorial**", "", *sentences(st.factorial[1], st.factorial[0], EQUIVALENCE_MARGIN), ""]
    if st.long:
        lines += longrun_section.findings(st.long_measures, st.window)
    return lines + [FINDINGS_END]


def _closing(st: Study) -> list[str]:
    everything = st.all_runs
    out = everything[everything["excluded"] != ""]
    lines = ["## What these runs support", "", "Each sentence comes from a Holm-corrected test or from the activity "
             "diagnostics; nothing the design confounds is credited to one switch.", "", *findings(st), "",
             "## What these runs cannot say", "",
             ("- Anything about the paper's scale: these runs are 100 epochs long, but the model and the data are "
              "reduced; stabilizers that only matter in a 19 M-parameter model trained on 50,000 images cannot show up "
              "here." if st.long else
              "- Anything about the paper's scale: the model, the data and the training here are reduced; stabilizers "
              "that only matter late in a 100-epoch run of a 19 M-parameter model cannot show up here."),
             "- Whether 3.47 or 3.49 is reproducible: no run here is comparable with those figures.",
             (f"- Effects smaller than each comparison's *could see* column: at {st.runs['seed'].nunique()} seeds they "
              "are not detectable, and such a contrast is *inconclusive*, never *no effect*." if len(st.comparisons) else
              f"- Effects inside each factor's interval: at {st.runs['seed'].nunique()} seed blocks a factor whose "
              "interval is wider than the margin is *inconclusive*, never *no effect*."), "",
             "## Runs", "",
             _md(st.runs[["variant", "seed", "outcome", "epochs", "run_id"]].assign(
                 test_bpd=st.runs["test_bpd"].map(_fmt), val_bpd=st.runs["val_bpd"].map(_fmt))), ""]  # fmt: skip
    if len(out):
        lines += ["Not pooled (a run whose configuration disagrees with its variant, an unknown variant, or a duplicate "
                  "cell is reported here, never averaged in):", "",
                  _md(out[["variant", "seed", "outcome", "run_id", "excluded"]]), ""]  # fmt: skip
    return lines


def generate_report(
    store,
    experiment: str,
    out: Path,
    window: int = 40,
    data: dict[str, str] | None = None,
    run_audit: bool = True,
    command: str = "",
    log_to_parent: bool = True,
    lr_experiment: str | None = None,
    beside: tuple = (),
    say=lambda line: None,
) -> Path:
    """Write out/README.md and out/figures/*.png from the experiment's runs; return the README path.
    ``say`` hears each stage as it starts (the command line prints them: a report takes a minute).
    Raises analysis.collect.NoRunsError (a one-line message) when there is nothing to report."""
    st = collect_study(store, experiment, window, data, run_audit, lr_experiment, say)
    st = dataclasses.replace(st, beside=beside)
    fig_dir = out / "figures"
    if transfer_section.is_ladder(st.study):
        lines = _ladder(st, store, fig_dir, data, command, say)
    else:
        say("figures")
        _figures(st, fig_dir, store)
        say("tables and text")
        lines = _study(st, fig_dir, command)
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    if log_to_parent and len(st.parents):
        for parent in st.parents["run_id"]:
            store.log_artifacts(parent, out, schema.REPORT_DIR)
    return readme


def _ladder(st: Study, store, fig_dir: Path, data: dict[str, str] | None, command: str, say) -> list[str]:
    """A scale ladder's report (analysis.transfer_section): its own sections in place of the per-variant
    ones, which would list 144 cells one by one."""
    db = store.sqlite_file()  # the GPU check's table is committed beside a study's mlflow.db
    say("ladder measures: the losses at initialisation rebuilt from the runs' configs")
    m = transfer_section.measure(st.runs, data, db.parent / transfer_section.PAPER_CHECK if db else None)
    say("figures")
    _fresh(fig_dir)
    transfer_section.draw(m, fig_dir)
    epochs = sorted({int(e) for e in st.runs.get("train.epochs", st.runs["epochs"])})
    out = st.all_runs[st.all_runs["excluded"] != ""]
    return [*_header(st, command), *transfer_section.sections(m, epochs),
            "## What these runs support", "", "Each sentence comes from a typed, Holm-corrected slope verdict; the "
            "prediction is labelled as the extrapolation it is.", "", *transfer_section.findings(m), "",
            "## What these runs cannot say", "", *transfer_section.cannot_say(m), "",
            "## Runs", "",
            _md(st.runs[["variant", "seed", "result", "epochs", "run_id"]].assign(
                result=st.runs["result"].replace("", "did not end"), val_bpd=st.runs["val_bpd"].map(_fmt), test_bpd=st.runs["test_bpd"].map(_fmt))), "",
            *(["Not pooled:", "", _md(out[["variant", "seed", "outcome", "run_id", "excluded"]]), ""] if len(out) else [])]  # fmt: skip


def _study(st: Study, fig_dir: Path, command: str) -> list[str]:
    return [*_header(st, command), *_results(st), *_counted(st), *_variants(st), *_long_run(st), *_families(st),
             *_precision(st), *_factorial(st),
             *_figure_sections(fig_dir), *_diagnosis_section(st), *_audit_section(st), *_lr_section(st.lr_trials),
             *_closing(st)]  # fmt: skip
