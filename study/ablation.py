"""The ablation grid (variant x seed) run through Optuna and MLflow, resumable and spread over workers.

No home-made scheduler: the grid is an Optuna study with a GridSampler in RDB storage (SQLite on one
machine, PostgreSQL for several), so every worker that points at the same storage takes cells that
no one else took. A killed worker's cell is failed by Optuna's heartbeat and re-queued by its
stale-trial retry callback. Each cell is one MLflow child run under the study's parent run; the
cell's run identity (variant + full config) makes a cell that is handed out twice train only once,
and a re-run of an interrupted cell resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from experiments.ablation import Variant, get_study
from study import workers as workers_mod
from study.config import Config, ConfigError, apply_values, flatten, identity
from study.workers import heartbeat_storage

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

    @property
    def key(self) -> str:
        """Identity of the study's parent run: study, preset and base config (not the grid)."""
        blob = json.dumps({"study": self.study, "base": identity(self.base)}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    @property
    def optuna_name(self) -> str:
        """One Optuna study per grid (a GridSampler's search space is fixed)."""
        grid = json.dumps([[v.name for v in self.variants], list(self.seeds)])
        return f"{self.study}-{self.preset}-{self.key}-{hashlib.sha1(grid.encode()).hexdigest()[:8]}"

    def cell_config(self, variant: Variant, seed: int) -> Config:
        return apply_values(self.base, {**variant.overrides, "train.seed": seed})

    @property
    def cells(self) -> list[tuple[str, int]]:
        return [(v.name, s) for v in self.variants for s in self.seeds]


def make_plan(
    study: str,
    preset: str,
    base: Config,
    seeds: tuple[int, ...],
    only: tuple[str, ...] = (),
    device: str = "auto",
    **kwargs,
) -> Plan:
    """Check the request (unknown variant, empty grid) and resolve which variants this device runs."""
    import torch

    try:
        variants = get_study(study)
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None
    names = [v.name for v in variants]
    for name in only:
        if name not in names:
            raise ConfigError(f"--only {name!r}: study {study} has {', '.join(names)}")
    if not seeds:
        raise ConfigError("no seeds: use --seeds N (N >= 1) or --seed-list 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seed-list has duplicates: {seeds}")
    chosen = [v for v in variants if not only or v.name in only]
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    skipped = tuple((v, "needs CUDA") for v in chosen if v.needs_cuda and not cuda)
    runnable = tuple(v for v in chosen if not (v.needs_cuda and not cuda))
    if not runnable:
        raise ConfigError("nothing to run on this device: every chosen variant needs CUDA")
    for v in runnable:  # every cell's config is valid before anything starts
        apply_values(base, v.overrides)
    experiment = kwargs.pop("experiment", None) or f"{study}-{preset}"
    storage = kwargs.pop("storage", None) or f"sqlite:///{Path.cwd() / 'optuna.db'}"
    return Plan(study, preset, base, runnable, tuple(seeds), skipped, experiment, storage, device=device, **kwargs)


def describe(plan: Plan) -> str:
    """The plan as text: variants with their overrides against the base, seeds, cell count."""
    base = flatten(plan.base)
    lines = [
        f"study {plan.study} at preset {plan.preset}: {len(plan.variants)} variants x {len(plan.seeds)} seeds "
        f"= {len(plan.cells)} cells, {plan.base.train.epochs} epochs each",
        f"seeds: {', '.join(map(str, plan.seeds))} (shared by every variant)",
        f"MLflow experiment {plan.experiment}; Optuna study {plan.optuna_name} in {plan.storage}",
        "",
    ]
    for v in plan.variants:
        changed = {k: val for k, val in v.overrides.items() if base.get(k) != val}
        lines.append(f"{v.name:<20} {v.rationale}")
        shown = ", ".join(f"{k.split('.', 1)[1]}={val}" for k, val in changed.items()) or "(same as base)"
        lines.append(f"{'':<20} {shown}")
    for v, why in plan.skipped:
        lines.append(f"{v.name:<20} skipped here: {why}")
    return "\n".join(lines)


# --- stores -----------------------------------------------------------------------------------------


def _storage(plan: Plan):
    return heartbeat_storage(plan.storage, plan.heartbeat, plan.grace)


def _sampler(plan: Plan):
    import optuna

    space = {"variant": [v.name for v in plan.variants], "seed": list(plan.seeds)}
    # one seed for every worker: GridSampler shuffles its grid with it, and grid ids must mean the
    # same cell in every process
    return optuna.samplers.GridSampler(space, seed=0)


def prepare(plan: Plan) -> str:
    """Create the stores, the experiment, the Optuna study and the parent run once, before any
    worker starts (concurrent creation of a SQLite store races). Returns the parent run id."""
    import mlflow
    import optuna

    from study.tracking import setup

    _, exp_id = setup(plan.tracking_uri, plan.experiment)
    optuna.create_study(study_name=plan.optuna_name, storage=_storage(plan), load_if_exists=True)
    client = mlflow.MlflowClient()
    found = client.search_runs([exp_id], filter_string=f"tags.ablation_key = '{plan.key}'")
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    if parents:
        parent = parents[0].info.run_id
        client.update_run(parent, status="RUNNING")
        return parent
    from study.tracking import git_commit

    tags = {"ablation_key": plan.key, "study": plan.study, "preset": plan.preset, "kind": "study-parent",
            "git_commit": git_commit(), **plan.tags}  # fmt: skip
    run = client.create_run(exp_id, tags=tags, run_name=f"{plan.study}-{plan.preset}")
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in flatten(plan.base).items()])
    return run.info.run_id


