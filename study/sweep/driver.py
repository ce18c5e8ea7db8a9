"""Many runs through Optuna and MLflow: the one place a sweep is scheduled.

No home-made scheduler: a sweep is an Optuna study in RDB storage (SQLite on one machine, PostgreSQL
for several) whose running trials send heartbeats. Every worker that points at the same storage takes
trials that no one else took; a killed worker's trial is failed once its heartbeat is stale and
re-queued with the same parameters (RetryHeartbeatStaleTrialCallback). Each trial is one MLflow child
run of the sweep's parent run. The ablation (sweep/ablation.py) and the learning-rate search
(sweep/lrsearch.py) each supply only how a trial becomes a cell (sweep/cells.py); the worker loop
(:func:`work`: claim a cell, train it, record it, heartbeat, stop cleanly) is this module's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_RETRY = 3  # a killed worker's trial is re-queued at most this many times
START_STAGGER_S = 1.5  # worker N asks for its first trial N x this late (see work: two asks at once can meet)
STORAGE_FAULT_EXIT = 75  # a worker stopped by a full disk or a store locked past the wait (EX_TEMPFAIL)
PARENT_ATTR = "mlflow_parent_run_id"  # on a sweep's parent claim study (_claim_parent)
CLAIM_PREFIX = "parent-run claim: "  # the claim studies' names: trial-less Optuna studies beside the sweeps
LEGACY_CLAIM_PREFIX = "mlflow-parent-"  # the claims' names in stores made before 2026-12-04


def is_claim(study_name: str) -> bool:
    return study_name.startswith((CLAIM_PREFIX, LEGACY_CLAIM_PREFIX))


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
    legacy_name: str = ""  # the study's name in a store made before readable names: resumed under it

    def tracking(self):
        """The sweep's MLflow store (study.store.Store), opened from its URI in this process."""
        from study.store import Store

        return Store(self.tracking_uri)


def study_name(sweep: Sweep, store=None) -> str:
    """The Optuna study a sweep runs in: its readable name, or its legacy hashed one where the storage
    already holds that study (and not the readable one), so a study begun before the names changed is
    resumed, not begun again."""
    import optuna

    if not sweep.legacy_name:
        return sweep.study_name
    names = {s.study_name for s in optuna.get_all_study_summaries(store or storage(sweep), include_best_trial=False)}
    return sweep.legacy_name if sweep.legacy_name in names and sweep.study_name not in names else sweep.study_name


def default_storage() -> str:
    """Where a sweep's Optuna study lives when --storage and $OPTUNA_STORAGE are unset: optuna.db here."""
    from pathlib import Path

    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def heartbeat_storage(url: str, heartbeat: int, grace: int):
    """RDB storage whose running trials send heartbeats; a trial silent for ``grace`` seconds is
    failed and re-queued with the same parameters (RetryHeartbeatStaleTrialCallback)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_stopped_trials()
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


class _StoppedTrial(logging.Filter):
    """Optuna logs a traceback for a trial stopped by Ctrl-C, SIGTERM or a storage fault; the worker says
    it in one line instead (the trial still fails, and is re-queued)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from study.storage import StorageFault

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (KeyboardInterrupt, StorageFault))


def _quiet_stopped_trials() -> None:
    log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _StoppedTrial) for f in log.filters):
        log.addFilter(_StoppedTrial())


def run_worker(work: Callable[[], object]) -> None:
    """The body of a spawned worker: SIGTERM and SIGHUP handled like Ctrl-C (its run is recorded as
    interrupted, the coordinator re-queues the cell), a storage fault one line and STORAGE_FAULT_EXIT."""
    import sys

    from study import signals
    from study.storage import StorageFault

    signals.install()
    try:
        work()
    except KeyboardInterrupt as e:
        sys.exit(signals.exit_code(e))
    except StorageFault as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(STORAGE_FAULT_EXIT)


def storage(sweep: Sweep):
    return heartbeat_storage(sweep.storage, sweep.heartbeat, sweep.grace)


def load(sweep: Sweep, sampler=None, pruner=None):
    import optuna

    store = storage(sweep)
    return optuna.load_study(study_name=study_name(sweep, store), storage=store, sampler=sampler, pruner=pruner)


