"""The registry of studies that `run_study.py ablation STUDY` runs: their variants and families, and
the plans the engine's sweeps (study/sweep/) are handed: a sweep takes its cells as data and never
imports this."""

from __future__ import annotations

from experiments import factorial, ladder
from experiments.ablation import (
    FAMILIES,
    HEADLINE,
    HEADLINE_FAMILIES,
    LONG_RUN,
    LONG_RUN_FAMILIES,
    STABILIZERS,
    Family,
    Variant,
)

STUDIES: dict[str, tuple[Variant, ...]] = {
    "stabilizers": STABILIZERS,
    "headline": HEADLINE,
    "factorial": factorial.HALF,
    "factorial-zero-init": factorial.HALF_ZERO_INIT,
    "factorial-full": factorial.FULL,
    "long-run": LONG_RUN,
    "transfer": ladder.TRANSFER,
    "paper-stability": ladder.PAPER_CHECK,
}
STUDY_FAMILIES: dict[str, tuple[Family, ...]] = {
    "stabilizers": FAMILIES,
    "headline": HEADLINE_FAMILIES,
    "long-run": LONG_RUN_FAMILIES,
    "transfer": ladder.TRANSFER_FAMILIES,
    "paper-stability": ladder.PAPER_CHECK_FAMILIES,
    # a factorial has no baseline: every cell is read together ("design")
    **{name: (Family(name, "every main effect and two-factor interaction", "design",
                     tuple(v.name for v in cells)),)
       for name, cells in (("factorial", factorial.HALF), ("factorial-full", factorial.FULL),
                           ("factorial-zero-init", factorial.HALF_ZERO_INIT))},
}  # fmt: skip
STUDY_DESCRIPTIONS = {
    "stabilizers": "which of the seed report's stabilizers does Real NVP need? (families of one-at-a-time contrasts)",
    "factorial": "every main effect and two-factor interaction of five stabilizers: 2^(5-1) resolution-V half fraction",
    "factorial-full": "the same five stabilizers, full 2^5 factorial",
    "headline": "the contrasts the README's findings rest on, at 5 paired seeds: bijector, clipping, scale, precision",
    "factorial-zero-init": "the half fraction on a zero-initialised base, whose first forward pass cannot overflow",
    "long-run": "the seed report's own statistic, last 40 of 100 epochs, for its recipe, the paper's and exp+softplus "
                "(preset cifar-long)",
    "transfer": "the scale ladder: 4 recipes x 6 learning rates at 3 model sizes (8x2, 16x2, 32x2), fp32 "
                "(preset ladder): do the verdicts transfer toward the paper's size?",
    "paper-stability": "the ladder's 4 recipes at 1x, 3x and 10x the seed report's learning rate, at the preset's size "
                       "(paper: 64x8), for a GPU (scripts/gpu/check.sh, step paper-stability)",
}
# studies whose --dry-run also prints each rung's cost from a measured step time (experiments/ladder.py)
RUNGS = {"transfer": ladder.RUNGS}
FACTORIAL_STUDIES = ("factorial", "factorial-full", "factorial-zero-init")


def get_study(name: str) -> tuple[Variant, ...]:
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}: `run_study.py ablation --list` shows {', '.join(STUDIES)}")
    return STUDIES[name]


def families(study: str) -> tuple[Family, ...]:
    """The families of a study (one family holding every variant when it declares none)."""
    if study in STUDY_FAMILIES:
        return STUDY_FAMILIES[study]
    names = tuple(v.name for v in get_study(study))
    return (Family(study, STUDY_DESCRIPTIONS.get(study, ""), names[0], names),)


def find_variant(name: str) -> Variant:
    """A variant of any study by name (``train --variant``); KeyError lists the known ones."""
    for variants in STUDIES.values():
        for v in variants:
            if v.name == name:
                return v
    known = ", ".join(v.name for v in STABILIZERS)
    raise KeyError(f"unknown variant {name!r}: use one of {known}, or a cell of `ablation factorial --dry-run`")


def plan_study(study: str, preset: str, base, seeds: tuple[int, ...], only: tuple[str, ...] = (), device: str = "auto",
               **kwargs):  # fmt: skip
    """The ablation plan (study.sweep.ablation.Plan) of a declared study: its variants and what it asks,
    checked (unknown study or variant, empty grid: a ConfigError)."""
    from study.config import ConfigError
    from study.sweep.ablation import make_plan

    try:
        variants = get_study(study)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    return make_plan(study, preset, base, variants, seeds, only, device, description=STUDY_DESCRIPTIONS.get(study, ""),
                     **kwargs)  # fmt: skip


def plan_search(base, preset: str, variant: str | None, trials: int, low: float, high: float, sampler: str, pruner,
                **kw):  # fmt: skip
    """A learning-rate search (study.sweep.lrsearch.Search) with the switches of stabilizer variant
    ``variant`` (None: the preset's own), checked: an unknown variant is a ConfigError."""
    from study.config import ConfigError
    from study.sweep.lrsearch import make_search

    chosen = None
    if variant:
        by = {v.name: v for v in STABILIZERS}
        if variant not in by:
            raise ConfigError(f"--variant {variant!r}: use one of {', '.join(by)}")
        chosen = by[variant]
    return make_search(base, preset, chosen, trials, low, high, sampler, pruner, **kw)


def describe(plan) -> str:
    """The plan (study.sweep.ablation.Plan) as text: per family its question and baseline, then each
    member with the switches it changes against that baseline; seeds and cell count."""
    from study.config import flatten

    lines = [
        f"study {plan.study} at preset {plan.preset}: {len(plan.variants)} variants x {len(plan.seeds)} seeds "
        f"= {len(plan.cells)} cells, {plan.base.train.epochs} epochs each",
        f"seeds: {', '.join(map(str, plan.seeds))} (shared by every variant)",
        f"MLflow experiment {plan.experiment}; Optuna study {plan.optuna_name} in {plan.storage}",
    ]
    by_name = {v.name: v for v in (*plan.variants, *(v for v, _ in plan.skipped))}
    skipped = dict((v.name, why) for v, why in plan.skipped)
    for fam in families(plan.study):
        members = [m for m in fam.members if m in by_name]
        if not members:
            continue
        if fam.baseline == "design":  # a factorial: every cell's levels, no baseline
            lines += ["", f"[{fam.name}] {fam.question}"] + [f"  {m:<26} {by_name[m].rationale}" for m in members]
            continue
        against = "the member before it" if fam.baseline == "previous" else f"`{fam.baseline}`"
        lines += ["", f"[{fam.name}] {fam.question} (each against {against})"]
        for name in members:
            ref = fam.comparator(name)
            v = by_name[name]
            if ref is None:
                shown = "(baseline)"
            else:
                base = {**flatten(plan.base), **by_name[ref].overrides} if ref in by_name else flatten(plan.base)
                changed = {k: val for k, val in flatten(plan.cell_config(v, 0)).items()
                           if k.startswith("stabilizers.") and base.get(k) != val}  # fmt: skip
                shown = ", ".join(f"{k.split('.', 1)[1]}={val}" for k, val in changed.items()) or "(no switch differs)"
            lines.append(f"  {name:<22} {v.rationale}")
            lines.append(f"  {'':<22} {shown}" + (f"  [skipped here: {skipped[name]}]" if name in skipped else ""))
    return "\n".join(lines)
