"""report/README.md regenerated from an MLflow experiment: tables, figures, provenance, conclusions.

Everything in the report is computed from the runs; re-running on the same store writes the same
bytes (no timestamps, seeded bootstraps, sorted rows).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from analysis import figures
from analysis.collect import collect_lr_search, collect_runs
from analysis.reference import REFERENCES
from analysis.stats import paired_effects, variant_table
from study import schema

BASELINE = "seed-report"


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _md(df: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table (no tabulate dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def _variant_rows(table: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({
        "variant": table["variant"],
        "runs": table["runs"],
        "diverged": table["diverged"],
        "first non-finite epoch": table["first_nonfinite_epoch"].map(lambda v: "–" if v is None or pd.isna(v) else int(v)),
        "val bpd, last-window mean": [f"{_fmt(m)} ± {_fmt(s)}" for m, s in zip(table["val_mean"], table["val_std_seeds"], strict=True)],
        "95% CI": [f"[{_fmt(lo)}, {_fmt(hi)}]" for lo, hi in zip(table["val_ci_lo"], table["val_ci_hi"], strict=True)],
        "within-run std": table["val_std_within"].map(_fmt),
        "window (epochs)": table["window"],
        "test bpd": [f"{_fmt(m)} ± {_fmt(s)}" for m, s in zip(table["test_mean"], table["test_std"], strict=True)],
        "test 95% CI": [f"[{_fmt(lo)}, {_fmt(hi)}]" for lo, hi in zip(table["test_ci_lo"], table["test_ci_hi"], strict=True)],
        "img/s": table["images_per_s"].map(lambda v: _fmt(v, 0)),
    })  # fmt: skip
    return out


def _effect_rows(eff: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "variant": eff["variant"],
        "pairs": eff["n_pairs"],
        "test bpd − seed-report": eff["mean_diff"].map(lambda v: f"{v:+.3f}" if math.isfinite(v) else "–"),
        "95% CI": [f"[{_fmt(lo)}, {_fmt(hi)}]" for lo, hi in zip(eff["ci_lo"], eff["ci_hi"], strict=True)],
        "paired t p": eff["p_value"].map(lambda v: _fmt(v, 2)),
        "diverged": eff["diverged"],
    })  # fmt: skip


def _conclusions(eff: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """Sentences the numbers support, each tied to its interval; nothing beyond them."""
    lines = []
    for _, e in eff.sort_values("variant").iterrows():
        v = e["variant"]
        if e["n_pairs"] < 2:
            lines.append(f"- `{v}`: fewer than two finished pairs with `{BASELINE}`; no comparison is possible.")
            continue
        lo, hi, p = e["ci_lo"], e["ci_hi"], e["p_value"]
        excludes_zero = lo > 0 or hi < 0
        direction = "worse than" if e["mean_diff"] > 0 else "better than"
        # a percentile bootstrap over 2-3 pairs is too narrow on its own: a verdict needs the paired
        # t-test to agree
        if excludes_zero and math.isfinite(p) and p < 0.05:
            verdict = f"is {direction}"
        elif excludes_zero:
            verdict = f"looks {direction} (bootstrap CI excludes 0, paired t p = {p:.2f}: suggestive only)"
        else:
            verdict = "is not distinguishable from"
        lines.append(
            f"- `{v}` {verdict} `{BASELINE}` on test bits/dim at this scale: {e['mean_diff']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}] over {int(e['n_pairs'])} paired seeds (diverged: {e['diverged']})."
        )
    for _, t in table.iterrows():
        if t["diverged"]:
            lines.append(f"- `{t['variant']}` diverged in {int(t['diverged'])} of {int(t['runs'])} runs "
                         f"(first non-finite epoch {int(t['first_nonfinite_epoch'])}).")  # fmt: skip
    return lines


def _samples(runs: pd.DataFrame, tmp: Path, uri: str) -> dict[str, Path]:
    """The last sample grid at temperature 0.7 of each variant's lowest-seed run, where it is stored."""
    from study.tracking import download_artifact

    grids = {}
    for variant, r in runs.groupby("variant", sort=True):
        first = r.sort_values("seed").iloc[0]
        name = schema.sample_artifact(int(first["epochs"]), 0.7)
        try:
            grids[variant] = download_artifact(first["run_id"], name, uri, tmp / variant)
        except FileNotFoundError:  # artifacts of another machine's store may not be reachable here
            continue
    return grids