def prepare(sweep: Sweep) -> str:
    """Create the stores, the experiment, the Optuna study and the parent run once, before any worker
    starts (concurrent creation of a SQLite store races). Returns the parent run id (RUNNING)."""
    import optuna

    tracking = sweep.tracking()
    exp_id = tracking.open_experiment(sweep.experiment)
    store = storage(sweep)
    optuna.create_study(study_name=study_name(sweep, store), storage=store, direction=sweep.direction,
                        load_if_exists=True)  # fmt: skip
    tags = {**sweep.parent_tags, **sweep.extra_tags}
    parent = _find_parent(tracking, sweep, exp_id) or _claim_parent(
        tracking, sweep, exp_id, lambda: tracking.create_run(exp_id, sweep.parent_name, tags, sweep.parent_params))
    tracking.set_status(parent, "RUNNING")
    return parent


def _find_parent(tracking, sweep: Sweep, exp_id: str) -> str | None:
    return tracking.find_parent(exp_id, sweep.parent_tags)


def _claim_parent(tracking, sweep: Sweep, exp_id: str, create: Callable[[], str], wait_s: float = 120.0) -> str:
    """The parent run, created by exactly one of the machines that found none. Searching and then
    creating lets two machines started together both create one (seen: two parents when the second
    machine started 3 s after the first on a loaded host). Optuna study names are unique in the shared
    storage, so creating a claim study is atomic: its creator makes the parent and records the run id
    on the claim; the others wait for that id. The claim is named by the parent's identity (experiment
    and tags), not by the grid, since several grids of one study share one parent."""
    import optuna

    identity = json.dumps([sweep.experiment, sorted(sweep.parent_tags.items())])
    name = f"{CLAIM_PREFIX}{sweep.experiment} ({hashlib.sha1(identity.encode()).hexdigest()[:12]})"
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
        if run_id and tracking.is_live(run_id):
            return run_id
        if run_id or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # the parent was deleted since, or the claimant died between its claim and the parent: take over
    run_id = _find_parent(tracking, sweep, exp_id) or create()
    optuna.load_study(study_name=name, storage=store).set_user_attr(PARENT_ATTR, run_id)
    return run_id


def finish(sweep: Sweep, parent: str, finished: bool) -> None:
    sweep.tracking().set_status(parent, "FINISHED" if finished else "KILLED")