def _load_study(plan: Plan):
    import optuna

    return optuna.load_study(study_name=plan.optuna_name, storage=_storage(plan), sampler=_sampler(plan))


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
        params = t.params or t.system_attrs.get("fixed_params") or {}
        if "variant" not in params:
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
            study.enqueue_trial({"variant": variant, "seed": seed})
            queued += 1
    return queued


# --- a worker -----------------------------------------------------------------------------------------


def _device_for(plan: Plan, worker: int) -> str:
    import torch

    if plan.device in ("cuda", "auto") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{worker % torch.cuda.device_count()}"  # one worker per GPU, round-robin
    return plan.device


def work(
    plan: Plan,
    parent_run_id: str,
    worker: int = 0,
    echo: Callable[[str], None] = print,
    threads: int = 0,
    progress: bool = False,
) -> int:
    """Take cells from the Optuna study until none is left for this worker. Returns cells trained."""
    import optuna
    import torch

    from study.data import load_splits
    from study.training import RunSpec, train

    if threads:
        torch.set_num_threads(threads)
    study = _load_study(plan)
    splits = load_splits(plan.base.data)  # every variant shares the data
    by_name = {v.name: v for v in plan.variants}
    device = _device_for(plan, worker)
    done = 0

    def objective(trial: optuna.Trial) -> float:
        variant = by_name[trial.suggest_categorical("variant", [v.name for v in plan.variants])]
        seed = trial.suggest_categorical("seed", list(plan.seeds))
        if _held_elsewhere(study, trial, variant.name, seed):
            # a race handed this cell to two workers: the other one has it; this trial is dropped
            raise optuna.TrialPruned(f"cell {variant.name} seed {seed} is running in another trial")
        cfg = plan.cell_config(variant, seed)
        if threads:
            cfg = apply_values(cfg, {"train.threads": threads})
        echo(f"[worker {worker}] cell {variant.name} seed {seed}: training")
        spec = RunSpec(cfg=cfg, preset=plan.preset, variant=variant.name, experiment=plan.experiment,
                       tracking_uri=plan.tracking_uri, device=device, checkpoint_root=plan.checkpoint_root,
                       parent_run_id=parent_run_id, tags={"study": plan.study, "ablation_key": plan.key},
                       echo=lambda s: echo(f"[worker {worker}] {variant.name} s{seed}: {s}"),
                       progress=False)  # fmt: skip
        result = train(spec, splits=splits)
        trial.set_user_attr("mlflow_run_id", result.run_id)
        trial.set_user_attr("outcome", result.outcome)
        # a diverged cell is a result, not a failure: it completes with an infinite value
        return result.val_bpd if result.outcome != "diverged" and math.isfinite(result.val_bpd) else math.inf

    def stop_when_grid_is_taken(study, trial) -> None:
        nonlocal done
        done += 1
        if progress:
            _print_progress(plan, echo, None)
        states = cell_states(study)
        if all(states.get(c) in ("COMPLETE", "RUNNING") for c in plan.cells):
            study.stop()

    states = cell_states(study)
    if all(states.get(c) in ("COMPLETE", "RUNNING") for c in plan.cells):
        return 0
    study.optimize(objective, callbacks=[stop_when_grid_is_taken], catch=())
    return done


