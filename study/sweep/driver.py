"""Many runs through Optuna and MLflow: the one place a sweep is scheduled.

No home-made scheduler: a sweep is an Optuna study in RDB storage (SQLite on one machine, PostgreSQL
for several) whose running trials send heartbeats. Every worker that points at the same storage takes
trials that no one else took; a killed worker's trial is failed once its heartbeat is stale and
re-queued with the same parameters (RetryHeartbeatStaleTrialCallback). Each trial is one MLflow child
run of the sweep's parent run. The ablation (sweep/ablation.py) and the learning-rate search
(sweep/lrsearch.py) are each a search space and an objective on top of this.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from study import schema

MAX_RETRY = 3  # a killed worker's trial is re-queued at most this many times
PARENT_ATTR = "mlflow_parent_run_id"  # on a sweep's parent claim study (_claim_parent)
CLAIM_PREFIX = "mlflow-parent-"  # the claim studies' names: trial-less Optuna studies beside the sweeps


@dataclass
class Sweep:
    """What the driver needs of a sweep: where its Optuna study and MLflow runs live, and how its
    parent run is found (``parent_tags`` identify it) and described."""

    study_name: str
    storage: str
    experiment: str
    tracking_uri: str | None
    parent_name: str
    parent_tags: dict[str, str]  # identify the parent: every one must match
    parent_params: dict[str, object] = field(default_factory=dict)
    extra_tags: dict[str, str] = field(default_factory=dict)  # recorded on a new parent, not matched
    heartbeat: int = 10
    grace: int = 30
    direction: str = "minimize"


def heartbeat_storage(url: str, heartbeat: int, grace: int):
    """RDB storage whose running trials send heartbeats; a trial silent for ``grace`` seconds is
    failed and re-queued with the same parameters (RetryHeartbeatStaleTrialCallback)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and the stale-trial retry are marked experimental; they are what we rely on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat,
                grace_period=grace,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
        except Exception:  # noqa: BLE001 - machines starting together race to create the schema: one wins
            if attempt == 5:
                raise
            time.sleep(1.0 + attempt)


def storage(sweep: Sweep):
    return heartbeat_storage(sweep.storage, sweep.heartbeat, sweep.grace)


def load(sweep: Sweep, sampler=None, pruner=None):
    import optuna

    return optuna.load_study(study_name=sweep.study_name, storage=storage(sweep), sampler=sampler, pruner=pruner)


def prepare(sweep: Sweep) -> str:
    """Create the stores, the experiment, the Optuna study and the parent run once, before any worker
    starts (concurrent creation of a SQLite store races). Returns the parent run id (RUNNING)."""
    import mlflow
    import optuna

    from study.tracking import create_run, setup

    _, exp_id = setup(sweep.tracking_uri, sweep.experiment)
    optuna.create_study(study_name=sweep.study_name, storage=storage(sweep), direction=sweep.direction,
                        load_if_exists=True)  # fmt: skip
    client = mlflow.MlflowClient()
    parent = _find_parent(sweep, exp_id) or _claim_parent(sweep, exp_id, lambda: create_run(
        exp_id, sweep.parent_name, {**sweep.parent_tags, **sweep.extra_tags}, sweep.parent_params))  # fmt: skip
    client.update_run(parent, status="RUNNING")
    return parent


def _find_parent(sweep: Sweep, exp_id: str) -> str | None:
    import mlflow

    match = " and ".join(f"tags.{k} = '{v}'" for k, v in sweep.parent_tags.items())
    runs = mlflow.MlflowClient().search_runs([exp_id], filter_string=match, order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if schema.PARENT not in r.data.tags]
    return parents[0].info.run_id if parents else None


