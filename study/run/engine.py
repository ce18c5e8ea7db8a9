"""One training run from start to end: check the request, find or create its MLflow run, build or
resume its state, and hand it to the epoch loop. A run has an *identity* (the hash of its variant and
full configuration); running the same identity again continues the same MLflow run from its last
checkpoint. Under torchrun, rank 0 leads (MLflow, checkpoints) and the other ranks follow.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from study import distributed, schema, signals
from study.config import ConfigError, apply_values, flatten, unflatten
from study.data import ImageSplits, load_splits
from study.model import check_fits
from study.run import checkpoint, ownership
from study.run.loop import Run, train_to_the_end
from study.run.spec import RunResult, RunSpec, finished_result, resolve_device, run_key
from study.run.state import new_state, restore, to_checkpoint
from study.storage import StorageFault
from study.store import NullLogger, Store
from study.tracking import check_tracking_uri


def train(spec: RunSpec, splits: ImageSplits | None = None, resume_run_id: str | None = None) -> RunResult:
    """Train one run as ``spec`` says (or continue ``resume_run_id``); returns its result.

    User errors (bad config, missing data, unusable device) raise ConfigError / DataError before
    any MLflow run or file is created.
    """
    cfg = spec.cfg
    d = distributed.from_env()
    device = resolve_device(spec.device)
    if d.enabled and resume_run_id is not None:
        raise ConfigError("--resume under torchrun: re-run the same command instead (the run identity resumes it)")
    if d.enabled and cfg.train.compile != "off":
        raise ConfigError("train.compile under torchrun is not supported: set train.compile=off")
    if d.enabled and cfg.train.batch_size % d.world:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must be divisible by the {d.world} processes")
    if d.main:  # a bad store is refused before anything is written
        check_tracking_uri(spec.tracking_uri, must_exist=resume_run_id is not None)
    if resume_run_id is None:
        splits = splits or load_splits(cfg.data)
        check_fits(cfg, splits.shape)
    device = distributed.init(d, device)
    try:
        if d.main:
            result = _lead(spec, splits, resume_run_id, d, device)
        else:
            quiet = dataclasses.replace(spec, echo=lambda _line: None)  # one process speaks and logs
            result = _follow(quiet, splits, d, device)
    except BaseException:
        distributed.shutdown(d, clean=False)
        raise
    distributed.shutdown(d, clean=True)
    return result


def _named_run(spec: RunSpec, store: Store, resume_run_id: str):
    """``--resume RUN_ID``: the run, and the spec to train it by: this one with its config, variant and
    preset taken from the run and its checkpoint (a RunSpec is never changed in place)."""
    try:
        existing = store.get_run(resume_run_id)
    except Exception:
        raise ConfigError(f"--resume {resume_run_id}: no such run in {store.uri}") from None
    found = checkpoint.load(Path(existing.data.tags.get(schema.CHECKPOINT_DIR, "")))
    if found is None:
        raise ConfigError(f"--resume {resume_run_id}: its checkpoint directory has no readable checkpoint")
    saved = unflatten(found[0]["config"])
    _refuse_changes(resume_run_id, saved, spec.requested)
    resumed = dataclasses.replace(spec, cfg=saved, variant=existing.data.tags.get(schema.VARIANT, spec.variant),
                                  preset=existing.data.tags.get(schema.PRESET, spec.preset))  # fmt: skip
    return existing, resumed


def _refuse_changes(run_id: str, saved, requested: dict) -> None:
    """A resumed run keeps the configuration it was trained with: an explicit value that would change
    it (a stabilizer, the learning rate, the epochs) is an error, never silently ignored."""
    before = flatten(saved)
    after = flatten(apply_values(saved, requested))
    changed = [k for k in after if after[k] != before.get(k)]
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ConfigError(f"--resume {run_id}: {k} is {before.get(k)!r} in that run, not {after[k]!r}{more}; "
                          "a resumed run keeps its configuration: drop the change, or start a new run without --resume")


def _new_run(spec: RunSpec, store: Store, exp_id: str, key: str, device: torch.device) -> tuple[str, Path]:
    """Create the MLflow run with its params and tags; its checkpoints go to ROOT/EXPERIMENT/RUN_ID."""
    tags = {schema.RUN_KEY: key, schema.PRESET: spec.preset, schema.VARIANT: spec.variant,
            schema.SEED: spec.cfg.train.seed, schema.DEVICE: device, schema.TORCH_VERSION: torch.__version__,
            schema.THREADS: torch.get_num_threads(), **spec.tags}  # fmt: skip
    name = spec.run_name or f"{spec.variant}-s{spec.cfg.train.seed}"
    run_id = store.create_run(exp_id, name, tags, flatten(spec.cfg), spec.parent_run_id, spec.description, spec.source)
    ckpt_dir = (spec.checkpoint_root / spec.experiment / run_id).resolve()
    store.set_tags(run_id, {schema.CHECKPOINT_DIR: ckpt_dir})
    return run_id, ckpt_dir


def _open_store(spec: RunSpec, store: Store, resume_run_id: str | None, splits: ImageSplits | None):
    """(experiment id, the named run or None, splits, the spec to train by): with --resume the run must
    exist before anything is written, and its own config, variant and data are used."""
    if resume_run_id is None:
        return store.open_experiment(spec.experiment), None, splits, spec
    existing, spec = _named_run(spec, store, resume_run_id)
    splits = splits or load_splits(spec.cfg.data)
    check_fits(spec.cfg, splits.shape)
    return existing.info.experiment_id, existing, splits, spec


def _checkpoint_dir(spec: RunSpec, store: Store, existing) -> Path:
    """A run's checkpoint folder; a run killed right after its creation has no tag for it yet. A folder
    that is not on this machine (the run was started on another one, whose disk this one cannot see)
    is replaced by one under this machine's checkpoint root: the run then starts again from scratch,
    and its epochs already in MLflow are re-trained but not logged twice (a seed's training is
    deterministic, so on like hardware they come out the same)."""
    recorded = existing.data.tags.get(schema.CHECKPOINT_DIR)
    if recorded and Path(recorded).exists():
        return Path(recorded)
    ckpt_dir = (spec.checkpoint_root / spec.experiment / existing.info.run_id).resolve()
    if recorded:
        spec.echo(f"warning: run {existing.info.run_id}'s checkpoints ({recorded}) are not on this machine; "
                  f"training it again from scratch with checkpoints in {ckpt_dir}")  # fmt: skip
    store.set_tags(existing.info.run_id, {schema.CHECKPOINT_DIR: ckpt_dir})
    return ckpt_dir


def _record_resume_source(spec: RunSpec, store: Store, run_id: str, found, rejected: list[str]) -> None:
    """Tag which checkpoint a resume continues from, and why any newer one was passed over: a corrupt
    checkpoint is never loaded, so it can never turn into a divergence."""
    if found is None and not rejected:
        return  # nothing on disk yet (killed before its first save): a plain start
    why = f" ({'; '.join(rejected)})" if rejected else ""
    source = f"{found[1].name}{why}" if found is not None else f"none{why}: started again from scratch"
    if rejected:
        spec.echo(f"warning: run {run_id}: {source}")
    store.set_tags(run_id, {schema.RESUMED_FROM: source})


def _claimable(spec: RunSpec, existing):
    """Refuse a run another live process owns; warn when taking one over from a dead or silent owner."""
    owner = ownership.live_owner(existing)
    if owner is not None:
        raise ownership.OwnedError(f"run {existing.info.run_id} is being trained by {owner}: wait for it, or stop "
                                   f"it (it is taken over once silent for {ownership.GRACE_S:.0f} s)")  # fmt: skip
    previous = ownership.stale_owner(existing)
    if previous:
        spec.echo(f"warning: taking over run {existing.info.run_id} from {previous} (gone, or silent for more than "
                  f"{ownership.GRACE_S:.0f} s)")  # fmt: skip


def _lead(spec: RunSpec, splits: ImageSplits | None, resume_run_id: str | None, d, device) -> RunResult:
    """Rank 0 (or the only process): find or create the MLflow run, claim it, then train it."""
    store = Store(spec.tracking_uri)  # this run's one store: everything below writes through it
    exp_id, existing, splits, spec = _open_store(spec, store, resume_run_id, splits)
    cfg, key = spec.cfg, run_key(spec.variant, spec.cfg)
    if cfg.train.threads:  # before the run records its thread count
        torch.set_num_threads(cfg.train.threads)
    # finding or creating the run and claiming it is one step: two commands started together on this
    # machine do not both create a run of one identity
    run_id, beat, started = None, None, False
    try:
        with contextlib.ExitStack() as held:
            with ownership.file_lock(spec.checkpoint_root / spec.experiment / ".locks" / f"{key}.lock",
                                     f"run identity {key}"):  # fmt: skip
                if existing is None and not spec.fresh:
                    existing = store.find_run(exp_id, key)
                done = existing is not None and existing.info.status in ("FINISHED", "FAILED")
                if done and schema.OUTCOME in existing.data.tags:
                    outcome = existing.data.tags[schema.OUTCOME]
                    spec.echo(f"run {existing.info.run_id} with this identity already finished ({outcome})")
                    distributed.broadcast({"done": True}, d)
                    return finished_result(store, existing)
                found = None
                if existing is not None:
                    _claimable(spec, existing)
                    ckpt_dir = _checkpoint_dir(spec, store, existing)
                    # the folder's lock before any write: a process refused here leaves the run untouched
                    held.enter_context(ownership.file_lock(ckpt_dir / ".owner.lock", f"run {existing.info.run_id}"))
                    run_id = existing.info.run_id
                    rejected: list[str] = []
                    found = checkpoint.load(ckpt_dir, map_location=device, rejected=rejected)
                    if found is not None and found[0].get("mlflow_run_id") != run_id:
                        spec.echo(f"warning: checkpoint in {ckpt_dir} belongs to another run; starting from scratch")
                        found = None
                    _record_resume_source(spec, store, run_id, found, rejected)
                    store.set_status(run_id, "RUNNING")
                else:
                    run_id, ckpt_dir = _new_run(spec, store, exp_id, key, device)
                    held.enter_context(ownership.file_lock(ckpt_dir / ".owner.lock", f"run {run_id}"))
                beat = ownership.Heartbeat(store, run_id).start()
            st = new_state(cfg, splits.shape, device)
            if found is None:  # epoch 0: the state a restore falls back to before any epoch finished
                checkpoint.save(ckpt_dir, to_checkpoint(st, cfg, splits.shape, run_id))
            distributed.broadcast({"done": False, "run_id": run_id, "ckpt_dir": str(ckpt_dir)}, d)
            run = _run(spec, splits, d, device, run_id, ckpt_dir, store.logger(run_id), st, beat.check)
            if found is not None:
                _resume(run, st, found)
            started = True  # from here train_to_the_end records how the run ends
            return train_to_the_end(run, st)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP while setting up: never leave the run RUNNING
        if run_id is not None and not started:
            log = store.logger(run_id)
            log.tags({schema.OUTCOME: "interrupted", schema.INTERRUPTED_BY: signals.name(e)})
            log.terminate("KILLED")
        raise
    except StorageFault as e:  # a store locked past the wait takes no heartbeat-clearing write either
        if beat is not None:
            beat.stop(clear=not e.locked)
            beat = None
        raise
    finally:
        if beat is not None:
            beat.stop()


def _follow(spec: RunSpec, splits: ImageSplits, d, device) -> RunResult:
    """A rank other than 0 under torchrun: build the same model, learn from rank 0 which run and
    checkpoint it is, and train in lockstep without touching MLflow."""
    info = distributed.broadcast(None, d)
    if info["done"]:
        return RunResult("", "completed", 0, float("nan"), None, [], already_done=True)
    st = new_state(spec.cfg, splits.shape, device)
    ckpt_dir = Path(info["ckpt_dir"])
    found = checkpoint.load(ckpt_dir, map_location=device)
    run = _run(spec, splits, d, device, info["run_id"], ckpt_dir, NullLogger(), st)
    if found is not None and found[0]["epoch"] > 0:  # at epoch 0 every rank starts from the seed's init
        _resume(run, st, found)
    return train_to_the_end(run, st)


def _run(spec, splits, d, device, run_id, ckpt_dir, log, st, check_owner=None) -> Run:
    data = {name: getattr(splits, name).to(device) for name in ("train", "val", "test")}
    ddp = distributed.wrap(st.model, d, device) if d.enabled else None
    l2_params = st.model.l2_parameters() if spec.cfg.stabilizers.l2 > 0 else []
    run = Run(spec, spec.cfg, device, d, data, splits.shape, run_id, ckpt_dir, log, ddp, l2_params)
    if check_owner is not None:
        run.check_owner = check_owner
    return run


def _resume(run: Run, st, found) -> None:
    """Continue from a checkpoint; log the epochs it holds that MLflow never heard of (a crash
    between checkpoint and logging)."""
    state, path = found
    restore(st, state, run.device)
    run.spec.echo(f"resuming run {run.run_id} after epoch {state['epoch']} from {path}")
    for entry in st.history:
        if int(entry[schema.EPOCH]) not in run.log.logged:
            run.log.metrics({k: v for k, v in entry.items() if k != schema.EPOCH}, step=int(entry[schema.EPOCH]))
