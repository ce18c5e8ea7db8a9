"""report/init-probe/README.md from the initialisation probe's CSV (experiments/init_probe.py): per
model size and recipe, how often the first forward pass is non-finite and how large |s| is at
initialisation. Pure functions over the CSV's rows; the same CSV writes the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from analysis.markdown import FINDINGS_END, FINDINGS_START, md_table
from experiments.init_probe import RECIPE_NOTES, RECIPES


def summarize_probe(rows: pd.DataFrame) -> pd.DataFrame:
    """rows: one per (recipe, mid_channels, num_blocks, seed) with nonfinite_fraction, batch_nonfinite,
    max_abs_s. Returns one row per (mid_channels, num_blocks, recipe): seeds, batches_nonfinite (seeds
    whose step-0 batch loss is non-finite), images_nonfinite (mean fraction of a batch's images),
    s_median and s_max (of the per-seed largest |s|; inf when any overflowed)."""
    out = []
    order = {r: i for i, r in enumerate(RECIPES)}
    for (w, b, recipe), g in rows.groupby(["mid_channels", "num_blocks", "recipe"], sort=False):
        s = g["max_abs_s"].astype(float)
        out.append({"mid_channels": int(w), "num_blocks": int(b), "recipe": recipe, "seeds": len(g),
                    "batches_nonfinite": int(g["batch_nonfinite"].astype(float).sum()),
                    "images_nonfinite": float(g["nonfinite_fraction"].astype(float).mean()),
                    "s_median": float(s.median()), "s_max": float(s.max())})  # fmt: skip
    table = pd.DataFrame(out)
    table["_order"] = table["recipe"].map(order)
    return table.sort_values(["mid_channels", "num_blocks", "_order"]).drop(columns="_order").reset_index(drop=True)


def _g(x: float) -> str:
    return "inf" if math.isinf(x) else ("NaN" if math.isnan(x) else f"{x:.3g}")


def headline(table: pd.DataFrame) -> list[str]:
    """One sentence per recipe over every size: in how many of its seeds x sizes step 0 was non-finite."""
    lines = []
    for recipe in RECIPES:
        t = table[table["recipe"] == recipe]
        if t.empty:
            continue
        bad, total = int(t["batches_nonfinite"].sum()), int(t["seeds"].sum())
        sizes = ", ".join(f"{w}x{b}" for w, b in zip(t["mid_channels"], t["num_blocks"], strict=True))
        lines.append(f"- `{recipe}`: step 0 non-finite in {bad}/{total} (seed, size) pairs over sizes {sizes}; "
                     f"largest |s| at initialisation {_g(float(t['s_max'].max()))}.")  # fmt: skip
    return lines


def render(rows: pd.DataFrame, command: str, commit: str, source: str = "studies/init-probe/probe.csv") -> str:
    table = summarize_probe(rows)
    shown = pd.DataFrame({
        "maps x blocks": [f"{w} x {b}" for w, b in zip(table["mid_channels"], table["num_blocks"], strict=True)],
        "recipe": [f"`{r}`" for r in table["recipe"]],
        "step-0 batch non-finite": [f"{a}/{n}" for a, n in
                                    zip(table["batches_nonfinite"], table["seeds"], strict=True)],
        "images non-finite (mean)": table["images_nonfinite"].map(lambda v: f"{v:.3f}"),
        "max abs s, median over seeds": table["s_median"].map(_g),
        "max abs s, max": table["s_max"].map(_g),
    })  # fmt: skip
    lines = ["# Initialisation probe: is step 0 finite?", "",
             f"Generated from `{source}` by `{command}` (code `{commit}`). Do not edit by hand.", "",
             "One forward pass per (recipe, size, seed) of the model a run of that seed starts from, on the "
             f"first training batch it would draw ({int(rows['batch'].iloc[0])} real CIFAR-10 images from the slices, "
             "train mode, fp32), before any update. *step-0 batch non-finite*: seeds whose batch loss (the mean "
             "log-density) is NaN or infinite, which a run records as a divergence at global step 0; *images "
             "non-finite*: the mean fraction of the batch's images whose log-density is; *max abs s*: the largest "
             "|s| over every coupling's used positions. Every count is out of the seeds shown; no interval is "
             "needed for a count of all or none.", "",
             "Recipes (chrischute's architecture: weight norm and batch norm in s/t; no gradient step is taken, so "
             "clipping, L2 and AMP cannot act here):", "",
             *[f"- `{r}`: {RECIPE_NOTES[r]}" for r in RECIPES], "",
             "## Summary", "", FINDINGS_START, *headline(table), FINDINGS_END, "", "## Every size", "",
             md_table(shown), ""]  # fmt: skip
    return "\n".join(lines)


def write_report(csv_path: Path, out: Path, command: str) -> Path:
    rows = pd.read_csv(csv_path)
    commits = sorted(set(rows["git_commit"].astype(str))) if "git_commit" in rows else ["unknown"]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "README.md"
    path.write_text(render(rows, command, ", ".join(commits), str(csv_path)))
    return path
