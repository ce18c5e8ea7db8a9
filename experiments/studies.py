"""The registry of studies that `run_study.py ablation STUDY` runs: their variants and families."""

from __future__ import annotations

from experiments import factorial
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
}
STUDY_FAMILIES: dict[str, tuple[Family, ...]] = {
    "stabilizers": FAMILIES,
    "headline": HEADLINE_FAMILIES,
    "long-run": LONG_RUN_FAMILIES,
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
}
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
