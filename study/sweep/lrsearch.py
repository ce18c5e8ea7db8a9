"""Optuna learning-rate search as a sweep: log-uniform lr (optionally the warm-up length), objective
= validation bits/dim in eval mode (never the test split), pruned per epoch, each trial a nested
MLflow run. Re-running the command continues the study until it holds the requested number of
finished trials; a killed worker's trial is retried through heartbeats, resuming from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from study import schema
from study.config import Config, ConfigError, apply_values, identity
from study.sweep import driver
from study.sweep.cells import Cell, Variant

SAMPLERS = ("tpe", "grid", "gp")
PRUNERS = ("median", "hyperband", "none")


@dataclass
class Search:
    base: Config  # preset + variant overrides + command-line overrides
    preset: str
    variant: str
    trials: int
    low: float
    high: float
    sampler: str = "tpe"
    pruner: object = "median"  # a name from PRUNERS, or an optuna pruner (tests)
    search_warmup: bool = False
    storage: str = ""
    tracking_uri: str | None = None
    experiment: str = ""
    checkpoint_root: Path = Path("checkpoints")
    device: str = "auto"
    heartbeat: int = 10
    grace: int = 30
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        blob = json.dumps({"base": identity(self.base), "range": [self.low, self.high], "sampler": self.sampler,
                           "warmup": self.search_warmup, "trials": self.trials if self.sampler == "grid" else None},
                          sort_keys=True)  # fmt: skip
        return f"lr-{self.variant}-{self.preset}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"

    @property
    def study_name(self) -> str:
        """The Optuna study's name, readable; the bracket is ``name``'s hash (base config, range, sampler),
        which keeps two searches apart. ``name`` stays the parent run's identity and name."""
        warmup = " and warm-up" if self.search_warmup else ""
        return (f"lr-search {self.variant} {self.preset}: {self.sampler}, lr {self.low:g} to {self.high:g}{warmup} "
                f"({self.name.rsplit('-', 1)[1]})")  # fmt: skip

    @property
    def sweep(self) -> driver.Sweep:
        tags = {schema.VARIANT: self.variant, schema.PRESET: self.preset, schema.SAMPLER: self.sampler,
                schema.PRUNER: str(self.pruner)}  # fmt: skip
        params = {"search.low": self.low, "search.high": self.high, "search.trials": self.trials}
        return driver.Sweep(self.study_name, self.storage, self.experiment, self.tracking_uri, self.name,
                            {schema.LR_SEARCH: self.name, schema.KIND: schema.KIND_LR_SEARCH}, params, tags,
                            self.heartbeat, self.grace, legacy_name=self.name)  # fmt: skip


def make_search(base: Config, preset: str, variant: Variant | None, trials: int, low: float, high: float,
                sampler: str, pruner, **kw) -> Search:  # fmt: skip
    """Validate the request; a bad range, sampler or pruner is a ConfigError (exit 2). ``variant``'s
    switches go on top of ``base`` (experiments.studies.plan_search finds it by name)."""
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 or high <= 0:
        raise ConfigError(f"--range {low:g} {high:g}: learning rates must be positive numbers")
    if low >= high:
        raise ConfigError(f"--range {low:g} {high:g}: LOW must be below HIGH")
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if isinstance(pruner, str) and pruner not in PRUNERS:
        raise ConfigError(f"--pruner {pruner!r}: use one of {', '.join(PRUNERS)}")
    if trials < 1:
        raise ConfigError("--trials must be >= 1")
    if variant is not None:
        base = apply_values(base, variant.overrides)
    kw["experiment"] = kw.get("experiment") or f"lr-search-{preset}"
    kw["storage"] = kw.get("storage") or driver.default_storage()
    name = variant.name if variant is not None else "default"
    return Search(base, preset, name, trials, low, high, sampler, pruner, **kw)


def _sampler(search: Search, worker: int, existing: int = 0):
    import os
    import socket
    import zlib

    import numpy as np
    import optuna

    # distinct per worker, per invocation and per machine: one seed everywhere (or again after a
    # restart, or on two machines started together) proposes the same random start-up points again
    machine = zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())
    seed = (1000 + worker + 7919 * existing + 104729 * machine) % 2**32
    if search.sampler == "grid":
        grid = [float(v) for v in np.geomspace(search.low, search.high, search.trials)]
        return optuna.samplers.GridSampler({"lr": grid}, seed=0)  # grid ids must agree across workers
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(search: Search):
    import optuna

    if not isinstance(search.pruner, str):
        return search.pruner
    if search.pruner == "median":
        # from the first epoch on: short CPU searches have only a few epochs to save
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=search.base.train.epochs)
    return optuna.pruners.NopPruner()


def _finished(study) -> int:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return sum(1 for t in done if not t.user_attrs.get("duplicate"))