def _claim_parent(sweep: Sweep, exp_id: str, create: Callable[[], str], wait_s: float = 120.0) -> str:
    """The parent run, created by exactly one of the machines that found none. Searching and then
    creating lets two machines started together both create one (seen: two parents when the second
    machine started 3 s after the first on a loaded host). Optuna study names are unique in the shared
    storage, so creating a claim study is atomic: its creator makes the parent and records the run id
    on the claim; the others wait for that id. The claim is named by the parent's identity (experiment
    and tags), not by the grid, since several grids of one study share one parent."""
    import optuna

    identity = json.dumps([sweep.experiment, sorted(sweep.parent_tags.items())])
    name = f"{CLAIM_PREFIX}{hashlib.sha1(identity.encode()).hexdigest()[:12]}"
    store = storage(sweep)
    try:
        claim = optuna.create_study(study_name=name, storage=store)
    except optuna.exceptions.DuplicatedStudyError:
        claim = None
    if claim is not None:  # this machine won: it alone creates the parent
        run_id = create()
        claim.set_user_attr(PARENT_ATTR, run_id)
        return run_id
    deadline = time.monotonic() + wait_s
    while True:
        run_id = optuna.load_study(study_name=name, storage=store).user_attrs.get(PARENT_ATTR)
        if run_id and _live(run_id):
            return run_id
        if run_id or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # the parent was deleted since, or the claimant died between its claim and the parent: take over
    run_id = _find_parent(sweep, exp_id) or create()
    optuna.load_study(study_name=name, storage=store).set_user_attr(PARENT_ATTR, run_id)
    return run_id


def _live(run_id: str) -> bool:
    import mlflow

    try:
        return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:
        return False


def finish(sweep: Sweep, parent: str, finished: bool) -> None:
    import mlflow

    mlflow.MlflowClient().set_terminated(parent, "FINISHED" if finished else "KILLED")


def start_workers(target, workers: int, *args) -> list[multiprocessing.Process]:
    """Start ``workers`` spawned processes running ``target(*args, worker_index, threads)``, the
    cores shared evenly between them."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(*args, i, threads)) for i in range(workers)]
    for p in procs:
        p.start()
    return procs


def run_until_done(
    sweep: Sweep,
    workers: int,
    work_here: Callable[[], object],
    worker_main: Callable,
    worker_args: tuple,
    done: Callable[[], bool],
    before_round: Callable[[], None] = lambda: None,
    while_waiting: Callable[[], None] = lambda: None,
    echo: Callable[[str], None] = print,
    poll_s: float = 5.0,
) -> None:
    """Rounds of work until ``done()``: each round re-queues what needs it (``before_round``, the
    coordinator only, so a trial is re-queued once), then works in this process (one worker) or in
    ``workers`` spawned processes, then waits for trials that other machines or killed workers still
    hold (stale after ``sweep.grace`` s)."""
    while True:
        before_round()
        if workers == 1:
            work_here()
        else:
            procs = start_workers(worker_main, workers, *worker_args)
            try:
                while any(p.is_alive() for p in procs):
                    time.sleep(poll_s)
                    while_waiting()
            except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: each worker records its run as interrupted
                for p in procs:
                    p.terminate()  # SIGTERM, which a worker handles like Ctrl-C
                for p in procs:
                    p.join(timeout=60)
                raise
            for p in procs:
                p.join()
            if any(p.exitcode not in (0, None) for p in procs):
                echo(f"warning: a worker exited with {[p.exitcode for p in procs]}; its trials are re-queued")
        if done():
            return
        while_waiting()
        echo(f"waiting for trials held by other workers (stale after {sweep.grace} s)")
        time.sleep(poll_s)


def record_trial(trial, result) -> float:
    """Keep a trained trial's MLflow run and outcome on the Optuna trial; its objective value. A
    diverged run is a result, not a failure: it completes with an infinite value."""
    trial.set_user_attr("mlflow_run_id", result.run_id)
    trial.set_user_attr("outcome", result.outcome)
    if result.outcome == "diverged":
        trial.set_user_attr("cause", result.events[-1]["cause"] if result.events else "unknown")
        return math.inf
    return result.val_bpd if math.isfinite(result.val_bpd) else math.inf