def _held_elsewhere(study, trial, variant: str, seed: int) -> bool:
    """True when another live trial already holds this cell, or a finished one completed it."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
        if t.number != trial.number and t.params.get("variant") == variant and t.params.get("seed") == seed:
            if t.state == TrialState.COMPLETE or t.number < trial.number:
                return True
    return False


def _worker_main(plan: Plan, parent_run_id: str, worker: int, threads: int) -> None:
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    work(plan, parent_run_id, worker, echo=lambda s: print(s, flush=True), threads=threads)


# --- the whole study --------------------------------------------------------------------------------


def summary_rows(plan: Plan) -> list[dict]:
    """One row per variant: cells done / running / left, and the latest validation bits/dim."""
    import mlflow

    study = _load_study(plan)
    states = cell_states(study)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(plan.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.ablation_key = '{plan.key}'")
    rows = []
    for v in plan.variants:
        mine = [r for r in runs if r.data.tags.get("variant") == v.name
                and int(r.data.tags.get("seed", -1)) in plan.seeds]  # fmt: skip
        cells = [states.get((v.name, s)) for s in plan.seeds]
        vals = [r.data.metrics["val_bpd"] for r in mine if "val_bpd" in r.data.metrics]
        tests = [r.data.metrics["test_bpd"] for r in mine if "test_bpd" in r.data.metrics]
        outcomes = [r.data.tags.get("outcome") for r in mine if r.data.tags.get("outcome")]
        rows.append({
            "variant": v.name,
            "done": sum(c == "COMPLETE" for c in cells),
            "running": sum(c == "RUNNING" for c in cells),
            "left": sum(c not in ("COMPLETE", "RUNNING") for c in cells),
            "val bpd (latest, mean)": round(sum(vals) / len(vals), 4) if vals else None,
            "test bpd (mean)": round(sum(tests) / len(tests), 4) if tests else None,
            "diverged": sum(o == "diverged" for o in outcomes),
        })  # fmt: skip
    return rows


def run(plan: Plan, workers: int = 1, echo: Callable[[str], None] = print, poll_s: float = 5.0) -> list[dict]:
    """Run every cell of the plan to completion (with ``workers`` local processes), waiting for cells
    that other machines hold; returns the final summary rows."""
    import pandas as pd

    parent = prepare(plan)
    echo(f"study {plan.study}: parent run {parent}, {len(plan.cells)} cells, {workers} worker(s)")
    last = None
    try:
        while True:
            requeue(plan, _load_study(plan))
            if workers == 1:
                work(plan, parent, 0, echo, progress=True)
            else:
                procs = workers_mod.start(_worker_main, workers, plan, parent)
                while any(p.is_alive() for p in procs):
                    time.sleep(poll_s)
                    last = _print_progress(plan, echo, last)
                for p in procs:
                    p.join()
                if any(p.exitcode not in (0, None) for p in procs):
                    echo(f"warning: a worker exited with {[p.exitcode for p in procs]}; its cells are re-queued")
            states = cell_states(_load_study(plan))
            pending = [c for c in plan.cells if states.get(c) != "COMPLETE"]
            if not pending:
                break
            # cells held by a live worker elsewhere, or by a killed one whose heartbeat is not yet stale
            last = _print_progress(plan, echo, last)
            echo(f"waiting for {len(pending)} cell(s) held by other workers (stale after {plan.grace} s)")
            time.sleep(poll_s)
    finally:
        import mlflow

        states = cell_states(_load_study(plan))
        finished = all(states.get(c) == "COMPLETE" for c in plan.cells)
        mlflow.MlflowClient().set_terminated(parent, "FINISHED" if finished else "KILLED")
    rows = summary_rows(plan)
    echo(pd.DataFrame(rows).to_string(index=False))
    return rows


def _print_progress(plan: Plan, echo, last):
    rows = summary_rows(plan)
    done = sum(r["done"] for r in rows)
    running = sum(r["running"] for r in rows)
    latest = ", ".join(f"{r['variant']} {r['val bpd (latest, mean)']}" for r in rows if r["val bpd (latest, mean)"])
    line = f"cells done {done}, running {running}, left {len(plan.cells) - done - running}" + (
        f" | val bpd: {latest}" if latest else ""
    )
    if line != last:
        echo(line)
    return line
