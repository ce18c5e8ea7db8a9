"""The scale ladder (`run_study.py ablation transfer`, issue 28), declared as data: do the verdicts found
at 8 maps x 2 blocks transfer toward the paper's size? After Wortsman et al. 2023 (arXiv 2309.14322):
an instability of a large model shows at small sizes when the learning rate is high, and a
stabilizer that matters at scale flattens the learning-rate-vs-loss curve of a small one. So each
recipe is trained over a log grid of learning rates at each rung of a ladder of model sizes.

A cell is (rung, recipe, learning rate) x seed; each (rung, recipe, learning rate) is one Variant whose
overrides set the model's size, the recipe's switches and ``train.lr`` on top of preset ``ladder``.

- **Rungs**: 8x2 (today's size), 16x2 and 32x2 maps x blocks, 4x the coupling networks' weights per
  rung (even steps in log(weights)); the paper's 64x8 is 16x past the top rung again.
- **Recipes**, all in fp32 (the precision is held fixed: bf16 and fp16 are a question of their own,
  answered inside the seed report's recipe by the headline study), chosen from what the corrected
  studies found:
  - ``seed-report-fp32``: the seed report's recipe (the committed ``amp-off``);
  - ``no-gradclip-fp32``: the same without gradient clipping (the headline study could not tell);
  - ``paper``: the paper's recipe (tanh scale, batch norm and its bijector, weight norm, L2);
  - ``exp+zero-init``: eq. 2 as written, no bound on s at all, made to pass initialisation by
    zero-initialising the last s/t convolution (the zero-init factorial: every run trained).
- **Learning rates**: 1e-4 to 3e-2 in half-decades (6 values), 1e-3 (every committed study's) among them.
- **Seeds**: 2, paired across every cell.
"""

from __future__ import annotations

from experiments.ablation import CHRISCHUTE, PAPER, SEED_REPORT, Family, Variant

RUNGS: tuple[tuple[str, int, int], ...] = (("8x2", 8, 2), ("16x2", 16, 2), ("32x2", 32, 2))  # name, maps, blocks
LEARNING_RATES: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SEEDS = 2
RECIPES: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("seed-report-fp32", "the seed report's recipe in fp32 (the committed amp-off)",
     {**SEED_REPORT, "stabilizers.amp": "off"}),
    ("no-gradclip-fp32", "the seed report's recipe in fp32 without gradient clipping",
     {**SEED_REPORT, "stabilizers.amp": "off", "stabilizers.grad_clip": 0.0}),
    ("paper", "the paper's recipe: tanh scale, batch norm and its bijector, weight norm, L2; no clipping", PAPER),
    ("exp+zero-init", "eq. 2 as written (exp scale, no bound on s), zero-initialised so its first step is finite",
     {**PAPER, "stabilizers.scale_fn": "exp", "stabilizers.zero_init": True}),
)  # fmt: skip
BASELINE = "seed-report-fp32"  # the recipe every other is read against, at each rung


def cell_name(rung: str, recipe: str, lr: float) -> str:
    """A cell's variant name: ``16x2/paper/lr0.003``."""
    return f"{rung}/{recipe}/lr{lr:g}"


def parse(name: str) -> tuple[str, str, float]:
    """(rung, recipe, learning rate) of a cell's variant name."""
    rung, recipe, lr = name.split("/")
    return rung, recipe, float(lr.removeprefix("lr"))


def _cell(rung: tuple[str, int, int], recipe: tuple[str, str, dict], lr: float) -> Variant:
    name, maps, blocks = rung
    overrides = {**CHRISCHUTE, **recipe[2], "model.mid_channels": maps, "model.num_blocks": blocks, "train.lr": lr}
    return Variant(cell_name(name, recipe[0], lr), f"{recipe[1]}; {maps} maps x {blocks} blocks; lr {lr:g}", overrides)


TRANSFER: tuple[Variant, ...] = tuple(_cell(rung, recipe, lr) for rung in RUNGS for recipe in RECIPES
                                      for lr in LEARNING_RATES)  # fmt: skip
# one family per rung, read as a design (every cell together, no baseline): the ladder's measures are
# curves over the learning rate and their change with size (analysis), not one member against another
TRANSFER_FAMILIES: tuple[Family, ...] = tuple(
    Family(f"rung {name}", f"at {maps} maps x {blocks} blocks, how does each recipe's final validation bits/dim move "
           "with the learning rate?", "design", tuple(v.name for v in TRANSFER if parse(v.name)[0] == name))
    for name, maps, blocks in RUNGS)  # fmt: skip


def cost(plan, images_per_s: dict[str, float], workers: int, train_images: int) -> list[dict]:
    """Each rung's estimated cost from a measured training speed (``images_per_s``: rung name -> images/s
    of the training step on one worker's threads): cells, the images a cell trains on (``train_images``
    an epoch), and hours for the rung's cells spread over ``workers``. The step is nearly all of a cell
    (docs/performance.md, "Where a cell's time goes"); validation and test add about 8% and are counted
    so; a cell that diverges stops early, so the figure is an upper bound. Rows, then a total row."""
    eval_share = 0.08  # validation and test, as a share of the step's time (measured at 8x2 and 32x4)
    seen = train_images * plan.base.train.epochs
    rows, total = [], 0.0
    for name, _, _ in RUNGS:
        cells = sum(1 for c in plan.cells if parse(c[0])[0] == name)
        seconds = cells * seen / images_per_s[name] * (1 + eval_share)
        total += seconds
        rows.append({"rung": name, "cells": cells, "images a cell trains on": seen,
                     "train images/s (measured)": round(images_per_s[name], 1),
                     "hours (over workers)": round(seconds / 3600 / workers, 2)})  # fmt: skip
    hours = round(total / 3600 / workers, 2)
    rows.append({"rung": "all", "cells": len(plan.cells), "images a cell trains on": "",
                 "train images/s (measured)": "", "hours (over workers)": hours})  # fmt: skip
    return rows


# The check at the paper's size, for a GPU (scripts/gpu/check.sh, step paper-stability): each recipe at the
# seed report's learning rate and at 3x and 10x it, for the steps a short run takes. The size is the
# preset's (`paper`: 64 maps x 8 blocks), not the variant's, so the CPU rehearsal shrinks it with --set.
SEED_REPORT_LR = 1e-3  # the seed report's Adam learning rate, every committed study's
PAPER_CHECK_MULTIPLES = (1, 3, 10)
PAPER_CHECK_RUNG = "paper-size"  # a cell's variant is ``paper-size/RECIPE/lrLR`` (parse() reads it)


def _paper_cell(recipe: tuple[str, str, dict], k: int) -> Variant:
    lr = SEED_REPORT_LR * k
    return Variant(cell_name(PAPER_CHECK_RUNG, recipe[0], lr), f"{recipe[1]}; the preset's size; lr {lr:g} ({k}x the "
                   "seed report's)", {**CHRISCHUTE, **recipe[2], "train.lr": lr})  # fmt: skip


PAPER_CHECK: tuple[Variant, ...] = tuple(_paper_cell(recipe, k) for recipe in RECIPES for k in PAPER_CHECK_MULTIPLES)
PAPER_CHECK_FAMILIES: tuple[Family, ...] = (
    Family("paper size", "at the paper's size, which recipes stay finite at 1x, 3x and 10x the seed report's learning "
           "rate?", "design", tuple(v.name for v in PAPER_CHECK)),)  # fmt: skip