def _audit(
    runs: pd.DataFrame, tracking_uri: str | None, data: dict[str, str] | None
) -> tuple[pd.DataFrame | None, str]:
    """The accounting audit on the baseline's lowest-seed checkpoint; (table, which run / why none)."""
    from analysis.audit import audit
    from study.data import load_splits
    from study.run.state import checkpoint_of_run, model_from_checkpoint

    pick = runs[(runs["variant"] == BASELINE) & (runs["outcome"] != "diverged")]
    if pick.empty:
        pick = runs[runs["outcome"] != "diverged"]
    if pick.empty:
        return None, "no finished run to audit"
    run = pick.sort_values("seed").iloc[0]
    try:
        model, cfg = model_from_checkpoint(checkpoint_of_run(run["run_id"], tracking_uri))
        data_cfg = dataclasses.replace(cfg.data, **(data or {}))
        splits = load_splits(data_cfg)
    except ValueError as e:
        return None, f"skipped: {e}"
    table = audit(model, splits.val, splits.train, batch=cfg.train.eval_batch_size)
    return table, f"run `{run['run_id']}` ({run['variant']}, seed {run['seed']}, epoch {run['epochs']})"


@dataclasses.dataclass
class Study:
    """Everything the report shows, computed once from the store (render functions only format it)."""

    uri: str
    experiment: str
    window: int
    runs: pd.DataFrame
    history: pd.DataFrame
    parents: pd.DataFrame
    table: pd.DataFrame
    effects: pd.DataFrame
    lr_trials: pd.DataFrame
    audit_table: pd.DataFrame | None
    audit_source: str

    @property
    def has_effects(self) -> bool:
        return len(self.effects) > 0


def _figures(st: Study, fig_dir: Path) -> None:
    if fig_dir.exists():
        shutil.rmtree(fig_dir)
    fig_dir.mkdir(parents=True)
    runs, history = st.runs, st.history
    figures.learning_curves(history, fig_dir / "learning_curves.png")
    figures.gradient_traces(history, fig_dir / "gradient_norms.png",
                            events=runs.dropna(subset=["first_nonfinite_epoch"]).rename(columns={"first_nonfinite_epoch": "epoch"})
                            .assign(epoch=lambda d: pd.to_numeric(d["epoch"])))  # fmt: skip
    if st.has_effects:
        figures.effects(st.effects, fig_dir / "effects.png", BASELINE)
    with tempfile.TemporaryDirectory() as tmp:
        grids = _samples(runs, Path(tmp), st.uri)
        if grids:
            figures.sample_panel(grids, fig_dir / "samples.png")
    if len(st.lr_trials):
        figures.lr_search(st.lr_trials, fig_dir / "lr_search.png")


