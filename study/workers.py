"""What the ablation grid and the learning-rate search share: Optuna storage with heartbeats and
local worker processes."""

from __future__ import annotations

import multiprocessing
import os
import warnings

MAX_RETRY = 3  # a killed worker's trial is re-queued at most this many times


def heartbeat_storage(url: str, heartbeat: int, grace: int):
    """RDB storage whose running trials send heartbeats; a trial silent for ``grace`` seconds is
    failed and re-queued with the same parameters (RetryHeartbeatStaleTrialCallback)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and the stale-trial retry are marked experimental; they are what we rely on
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=heartbeat,
        grace_period=grace,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
    )


def start(target, workers: int, *args) -> list[multiprocessing.Process]:
    """Start ``workers`` spawned processes running ``target(*args, worker_index, threads)``, the
    cores shared evenly between them."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(*args, i, threads)) for i in range(workers)]
    for p in procs:
        p.start()
    return procs
