"""The initialisation probe, declared as data: sizes x scale recipes x seeds, one forward pass each on
real training images (study.probe), written to a CSV that report/init-probe/README.md is made from.

The recipes are chrischute's architecture (the stabilizer study's base: weight norm, batch norm in
s/t) with the two choices that decide whether the first forward pass can overflow: the scale function
and its initialisation (zero-initialised last convolution of s/t, so every coupling starts as the
identity; the batch-norm bijector, which renormalises every coupling's output). The sizes span the
committed studies' 8 maps x 2 blocks up to the paper's 64 x 8.
"""

from __future__ import annotations

import csv
import itertools
import time
from collections.abc import Callable
from pathlib import Path

from experiments.ablation import CHRISCHUTE
from study.config import Config, apply_values

WIDTHS = (8, 16, 32, 64)
BLOCKS = (2, 8)
SEEDS = tuple(range(10))
BATCH = 64  # the training batch of every preset: batch norm in s/t normalises with its statistics

RECIPES: dict[str, dict[str, object]] = {
    "exp": {**CHRISCHUTE, "stabilizers.scale_fn": "exp"},
    "exp+zero-init": {**CHRISCHUTE, "stabilizers.scale_fn": "exp", "stabilizers.zero_init": True},
    "exp+bijector": {**CHRISCHUTE, "stabilizers.scale_fn": "exp", "stabilizers.bn_bijector": True},
    "exp+zero-init+bijector": {**CHRISCHUTE, "stabilizers.scale_fn": "exp", "stabilizers.zero_init": True,
                               "stabilizers.bn_bijector": True},
    "tanh": {**CHRISCHUTE},
    "softplus": {**CHRISCHUTE, "stabilizers.scale_fn": "softplus"},
}  # fmt: skip
RECIPE_NOTES = {
    "exp": "eq. 2 literally on chrischute's code: the old factorial's exp cells",
    "exp+zero-init": "the same, last s/t convolution zero-initialised (the new factorial's base)",
    "exp+bijector": "the stabilizer study's paper-literal-exp",
    "exp+zero-init+bijector": "both",
    "tanh": "chrischute as configured (bounded by its learned rescale)",
    "softplus": "the seed report's scale reading (bounded below, grows like h above)",
}
COLUMNS = ("recipe", "mid_channels", "num_blocks", "seed", "batch", "nonfinite_fraction", "batch_nonfinite",
           "max_abs_s", "seconds", "git_commit")  # fmt: skip


def cells(widths=WIDTHS, blocks=BLOCKS, recipes=tuple(RECIPES), seeds=SEEDS) -> list[tuple[str, int, int, int]]:
    """Every (recipe, width, blocks, seed) of the probe, smallest models first."""
    return [(r, w, b, s) for (w, b), r, s in itertools.product(itertools.product(widths, blocks), recipes, seeds)]


def cell_config(base: Config, recipe: str, width: int, blocks: int, seed: int) -> Config:
    return apply_values(base, {**RECIPES[recipe], "model.mid_channels": width, "model.num_blocks": blocks,
                               "train.seed": seed, "train.batch_size": BATCH})  # fmt: skip


def run_probe(base: Config, images, out: Path, grid: list[tuple[str, int, int, int]],
              echo: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Probe every cell of ``grid`` not yet in ``out`` (a CSV of COLUMNS, appended row by row, so an
    interrupted probe continues where it stopped); returns ``out``."""
    from study.probe import probe_init
    from study.tracking import git_commit

    done = set()
    if out.exists():
        with out.open() as f:
            done = {(r["recipe"], int(r["mid_channels"]), int(r["num_blocks"]), int(r["seed"]))
                    for r in csv.DictReader(f)}  # fmt: skip
    todo = [c for c in grid if c not in done]
    echo(f"init probe: {len(grid)} cells, {len(done & set(grid))} already in {out}, {len(todo)} to run")
    last_seed = {}  # each (recipe, width, blocks)'s last seed: its line of progress
    for recipe, width, blocks, seed in grid:
        last_seed[(recipe, width, blocks)] = max(seed, last_seed.get((recipe, width, blocks), seed))
    new = not out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        for i, (recipe, width, blocks, seed) in enumerate(todo, 1):
            t0 = time.perf_counter()
            r = probe_init(cell_config(base, recipe, width, blocks, seed), images)
            row = {"recipe": recipe, "mid_channels": width, "num_blocks": blocks, "seed": seed, **r,
                   "seconds": round(time.perf_counter() - t0, 2), "git_commit": git_commit()}  # fmt: skip
            writer.writerow(row)
            f.flush()
            if seed == last_seed[(recipe, width, blocks)]:
                echo(f"[{i}/{len(todo)}] {width} maps x {blocks} blocks, {recipe}: last seed non-finite "
                     f"{r['nonfinite_fraction']:.2f} of the batch, max |s| {r['max_abs_s']:.3g}")  # fmt: skip
    return out
