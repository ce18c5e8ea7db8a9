"""The ablation grid (variant x seed) as a sweep: a search space and an objective on the driver.

The grid is an Optuna GridSampler over (variant, seed); each cell is one MLflow child run of the
study's parent. The cell's run identity (variant + full config) makes a cell that is handed out twice
train only once, and a re-run of an interrupted cell resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from study import schema
from study.config import Config, ConfigError, apply_values, flatten, identity
from study.store import RunLogger
from study.sweep import driver
from study.sweep.cells import Cell, Variant

HEARTBEAT_S = 10  # a worker's trial is stale after GRACE_S without a heartbeat
GRACE_S = 30


@dataclass
class Plan:
    study: str
    preset: str
    base: Config  # the preset with command-line overrides, before any variant
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    skipped: tuple[tuple[Variant, str], ...] = ()  # variants this device cannot run, with why
    experiment: str = ""
    storage: str = ""
    tracking_uri: str | None = None
    checkpoint_root: Path = Path("checkpoints")
    device: str = "auto"
    heartbeat: int = HEARTBEAT_S
    grace: int = GRACE_S
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""  # what the study asks, on its parent run's page

    @property
    def key(self) -> str:
        """Identity of the study's parent run: study, preset and base config (not the grid)."""
        blob = json.dumps({"study": self.study, "base": identity(self.base)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    @property
    def _grid_key(self) -> str:
        grid = json.dumps([[v.name for v in self.variants], list(self.seeds)])
        return hashlib.sha1(grid.encode()).hexdigest()[:8]

    @property
    def optuna_name(self) -> str:
        """One Optuna study per grid (a GridSampler's search space is fixed), named for what it holds;
        the bracket (base config, grid) keeps it unique, as the hashed name before it was."""
        v, s = len(self.variants), len(self.seeds)
        what = f"{v} variant{'s' * (v != 1)} x {s} seed{'s' * (s != 1)}"
        return f"{self.study} {self.preset}: {what} ({self.key}-{self._grid_key})"

    @property
    def legacy_optuna_name(self) -> str:
        """The name a store made before 2026-12-04 holds the same grid under."""
        return f"{self.study}-{self.preset}-{self.key}-{self._grid_key}"

    def cell_config(self, variant: Variant, seed: int) -> Config:
        return apply_values(self.base, {**variant.overrides, "train.seed": seed})

    @property
    def cells(self) -> list[tuple[str, int]]:
        return [(v.name, s) for v in self.variants for s in self.seeds]

    @property
    def sweep(self) -> driver.Sweep:
        tags = {schema.STUDY: self.study, schema.PRESET: self.preset, schema.KIND: schema.KIND_STUDY_PARENT,
                **self.tags}  # fmt: skip
        return driver.Sweep(self.optuna_name, self.storage, self.experiment, self.tracking_uri,
                            f"{self.study}-{self.preset}", {schema.ABLATION_KEY: self.key}, flatten(self.base), tags,
                            self.heartbeat, self.grace, legacy_name=self.legacy_optuna_name)  # fmt: skip


def make_plan(
    study: str,
    preset: str,
    base: Config,
    variants: tuple[Variant, ...],
    seeds: tuple[int, ...],
    only: tuple[str, ...] = (),
    device: str = "auto",
    **kwargs,
) -> Plan:
    """Check the request (unknown variant, empty grid) and resolve which of the study's ``variants`` this
    device runs. experiments.studies.plan_study looks a declared study up and calls this."""
    import torch

    names = [v.name for v in variants]
    for name in only:
        if name not in names:
            raise ConfigError(f"--only {name!r}: study {study} has {', '.join(names)}")
    if not seeds:
        raise ConfigError("no seeds: use --seeds N (N >= 1) or --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds has duplicates: {seeds}")
    chosen = [v for v in variants if not only or v.name in only]
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    skipped = tuple((v, "needs CUDA") for v in chosen if v.needs_cuda and not cuda)
    runnable = tuple(v for v in chosen if not (v.needs_cuda and not cuda))
    if not runnable:
        raise ConfigError("nothing to run on this device: every chosen variant needs CUDA")
    for v in runnable:  # every cell's config is valid before anything starts
        apply_values(base, v.overrides)
    experiment = kwargs.pop("experiment", None) or f"{study}-{preset}"
    storage = kwargs.pop("storage", None) or driver.default_storage()
    return Plan(study, preset, base, runnable, tuple(seeds), skipped, experiment, storage, device=device, **kwargs)


# --- the grid's cells ---------------------------------------------------------------------------------


def _sampler(plan: Plan):
    import optuna

    space = {"variant": [v.name for v in plan.variants], "seed": list(plan.seeds)}
    # one seed for every worker: GridSampler shuffles its grid with it, and grid ids must mean the
    # same cell in every process
    return optuna.samplers.GridSampler(space, seed=0)


def _load_study(plan: Plan):
    return driver.load(plan.sweep, sampler=_sampler(plan))


def cell_states(study) -> dict[tuple[str, int], str]:
    """Per cell the best state among its trials: COMPLETE > RUNNING > WAITING > FAIL/PRUNED > missing."""
    from optuna.trial import TrialState

    rank = {
        TrialState.COMPLETE: 4,
        TrialState.RUNNING: 3,
        TrialState.WAITING: 2,
        TrialState.FAIL: 1,
        TrialState.PRUNED: 1,  # a duplicate that stood aside; the GridSampler counts it as visited
    }
    best: dict[tuple[str, int], TrialState] = {}
    for t in study.get_trials(deepcopy=False):
        # a waiting trial has no params yet: the cell it stands for is in its user attributes, which
        # every cell's trial carries and Optuna's stale-trial retry copies. A trial that another
        # worker is setting up gets its params one at a time: with a variant and no seed yet it is
        # passed over (reading it killed a worker once)
        for params in (t.params, t.user_attrs):
            if "variant" in params and "seed" in params:
                break
        else:
            continue
        cell = (params["variant"], int(params["seed"]))
        if rank.get(t.state, 0) > rank.get(best.get(cell), 0):
            best[cell] = t.state
    return {cell: state.name for cell, state in best.items()}


def requeue(plan: Plan, study) -> int:
    """Fail stale trials (their retry callback re-queues them), then enqueue every cell whose trials
    all failed (a crash inside training, Ctrl-C). Cells never started are left to the GridSampler.
    Called by the coordinator only, never by each worker, so a cell is enqueued once."""
    import optuna

    optuna.storages.fail_stale_trials(study)
    states = cell_states(study)
    queued = 0
    for variant, seed in plan.cells:
        if states.get((variant, seed)) in ("FAIL", "PRUNED"):
            cell = {"variant": variant, "seed": seed}
            study.enqueue_trial(cell, user_attrs=cell)
            queued += 1
    return queued


def _device_for(plan: Plan, worker: int) -> str:
    import torch

    if plan.device in ("cuda", "auto") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{worker % torch.cuda.device_count()}"  # one worker per GPU, round-robin
    return plan.device


def _held_elsewhere(study, trial, variant: str, seed: int) -> bool:
    """True when another live trial already holds this cell, or a finished one completed it."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
        if t.number != trial.number and t.params.get("variant") == variant and t.params.get("seed") == seed:
            if t.state == TrialState.COMPLETE or t.number < trial.number:
                return True
    return False


def _grid_taken(plan: Plan, study) -> bool:
    states = cell_states(study)
    return all(states.get(c) in ("COMPLETE", "RUNNING") for c in plan.cells)


def work(
    plan: Plan,
    parent_run_id: str,
    worker: int = 0,
    echo: Callable[[str], None] = print,
    threads: int = 0,
    progress: Callable[[], None] | None = None,
) -> int:
    """Take cells from the Optuna study until none is left for this worker, calling ``progress`` after
    each (the coordinator's own worker: its progress line and the parent's summary). Returns cells
    trained."""
    import optuna

    from study.data import load_splits
    from study.run.spec import RunSpec

    study = _load_study(plan)
    by_name = {v.name: v for v in plan.variants}
    device = _device_for(plan, worker)

    def make_cell(trial: optuna.Trial) -> Cell:
        variant = by_name[trial.suggest_categorical("variant", [v.name for v in plan.variants])]
        seed = trial.suggest_categorical("seed", list(plan.seeds))
        trial.set_user_attr("variant", variant.name)
        trial.set_user_attr("seed", seed)
        if _held_elsewhere(study, trial, variant.name, seed):
            # a race handed this cell to two workers: the other one has it; this trial is dropped
            raise optuna.TrialPruned(f"cell {variant.name} seed {seed} is running in another trial")
        spec = RunSpec(cfg=plan.cell_config(variant, seed), preset=plan.preset, variant=variant.name,
                       experiment=plan.experiment, tracking_uri=plan.tracking_uri, device=device,
                       checkpoint_root=plan.checkpoint_root, parent_run_id=parent_run_id,
                       tags={schema.STUDY: plan.study, schema.ABLATION_KEY: plan.key},
                       description=variant.rationale, source="run_study.py ablation")  # fmt: skip
        return Cell(f"cell {variant.name} seed {seed}", "training", f"{variant.name} s{seed}", spec)

    def after_each(study) -> bool:
        if progress is not None:
            progress()
        return _grid_taken(plan, study)

    if _grid_taken(plan, study):
        return 0
    splits = load_splits(plan.base.data)  # every variant shares the data
    return driver.work(study, make_cell, splits, worker, echo, threads, after_each)


def record_skipped(plan: Plan, tracking, parent_run_id: str) -> int:
    """Every cell this device cannot run becomes an MLflow run with outcome ``skipped`` and the reason,
    once (found again by its run identity), so a report counts it instead of never seeing it."""
    from study.run.spec import run_key

    exp_id = tracking.experiment(plan.experiment).experiment_id
    made = 0
    for variant, why in plan.skipped:
        for seed in plan.seeds:
            cfg = plan.cell_config(variant, seed)
            key = run_key(variant.name, cfg)
            if tracking.find_run(exp_id, key) is not None:
                continue
            tags = {schema.RUN_KEY: key, schema.PRESET: plan.preset, schema.VARIANT: variant.name, schema.SEED: seed,
                    schema.STUDY: plan.study, schema.ABLATION_KEY: plan.key, schema.OUTCOME: "skipped",
                    schema.SKIP_REASON: why}  # fmt: skip
            run_id = tracking.create_run(exp_id, f"{variant.name}-s{seed}", tags, flatten(cfg), parent_run_id,
                                f"{variant.rationale} (not run here: {why})", "run_study.py ablation")  # fmt: skip
            tracking.set_status(run_id, "KILLED")
            made += 1
    return made


def _worker_main(plan: Plan, parent_run_id: str, worker: int, threads: int) -> None:
    driver.run_worker(lambda: work(plan, parent_run_id, worker, echo=lambda s: print(s, flush=True), threads=threads))


# --- the whole study --------------------------------------------------------------------------------


def summary_rows(plan: Plan, tracking) -> list[dict]:
    """One row per variant: cells done / running / left, and the latest validation bits/dim."""
    states = cell_states(_load_study(plan))
    exp = tracking.experiment(plan.experiment)
    runs = tracking.search_runs([exp.experiment_id], f"tags.{schema.ABLATION_KEY} = '{plan.key}'")
    rows = []
    for v in plan.variants:
        mine = [r for r in runs if r.data.tags.get(schema.VARIANT) == v.name
                and int(r.data.tags.get(schema.SEED, -1)) in plan.seeds]  # fmt: skip
        cells = [states.get((v.name, s)) for s in plan.seeds]
        vals = [r.data.metrics[schema.VAL_BPD] for r in mine if schema.VAL_BPD in r.data.metrics]
        tests = [r.data.metrics[schema.TEST_BPD] for r in mine if schema.TEST_BPD in r.data.metrics]
        outcomes = [r.data.tags.get(schema.OUTCOME) for r in mine if r.data.tags.get(schema.OUTCOME)]
        rows.append({
            "variant": v.name,
            "done": sum(c == "COMPLETE" for c in cells),
            "running": sum(c == "RUNNING" for c in cells),
            "left": sum(c not in ("COMPLETE", "RUNNING") for c in cells),
            "val bpd (latest, mean)": round(sum(vals) / len(vals), 4) if vals else None,
            "test bpd (mean)": round(sum(tests) / len(tests), 4) if tests else None,
            "test n": len(tests),  # the runs behind that mean (a diverged run has no test figure)
            "diverged": sum(o == "diverged" for o in outcomes),
        })  # fmt: skip
    return rows


def run(plan: Plan, workers: int = 1, echo: Callable[[str], None] = print, poll_s: float = 5.0) -> list[dict]:
    """Run every cell of the plan to completion (with ``workers`` local processes), waiting for cells
    that other machines hold; returns the final summary rows."""
    import pandas as pd

    parent = driver.prepare(plan.sweep)
    tracking = plan.sweep.tracking()
    planned = (len(plan.variants) + len(plan.skipped)) * len(plan.seeds)
    summary = tracking.logger(parent)  # the parent's own records: its tags here, its summary metrics below
    # a report on an unfinished study says so; the UI shows what the study asks on its parent's page
    summary.tags({schema.CELLS_PLANNED: planned, schema.NOTE: _parent_note(plan, planned)})
    echo(f"study {plan.study}: parent run {parent}, {len(plan.cells)} cells, {workers} worker(s)")
    if record_skipped(plan, tracking, parent):
        echo(f"recorded {len(plan.skipped) * len(plan.seeds)} cell(s) this device cannot run as skipped")
    last = [None]

    def progress() -> None:
        rows = summary_rows(plan, tracking)  # read once, for the line and the parent's metrics
        state = _print_progress(plan, rows, echo, last[0])
        if state != last[0]:
            log_summary(summary, rows, planned)
        last[0] = state

    def done() -> bool:
        states = cell_states(_load_study(plan))
        return all(states.get(c) == "COMPLETE" for c in plan.cells)

    with driver.finishing(plan.sweep, parent, done):
        driver.run_until_done(plan.sweep, workers, lambda: work(plan, parent, 0, echo, progress=progress), _worker_main,
                              (plan, parent), done, lambda: requeue(plan, _load_study(plan)), progress, echo,
                              poll_s)  # fmt: skip
    rows = summary_rows(plan, tracking)
    log_summary(summary, rows, planned)
    echo(pd.DataFrame(rows).to_string(index=False))
    return rows


def _parent_note(plan: Plan, planned: int) -> str:
    return (f"Study {plan.study} at preset {plan.preset}: {plan.description}. "
            f"{len(plan.variants) + len(plan.skipped)} variants x {len(plan.seeds)} seeds = {planned} cells of "
            f"{plan.base.train.epochs} epochs; each cell is a child run. Summary metrics here: cells_done, and "
            "val_bpd / test_bpd per variant (mean over its seeds) and best over the study; "
            "`run_study.py report` writes the tables and figures.")  # fmt: skip


def metric_key(name: str) -> str:
    """A variant's name as MLflow accepts it in a metric key (letters, digits, _ - . / space and :)."""
    return re.sub(r"[^\w\-. /:]", "_", name)


def log_summary(parent: RunLogger, rows: list[dict], planned: int) -> None:
    """The study at a glance on its parent run (the UI's charts): cells done of planned, each variant's
    mean latest validation and final test bits/dim over its seeds, and the best of each; step = cells
    done, so each chart is the study's history."""
    done = sum(r["done"] for r in rows)
    metrics = {"cells_done": done, "cells_planned": planned}
    for r in rows:
        for key, column in (("val_bpd", "val bpd (latest, mean)"), ("test_bpd", "test bpd (mean)")):
            if r[column] is not None and math.isfinite(r[column]):
                metrics[f"{key}/{metric_key(r['variant'])}"] = r[column]
    for key in ("val_bpd", "test_bpd"):
        values = [v for k, v in metrics.items() if k.startswith(key + "/")]
        if values:
            metrics[f"{key}/best"] = min(values)
    parent.metrics(metrics, step=done)


def _print_progress(plan: Plan, rows: list[dict], echo, last):
    """Print the study's progress when it changed: cells done, running and left with an ETA, then only
    the variants whose finished figures changed since the last line (mean test bits/dim over their
    finished seeds, with how many): never an epoch in progress, never the same variant twice unchanged.
    rows: summary_rows; ``last``: what the previous call returned. Returns (the line's head, the finished
    figures)."""
    from optuna.trial import TrialState

    from study.run.progress import clock, remaining

    done = sum(r["done"] for r in rows)
    running = sum(r["running"] for r in rows)
    left = len(plan.cells) - done - running
    took = [(t.datetime_complete - t.datetime_start).total_seconds()
            for t in _load_study(plan).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.datetime_start and t.datetime_complete]  # fmt: skip
    eta = remaining(took, left + running / 2, max(running, 1))
    head = f"cells done {done}, running {running}, left {left}"
    if took and (left or running):
        head += f", ETA {clock(eta)}"
    finished = {r["variant"]: (r["done"], r["test bpd (mean)"], r["test n"]) for r in rows if r["done"]}
    before = last[1] if last else {}
    changed = [f"{v} {t:.4f} (n={k}; {n}/{len(plan.seeds)} seeds done)" for v, (n, t, k) in finished.items()
               if before.get(v) != (n, t, k) and t is not None]  # fmt: skip
    state = (head, finished)
    if state != last:
        echo(head + (f" | test bpd, finished seeds: {', '.join(changed)}" if changed else ""))
    return state
