"""A two-level factorial over the stabilizers, as data: every main effect and two-factor interaction
from one grid (Engstrom et al., ICLR 2020, read code-level optimizations this way).

Its own study (``run_study.py ablation factorial``, or ``factorial-full``) rather than a family of the
stabilizer study: its cells are read together by a linear model over all of them, not pairwise against
one baseline, and its base differs (no batch-norm bijector, no input clamp: chrischute's architecture
with every studied switch at a level).

Levels, each chosen so that the switch acts at the committed study's size (the activity diagnostics
of the stabilizer study show it):
- scale: exp (eq. 2 literally) against softplus (the seed report's "Softplus", scale reading);
- s clamp: off against a hard clamp at 0.5, which binds on 17-32% of log-scales in the first epochs;
- gradient clipping: off against 100 (the official code's and the seed report's), which acts on every
  step (norms are 10^3-10^4);
- weight norm with L2: plain convolutions without L2 against weight-normed ones with L2 5e-5 on their
  magnitudes (one factor: the seed report names them together);
- precision: fp32 against fp16 autocast with a GradScaler (the seed report's literal AMP).

The half fraction is 2^(5-1) with E = ABCD (defining relation I = ABCDE): resolution V, so main effects
and two-factor interactions are aliased only with interactions of three factors or more.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from experiments.ablation import CHRISCHUTE, Variant


@dataclass(frozen=True)
class Factor:
    name: str  # short, used in cell names and tables
    label: str
    low: dict[str, object]  # config overrides at level -1
    high: dict[str, object]  # at level +1


FACTORS: tuple[Factor, ...] = (
    Factor("softplus", "scale: softplus (+) vs exp (-)", {"stabilizers.scale_fn": "exp"},
           {"stabilizers.scale_fn": "softplus"}),
    Factor("clamp", "s clamped hard at 0.5 (+) vs not (-)", {"stabilizers.s_clamp": 0.0},
           {"stabilizers.s_clamp": 0.5, "stabilizers.s_clamp_kind": "hard"}),
    Factor("clip", "gradient clipping at 100 (+) vs none (-)", {"stabilizers.grad_clip": 0.0},
           {"stabilizers.grad_clip": 100.0}),
    Factor("wn-l2", "weight norm with L2 5e-5 (+) vs plain convolutions, no L2 (-)",
           {"stabilizers.weight_norm": False, "stabilizers.l2": 0.0},
           {"stabilizers.weight_norm": True, "stabilizers.l2": 5e-5}),
    Factor("fp16", "fp16 autocast + GradScaler (+) vs fp32 (-)", {"stabilizers.amp": "off"},
           {"stabilizers.amp": "fp16"}),
)  # fmt: skip

BASE = {**CHRISCHUTE}  # every other switch: chrischute's (no bijector, no input clamp, st batch norm)
# The redone factorial's base: chrischute's with the last s/t convolution zero-initialised, so every
# coupling starts as the identity whatever the scale function. On BASE every cell with neither softplus
# nor the clamp of s was non-finite at step 0, before any update (the initialisation probe shows why:
# exp of an |s| of 40 at initialisation): those runs measured initialisation, not the stabilizers.
# Zero init rather than the batch-norm bijector keeps the architecture the seed report's; the bijector
# is a switch of its own (the headline study's bijector family).
BASE_ZERO_INIT = {**CHRISCHUTE, "stabilizers.zero_init": True}


def full_design(k: int) -> list[tuple[int, ...]]:
    """All 2^k runs of a two-level design, levels -1/+1, in standard order (first factor slowest)."""
    return [tuple(levels) for levels in itertools.product((-1, 1), repeat=k)]


def half_fraction(k: int) -> list[tuple[int, ...]]:
    """The 2^(k-1) half fraction with the last factor generated as the product of the others
    (I = AB...K): resolution k (V for k = 5)."""
    runs = []
    for levels in itertools.product((-1, 1), repeat=k - 1):
        last = 1
        for level in levels:
            last *= level
        runs.append((*levels, last))
    return runs


def cell_name(levels: tuple[int, ...], factors: tuple[Factor, ...] = FACTORS, prefix: str = "f") -> str:
    on = [f.name for f, level in zip(factors, levels, strict=True) if level > 0]
    return f"{prefix}-" + ("+".join(on) if on else "none")


def cell(levels: tuple[int, ...], factors: tuple[Factor, ...] = FACTORS, base: dict | None = None,
         prefix: str = "f") -> Variant:  # fmt: skip
    overrides = dict(BASE if base is None else base)
    for f, level in zip(factors, levels, strict=True):
        overrides.update(f.high if level > 0 else f.low)
    described = "; ".join(f"{f.name} {'on' if level > 0 else 'off'}" for f, level in zip(factors, levels, strict=True))
    return Variant(cell_name(levels, factors, prefix), f"factorial cell: {described}", overrides)


def levels_of(name: str, factors: tuple[Factor, ...] = FACTORS) -> dict[str, int]:
    """A cell's levels (-1/+1 by factor name) from its name (any prefix: f-, z-)."""
    rest = name.split("-", 1)[1]
    on = set() if rest == "none" else set(rest.split("+"))
    return {f.name: (1 if f.name in on else -1) for f in factors}


HALF = tuple(cell(levels) for levels in half_fraction(len(FACTORS)))
FULL = tuple(cell(levels) for levels in full_design(len(FACTORS)))
# the same half fraction on the zero-initialised base; cells named z-... so that no name means two configs
HALF_ZERO_INIT = tuple(cell(levels, base=BASE_ZERO_INIT, prefix="z") for levels in half_fraction(len(FACTORS)))