@contextlib.contextmanager
def finishing(sweep: Sweep, parent: str, done: Callable[[], bool]):
    """The parent run ends FINISHED once ``done()``, else KILLED (interrupted, crashed); after a storage
    fault it stays RUNNING like its cells, since the store may take no write now."""
    from study.storage import StorageFault

    try:
        yield
    except StorageFault:
        raise
    except BaseException:
        finish(sweep, parent, done())
        raise
    finish(sweep, parent, done())


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
    hold (stale after ``sweep.grace`` s). A worker stopped by a storage fault stops the others and
    raises StorageFault: another round would meet the same disk or lock."""
    from study.storage import StorageFault

    while True:
        before_round()
        if workers == 1:
            work_here()
        else:
            procs = start_workers(worker_main, workers, *worker_args)
            try:
                while any(p.is_alive() for p in procs):
                    time.sleep(poll_s)
                    if any(p.exitcode == STORAGE_FAULT_EXIT for p in procs):
                        raise _stopped_by_storage()
                    while_waiting()
            except (KeyboardInterrupt, StorageFault):  # Ctrl-C, SIGTERM, SIGHUP, a full disk: each worker
                for p in procs:  # records its run as interrupted
                    p.terminate()  # SIGTERM, which a worker handles like Ctrl-C
                for p in procs:
                    p.join(timeout=60)
                raise
            for p in procs:
                p.join()
            if any(p.exitcode == STORAGE_FAULT_EXIT for p in procs):
                raise _stopped_by_storage()
            if any(p.exitcode not in (0, None) for p in procs):
                echo(f"warning: a worker exited with {[p.exitcode for p in procs]}; its trials are re-queued")
        if done():
            return
        while_waiting()
        echo(f"waiting for trials held by other workers (stale after {sweep.grace} s)")
        time.sleep(poll_s)


def _stopped_by_storage():
    from study.storage import StorageFault

    return StorageFault("a worker stopped on a full disk or a locked store (its line is above); the study is left "
                        "to resume: run the same command again once that is fixed", locked=True)  # fmt: skip


def work(study, make_cell: Callable, splits, worker: int = 0, echo: Callable[[str], None] = print, threads: int = 0,
         after_each: Callable[[object], bool] = lambda study: False) -> int:  # fmt: skip
    """One worker of any sweep: take trials of ``study`` (its storage sends their heartbeats), turn each
    into a cell with ``make_cell(trial)`` (a sweep.cells.Cell; it may raise optuna.TrialPruned to stand
    aside), train the cell's run on ``splits`` and record it on the trial; after each trial call
    ``after_each(study)``, and stop once it says so. A cell whose run a live process still trains
    fails its trial (left to its owner). Returns the trials this worker finished.

    Optuna's SQLite storage has no row locks, so two workers asking at the same moment can both be
    handed the same re-queued (waiting) trial (optuna/optuna#4621; seen on a study's resume). Their
    run's ownership lock lets one of them train it and the other fails the trial; the one that trained
    then finds the trial ended and cannot record on it. That worker says so and goes on to the next
    trial (it used to crash, leaving the study one worker short): its run is finished in MLflow and the
    trial stays failed; an ablation's next round re-queues the cell, which then records that run without
    training it again (a learning-rate search just samples one trial more). Worker ``worker`` > 0 also
    asks for its first trial ``worker`` x START_STAGGER_S seconds late, so workers started together
    rarely meet on one trial."""
    import dataclasses

    import optuna
    import torch

    from study.config import apply_values
    from study.run.engine import train
    from study.run.ownership import OwnedError

    if threads:
        torch.set_num_threads(threads)
    done = 0
    ended: list[int] = []  # the trial another worker ended while this one had it (see the docstring)

    def objective(trial: optuna.Trial) -> float:
        try:
            return train_and_record(trial)
        except optuna.exceptions.UpdateFinishedTrialError:  # nothing here tells a trial: another worker did
            ended[:] = [trial.number]
            raise

    def train_and_record(trial: optuna.Trial) -> float:
        cell = make_cell(trial)
        spec = cell.spec
        if threads:
            spec = dataclasses.replace(spec, cfg=apply_values(spec.cfg, {"train.threads": threads}))
        prefix = f"[worker {worker}] {cell.run_label}: "
        spec = dataclasses.replace(spec, echo=lambda line: echo(prefix + line), progress=False)
        echo(f"[worker {worker}] {cell.name}: {cell.note}")
        try:
            result = train(spec, splits=splits)
        except OwnedError as e:  # a live process still trains this run (its trial's heartbeat looked stale)
            echo(f"[worker {worker}] {cell.name}: {e}; left to its owner, this trial fails")
            raise
        value = record_trial(trial, result)
        if cell.pruned_is_result and result.outcome == "pruned":
            raise optuna.TrialPruned()
        return value

    def after(study, _trial) -> None:
        nonlocal done
        done += 1
        if after_each(study):
            study.stop()

    time.sleep(worker * START_STAGGER_S)
    while True:
        try:
            study.optimize(objective, callbacks=[after], catch=(OwnedError,))
            return done
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            # Optuna then cannot tell the trial either ("Cannot tell a FAIL trial"); anything else is a fault
            if not ended:
                raise
            echo(f"[worker {worker}] trial {ended[0]} was ended by another worker that was handed it too "
                 "(SQLite storage); its run is finished in MLflow and the trial stays failed")
            ended.clear()


def record_trial(trial, result) -> float:
    """Keep a trained trial's MLflow run and outcome on the Optuna trial; its objective value. A
    diverged run is a result, not a failure: it completes with an infinite value."""
    trial.set_user_attr("mlflow_run_id", result.run_id)
    trial.set_user_attr("outcome", result.outcome)
    if result.outcome == "diverged":
        trial.set_user_attr("cause", result.events[-1]["cause"] if result.events else "unknown")
        return math.inf
    return result.val_bpd if math.isfinite(result.val_bpd) else math.inf