def _header(st: Study, command: str) -> list[str]:
    runs, parents = st.runs, st.parents
    first = runs.iloc[0]
    epochs = sorted({int(e) for e in runs.get("train.epochs", runs["epochs"])})  # configured, not reached
    seeds = sorted(set(runs["seed"]))
    commits = sorted(set(runs["git_commit"]) | set(parents["git_commit"].dropna()))
    lines = [
        f"# Real NVP stabilizer ablation: {st.experiment}",
        "",
        f"Generated from MLflow by `{command or 'python run_study.py report'}`. Do not edit by hand: "
        "re-running the command rewrites this file and figures/ identically.",
        "",
    ]
    if first.get("preset") != "paper":
        lines += [
            f"> **Reduced scale.** Preset `{first.get('preset')}`: {int(first.get('model.num_scales', 0))} scales, "
            f"{int(first.get('model.mid_channels', 0))} feature maps, {int(first.get('model.num_blocks', 0))} residual "
            f"blocks, {', '.join(map(str, epochs))} epochs, batch {int(first.get('train.batch_size', 0))}. The paper "
            "trains 64 maps x 8 blocks for 100 epochs on 50,000 images. Numbers here are comparable with each other, "
            "not with the paper's 3.49.",
            "",
        ]
    return lines + [
        "## Provenance",
        "",
        f"- tracking store: `{st.uri}`, experiment `{st.experiment}`",
        f"- data: `{first.get('data.source')}` {('`' + str(first.get('data.path')) + '`') if first.get('data.path') else '(embedded)'}, validation fraction "
        f"{first.get('data.val_fraction')}, split seed {first.get('data.split_seed')}",
        f"- seeds: {', '.join(map(str, seeds))} (shared across variants); runs: {len(runs)}",
        f"- hardware: {', '.join(sorted(set(runs['device'])))}; git commits: {', '.join(f'`{c}`' for c in commits)}",
        f"- study parent runs: {', '.join(f'`{p}`' for p in parents['run_id'])}",
        "",
        "## Reference figures",
        "",
        _md(pd.DataFrame([{**r, "spread": _fmt(r["spread"]) if r["spread"] else "–"} for r in REFERENCES])),
        "",
    ]  # fmt: skip


def _tables(st: Study) -> list[str]:
    window, window_used = st.window, sorted(set(st.table["window"]))
    lines = [
        "## Per variant",
        "",
        f"Validation bits/dim (eval mode, whole validation split) averaged over each run's last {window} "
        f"epochs — the seed report's statistic — then mean ± std and a 95% bootstrap CI across seeds. "
        f"Window actually used: {', '.join(window_used)} epoch(s)"
        + (" (the runs are shorter than the window)." if any(int(w.split("/")[-1]) < window for w in window_used if w) else ".")
        + " Test bits/dim: final model, whole test split, eval mode. Diverged runs are counted, not averaged in.",
        "",
        _md(_variant_rows(st.table)),
        "",
    ]  # fmt: skip
    if st.has_effects:
        lines += [
            f"## Effect of each change against `{BASELINE}`",
            "",
            "Paired over shared seeds: test bits/dim of the variant minus that of `seed-report` with the same "
            "seed; positive means the change made the model worse. CI: bootstrap over pairs; p: paired t-test. "
            "With 3 seeds the intervals are coarse; an interval that includes 0 means *no detectable effect at "
            "this scale*, not *no effect*.",
            "",
            _md(_effect_rows(st.effects)),
            "",
            "![effects](figures/effects.png)",
            "",
        ]
    return lines


def _figure_sections(fig_dir: Path) -> list[str]:
    lines = ["## Learning curves", "", "![learning curves](figures/learning_curves.png)", "",
             "## Gradient norms", "",
             "Global gradient norm before clipping (the clip threshold is 100 where clipping is on).", "",
             "![gradient norms](figures/gradient_norms.png)", ""]  # fmt: skip
    if (fig_dir / "samples.png").exists():
        lines += ["## Samples", "", "Final model of each variant's first seed, temperature 0.7.", "",
                  "![samples](figures/samples.png)", ""]  # fmt: skip
    return lines


def _audit_section(st: Study) -> list[str]:
    lines = ["## Accounting audit", ""]
    if st.audit_table is None:
        return lines + [f"Audit {st.audit_source}.", ""]
    table = st.audit_table
    shown = table.assign(**{"bits/dim": table["bits/dim"].map(_fmt), "shift": table["shift"].map(lambda v: f"{v:+.3f}")})
    return lines + [
        f"One trained model ({st.audit_source}) evaluated on its validation split under each accounting that "
        "public Real NVP code has used. The shift is what such a bug adds to a reported figure.",
        "",
        _md(shown),
        "",
    ]