def _duplicate_retry(study, trial) -> bool:
    """True when a lower-numbered retry of the same failed trial is running or finished (Optuna's
    public RetryHeartbeatStaleTrialCallback.retried_trial_number names a retry's original)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback as Retry
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    me = next(t for t in trials if t.number == trial.number)
    origin = Retry.retried_trial_number(me)
    if origin is None:
        return False
    live = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
    return any(t.number < trial.number and t.state in live and Retry.retried_trial_number(t) == origin
               and not t.user_attrs.get("duplicate") for t in trials)  # fmt: skip


def work(search: Search, parent: str, worker: int = 0, echo: Callable[[str], None] = print, threads: int = 0) -> int:
    """Run trials until the study holds ``search.trials`` finished (complete or pruned) trials."""
    import optuna

    from study.data import load_splits
    from study.run.spec import RunPruned, RunSpec

    existing = len(driver.load(search.sweep).trials)
    study = driver.load(search.sweep, sampler=_sampler(search, worker, existing), pruner=_pruner(search))

    def make_cell(trial: optuna.Trial) -> Cell:
        lr = trial.suggest_float("lr", search.low, search.high, log=True)
        if _duplicate_retry(study, trial):
            # on SQLite two workers can both fail the same stale trial and both re-queue it
            trial.set_user_attr("duplicate", True)
            raise optuna.TrialPruned("another retry of the same trial is running")
        values = {"train.lr": lr}
        if search.search_warmup:
            values["stabilizers.warmup_steps"] = trial.suggest_int("warmup_steps", 0, 200, step=50)

        def on_epoch(epoch: int, val_bpd: float) -> None:
            trial.report(val_bpd, epoch)
            if trial.should_prune():
                raise RunPruned()

        spec = RunSpec(cfg=apply_values(search.base, values), preset=search.preset, variant=search.variant,
                       experiment=search.experiment, tracking_uri=search.tracking_uri, device=search.device,
                       checkpoint_root=search.checkpoint_root, parent_run_id=parent,
                       tags={schema.LR_SEARCH: search.name, schema.TRIAL: str(trial.number)},
                       on_epoch=on_epoch, evaluate_test=False, run_name=f"{search.variant}-lr{lr:.3g}-t{trial.number}",
                       description=f"learning-rate search {search.name}: trial {trial.number}, lr {lr:.4g}",
                       source="run_study.py lr-search")  # fmt: skip
        name = f"trial {trial.number}"
        return Cell(name, f"lr {lr:.3g}", name, spec, pruned_is_result=True)

    def enough(study) -> bool:
        from optuna.trial import TrialState

        from study.run.progress import clock, remaining

        finished = _finished(study)
        took = [(t.datetime_complete - t.datetime_start).total_seconds()
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
                if t.datetime_start and t.datetime_complete]  # fmt: skip
        if finished < search.trials:
            echo(f"[worker {worker}] trials finished {finished}/{search.trials}, "
                 f"ETA {clock(remaining(took, search.trials - finished))} at this worker's pace")  # fmt: skip
            return False
        return True

    if _finished(study) >= search.trials:
        return 0
    optuna.storages.fail_stale_trials(study)
    splits = load_splits(search.base.data)
    return driver.work(study, make_cell, splits, worker, echo, threads, enough)


def _worker_main(search: Search, parent: str, worker: int, threads: int) -> None:
    driver.run_worker(lambda: work(search, parent, worker, echo=lambda s: print(s, flush=True), threads=threads))


def trials_frame(search: Search):
    """One row per trial: number, state, lr, value, outcome, mlflow_run_id."""
    import pandas as pd

    study = driver.load(search.sweep)
    rows = [{"trial": t.number, "state": t.state.name, "lr": t.params.get("lr"),
             "warmup_steps": t.params.get("warmup_steps"), "value": t.value,
             "last_reported": t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None,
             "outcome": t.user_attrs.get("outcome"), "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
             "duplicate": bool(t.user_attrs.get("duplicate"))}
            for t in study.get_trials(deepcopy=False)]  # fmt: skip
    return pd.DataFrame(rows)


def run(search: Search, workers: int = 1, echo: Callable[[str], None] = print):
    """The whole search: prepare, work (in ``workers`` processes), record the best on the parent."""
    import optuna

    sweep = search.sweep
    parent = driver.prepare(sweep)
    echo(f"search {search.name}: {search.trials} trials, lr in [{search.low:g}, {search.high:g}], "
         f"{search.sampler} sampler, {search.pruner} pruner; MLflow parent {parent}")  # fmt: skip

    def done() -> bool:
        study = driver.load(sweep)
        optuna.storages.fail_stale_trials(study)
        return _finished(study) >= search.trials

    with driver.finishing(sweep, parent, done):
        driver.run_until_done(sweep, workers, lambda: work(search, parent, 0, echo), _worker_main, (search, parent),
                              done, echo=echo, poll_s=max(1, search.heartbeat))  # fmt: skip
    frame = trials_frame(search)
    frame = frame[~frame["duplicate"]].reset_index(drop=True)
    complete = frame[(frame["state"] == "COMPLETE") & frame["value"].map(lambda v: v is not None and math.isfinite(v))]
    if len(complete):
        best = complete.loc[complete["value"].idxmin()]
        tracking = sweep.tracking()
        best_metrics = {schema.BEST_VAL_BPD: best["value"], schema.BEST_LR: best["lr"]}
        tracking.log_metrics(parent, best_metrics, 0, timestamp_ms=0)
        tracking.set_tags(parent, {schema.BEST_TRIAL: int(best["trial"]), schema.BEST_RUN_ID: best["mlflow_run_id"]})
    return frame, (complete.loc[complete["value"].idxmin()] if len(complete) else None)
