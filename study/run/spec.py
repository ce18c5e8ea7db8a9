"""What a run is: its specification, its identity and its result."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from study.config import Config, ConfigError, identity


class RunPruned(Exception):
    """Raised by RunSpec.on_epoch to stop a run early; it is recorded (KILLED, outcome pruned)."""


class Hooks:
    """Seams where tests inject faults into a run; production runs use these, which do nothing.
    Tests subclass it (in-process) or patch it (tests/faults.py, for command-line runs)."""

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss of global step ``step`` before backward (a test may make it NaN)."""
        return loss

    def after_checkpoint(self, epoch: int) -> None:
        """Right after an epoch's checkpoint, before MLflow hears of the epoch (a test may die here)."""


@dataclass(frozen=True)
class RunSpec:
    """Everything that says which run to do and where to record it. Frozen: what changes while a run is
    under way lives in its state (study.run.state); a resume makes a new spec (dataclasses.replace)."""

    cfg: Config
    preset: str = "custom"
    variant: str = "default"
    experiment: str = "realnvp"
    tracking_uri: str | None = None
    device: str = "auto"
    checkpoint_root: Path = Path("checkpoints")
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    fresh: bool = False  # start a new run even if one with this identity exists
    echo: Callable[[str], None] = print  # one summary line per epoch
    progress: bool | None = None  # progress bar on stderr; None: when stderr is a terminal
    # called after each logged epoch with (epoch, val_bpd); raising RunPruned ends the run as
    # KILLED with outcome "pruned" (the learning-rate search's pruner uses this)
    on_epoch: Callable[[int, float], None] | None = None
    evaluate_test: bool = True  # False for search trials: tuning never touches the test split
    run_name: str | None = None  # default: VARIANT-sSEED
    description: str = ""  # shown as the run's description in the MLflow UI (a variant's rationale)
    source: str = "run_study.py train"  # the entry point, MLflow's source tag
    hooks: Hooks = field(default_factory=Hooks)
    # with --resume: the values the command line set explicitly; one that differs from the run's own
    # config is refused (a resumed run keeps its configuration)
    requested: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    run_id: str
    outcome: str  # completed | recovered | diverged | pruned
    epochs: int  # epochs completed
    val_bpd: float
    test_bpd: float | None
    events: list[dict[str, Any]]
    already_done: bool = False


def run_key(variant: str, cfg: Config) -> str:
    """Identity of a run: its variant and every setting that changes what it computes."""
    blob = json.dumps({"variant": variant, "config": identity(cfg)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N (the ablation gives each worker its own GPU that way)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if name == "cpu" or (kind == "cuda" and (not index or index.isdigit())):
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device(name)
    raise ConfigError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")


def finished_result(store, run) -> RunResult:
    """The result of an MLflow run (of ``store``) that already finished (nothing is trained again)."""
    from study import schema

    m, tags = run.data.metrics, run.data.tags
    steps = [step for step, _ in store.metric_history(run.info.run_id, schema.VAL_BPD)]
    epochs = max(steps, default=0)
    return RunResult(run.info.run_id, tags[schema.OUTCOME], epochs, m.get(schema.VAL_BPD, math.nan),
                     m.get(schema.TEST_BPD), [], already_done=True)  # fmt: skip