def _lr_section(lr_trials: pd.DataFrame) -> list[str]:
    if not len(lr_trials):
        return []
    lines = [
        "## Learning-rate search",
        "",
        "Optuna searches (objective: validation bits/dim in eval mode, never the test split). Best "
        "completed trial per variant; pruned trials stopped early at the median pruner's decision.",
        "",
    ]
    best = []
    for (search, variant), t in lr_trials.groupby(["search", "variant"], sort=True):
        done = t[t["outcome"] == "completed"]
        top = done.loc[done["val_bpd"].idxmin()] if len(done) else None
        best.append({"variant": variant, "trials": len(t), "pruned": int((t["outcome"] == "pruned").sum()),
                     "diverged": int((t["outcome"] == "diverged").sum()),
                     "best lr": f"{top['lr']:.3g}" if top is not None else "–",
                     "best val bpd": _fmt(top["val_bpd"]) if top is not None else "–",
                     "epochs": int(t["epochs"].max()), "search": f"`{search}`"})  # fmt: skip
    return lines + [_md(pd.DataFrame(best)), "", "![learning-rate search](figures/lr_search.png)", ""]


def _closing(st: Study) -> list[str]:
    runs = st.runs
    lines = ["## What these runs support", "", *_conclusions(st.effects, st.table), ""] if st.has_effects else []
    return lines + [
        "## What these runs cannot say",
        "",
        "- Anything about the paper's scale: the model, the data and the training here are reduced; stabilizers "
        "that only matter late in a 100-epoch run of a 19 M-parameter model, or only in fp16 on a GPU, cannot "
        "show up here.",
        "- Whether 3.47 or 3.49 is reproducible: no run here is comparable with those figures.",
        "- Small effects: with a handful of seeds an interval narrower than the seed-to-seed spread is not available.",
        "",
        "## Runs",
        "",
        _md(runs[["variant", "seed", "outcome", "epochs", "run_id"]].assign(
            test_bpd=runs["test_bpd"].map(_fmt), val_bpd=runs["val_bpd"].map(_fmt))),
        "",
    ]  # fmt: skip


def collect_study(uri: str, experiment: str, window: int, data: dict[str, str] | None, run_audit: bool,
                  lr_experiment: str | None) -> Study:  # fmt: skip
    runs, history, parents = collect_runs(uri, experiment)
    table = variant_table(runs, history, window)
    effects = paired_effects(runs, "test_bpd", BASELINE) if BASELINE in set(runs["variant"]) else pd.DataFrame()
    audit_table, audit_source = _audit(runs, uri, data) if run_audit else (None, "not run (--no-audit)")
    lr_trials = collect_lr_search(uri, lr_experiment or f"lr-search-{runs.iloc[0].get('preset')}")
    return Study(uri, experiment, window, runs, history, parents, table, effects, lr_trials, audit_table, audit_source)


def generate_report(
    tracking_uri: str | None,
    experiment: str,
    out: Path,
    window: int = 40,
    data: dict[str, str] | None = None,
    run_audit: bool = True,
    command: str = "",
    log_to_parent: bool = True,
    lr_experiment: str | None = None,
) -> Path:
    """Write out/README.md and out/figures/*.png from the experiment's runs; return the README path.
    Raises analysis.collect.NoRunsError (a one-line message) when there is nothing to report."""
    import mlflow

    from study.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    st = collect_study(uri, experiment, window, data, run_audit, lr_experiment)
    fig_dir = out / "figures"
    _figures(st, fig_dir)
    lines = [*_header(st, command), *_tables(st), *_figure_sections(fig_dir), *_audit_section(st),
             *_lr_section(st.lr_trials), *_closing(st)]  # fmt: skip
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    if log_to_parent and len(st.parents):
        from study.tracking import log_artifacts

        for parent in st.parents["run_id"]:
            log_artifacts(parent, out, schema.REPORT_DIR, uri)
    return readme
