"""What a sweep is given, as data: the recipes its cells train (a name, a one-line rationale, config
overrides on top of a preset) and the one cell a worker is about to train. The studies themselves are
declared above the engine, in experiments/; a sweep never imports them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Variant:
    name: str
    rationale: str
    overrides: dict[str, object] = field(default_factory=dict)
    needs_cuda: bool = False  # a cell this device cannot run is recorded as skipped, with why


@dataclass(frozen=True)
class Cell:
    """One cell as a sweep makes it from a trial: what the worker says about it and the run to train.

    ``name`` labels the worker's lines ("cell paper seed 0", "trial 3"), ``note`` is the first line's
    text after it ("training", "lr 0.001"), ``run_label`` prefixes the run's own lines ("paper s0"),
    and ``spec`` (a study.run.RunSpec) is the run. ``pruned_is_result``: a run the pruner stopped ends
    the trial as pruned (a search), not as a value."""

    name: str
    note: str
    run_label: str
    spec: object
    pruned_is_result: bool = False
