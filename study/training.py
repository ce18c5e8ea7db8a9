"""One training run: trained, tracked in MLflow, checkpointed every epoch, resumable, NaN-safe.

The loop is flat on purpose (nanoGPT style): set up, then for each epoch train, evaluate,
checkpoint, log. A run has an *identity* (the hash of its variant and full configuration); running
the same identity again continues the same MLflow run from its last checkpoint.

Order inside an epoch: checkpoint first (it holds every epoch's metrics), then log to MLflow. A
crash between the two is repaired on resume by logging the epochs that MLflow is missing from the
checkpoint's history, so every epoch is logged exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from study import checkpoint
from study.config import Config, ConfigError, flatten, identity, unflatten
from study.data import ImageSplits, eval_batches, load_splits, train_batches
from study.distributed import SINGLE, Dist, all_sum, shard
from study.memory import peak_memory_mb, reset_peak_memory
from study.metrics import bits_per_dim

POISON_ENV = "REALNVP_TEST_POISON_STEP"  # test hook: make the loss NaN at this global step, once per run
CRASH_ENV = "REALNVP_TEST_CRASH_AFTER_CHECKPOINT"  # test hook: exit right after this epoch's checkpoint


@dataclass
class RunSpec:
    """Everything that says which run to do and where to record it."""

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


class RunPruned(Exception):
    """Raised by RunSpec.on_epoch to stop a run early; it is recorded, not a failure."""


@dataclass
class RunResult:
    run_id: str
    outcome: str  # completed | recovered | diverged
    epochs: int  # epochs completed
    val_bpd: float
    test_bpd: float | None
    events: list[dict[str, Any]]
    already_done: bool = False


def run_key(variant: str, cfg: Config) -> str:
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


def check_amp(amp: str, device: torch.device) -> None:
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("stabilizers.amp=fp16 needs CUDA (GradScaler); on the CPU use stabilizers.amp=bf16")


def compile_fn(fn, mode: str):
    """torch.compile ``fn`` (e.g. a model's log_prob) in one of TrainConfig.compile's modes."""
    return torch.compile(fn, mode=None if mode == "default" else mode)


def autocast(amp: str, device: torch.device):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def lr_at(step: int, base: float, warmup_steps: int, factor: float = 1.0) -> float:
    """Learning rate at a global step: linear warm-up over ``warmup_steps``, then constant (paper)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return base * warm * factor


@torch.no_grad()
def evaluate(
    model, images: torch.Tensor, batch_size: int, amp: str = "off", channels_last: bool = False, d: Dist = SINGLE
) -> float:
    """Bits/dim over every image of a split in eval mode: the mean of per-image values, so batches of
    different sizes are weighted by their size. Restores the model's previous mode. Under torchrun each
    rank takes its share of every batch (same noise as one process) and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=images.device)  # sum of bits/dim, count
    for x in eval_batches(images, batch_size):
        x = shard(x, d)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(amp, images.device):
            lp = model.log_prob(x)
        total[0] += bits_per_dim(lp.double(), model.num_dims).sum()
        total[1] += len(x)
    model.train(was_training)
    total = all_sum(total, d)
    return (total[0] / total[1]).item()


@dataclass
class StepResult:
    loss: float  # the optimised loss: NLL in nats per image plus the L2 term
    nll: float  # NLL in nats per image
    grad_norm: float  # global gradient norm before clipping
    finite: bool  # False: nothing was applied, the caller decides what a divergence means
    skipped: bool  # fp16 GradScaler skipped the step for inf/NaN gradients


def train_step(
    model, opt, scaler, x, amp: str, l2: float, l2_params, max_norm: float, loss_hook=None, ddp=None, d: Dist = SINGLE
) -> StepResult:
    """One optimisation step: forward, backward, unscale, clip, Adam. The loss is the mean NLL in
    nats per image (as in the official code and chrischute), plus 0.5 * l2 * sum(p^2) over
    ``l2_params``; it stays fp32 under autocast. Exactly one host sync, for the step decision.
    Under torchrun ``ddp`` is the DistributedDataParallel wrapper and the reported loss is averaged
    over ranks, so every rank takes the same decision."""
    opt.zero_grad(set_to_none=True)
    with autocast(amp, x.device):
        lp = model.log_prob(x) if ddp is None else type(ddp.module).log_density(*ddp(x))
    nll = -lp.float().mean()
    loss = nll
    if l2_params:
        loss = loss + 0.5 * l2 * sum(p.float().pow(2).sum() for p in l2_params)
    if loss_hook is not None:
        loss = loss_hook(loss)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    stats = torch.stack([loss.detach(), nll.detach(), norm.float()])
    if d.enabled:  # gradients (so the norm) are already equal on every rank; losses are per rank
        stats = torch.cat([all_sum(stats[:2].clone(), d) / d.world, stats[2:]])
    loss_v, nll_v, norm_v = stats.tolist()
    # with a GradScaler, non-finite gradients under a finite loss are fp16 overflow: it skips the step
    finite = math.isfinite(loss_v) and (scaler is not None or math.isfinite(norm_v))
    if not finite:
        return StepResult(loss_v, nll_v, norm_v, False, False)
    skipped = False
    if scaler is not None:
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped = scaler.get_scale() < before
    else:
        opt.step()
    return StepResult(loss_v, nll_v, norm_v, True, skipped)


def _test_crash_after_checkpoint(epoch: int) -> None:
    """Test hook: die like SIGKILL right after this epoch's checkpoint, before MLflow hears of it."""
    if os.environ.get(CRASH_ENV) == str(epoch):
        os._exit(137)


class _Poison:
    """Test-only NaN injection (see POISON_ENV); fires once per run (not again after a restore)."""

    def __init__(self):
        value = os.environ.get(POISON_ENV)
        self.step = int(value) if value else None

    def __call__(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        if self.step is not None and step == self.step:
            self.step = None
            return loss * float("nan")
        return loss


class _Tracker:
    """The few MLflow calls a run makes, with the time they take counted (logging overhead)."""

    def __init__(self, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient()
        self.run_id = run_id
        self.seconds = 0.0
        # epochs MLflow already holds: an epoch re-trained after a resume from an older checkpoint
        # is not logged a second time, so every epoch appears exactly once
        self.logged = {m.step for m in self.client.get_metric_history(run_id, "val_bpd")}

    @contextlib.contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if "val_bpd" in values:
            self.logged.add(step)
        with self.timed():
            batch = [Metric(k, float(v), now, step) for k, v in values.items()]
            self.client.log_batch(self.run_id, metrics=batch)

    def tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        with self.timed():
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def artifact(self, path: Path, folder: str) -> None:
        with self.timed():
            self.client.log_artifact(self.run_id, str(path), folder)


class _NullTracker(_Tracker):
    """What ranks other than 0 log: nothing."""

    def __init__(self):
        self.run_id, self.seconds, self.logged = "", 0.0, set()

    def metrics(self, values, step):
        pass

    def tags(self, values):
        pass

    def artifact(self, path, folder):
        pass


def _new_run(spec: RunSpec, exp_id: str, key: str, device: torch.device) -> tuple[str, Path]:
    """Create the MLflow run with its params and tags; its checkpoints go to ROOT/EXPERIMENT/RUN_ID."""
    import mlflow
    from mlflow.entities import Param, RunTag

    from study.tracking import git_commit

    tags = {
        "run_key": key,
        "preset": spec.preset,
        "variant": spec.variant,
        "seed": str(spec.cfg.train.seed),
        "git_commit": git_commit(),
        "device": str(device),
        "torch_version": torch.__version__,
        "threads": str(torch.get_num_threads()),
        **spec.tags,
    }
    if spec.parent_run_id:
        tags["mlflow.parentRunId"] = spec.parent_run_id
    client = mlflow.MlflowClient()
    run = client.create_run(exp_id, tags=tags, run_name=f"{spec.variant}-s{spec.cfg.train.seed}")
    run_id = run.info.run_id
    ckpt_dir = (spec.checkpoint_root / spec.experiment / run_id).resolve()
    params = [Param(k, str(v)) for k, v in flatten(spec.cfg).items()]
    client.log_batch(run_id, params=params, tags=[RunTag("checkpoint_dir", str(ckpt_dir))])
    return run_id, ckpt_dir


def _state(model, opt, scaler, gen, epoch, step, history, run_state, cfg, image_shape, run_id) -> dict:
    return {
        "config": flatten(cfg),
        "image_shape": list(image_shape),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": epoch,
        "step": step,
        "rng_torch": torch.get_rng_state(),
        "rng_data": gen.get_state(),
        "history": history,
        "run_state": run_state,
        "mlflow_run_id": run_id,
    }


def model_from_checkpoint(state: dict, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint holds (eval mode) and its Config."""
    from study.flows import build_model

    cfg = unflatten(state["config"])
    channels, size, _ = state["image_shape"]
    model = build_model(cfg, in_channels=channels, image_size=size)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def train(spec: RunSpec, splits: ImageSplits | None = None, resume_run_id: str | None = None) -> RunResult:
    """Train one run as ``spec`` says (or continue ``resume_run_id``); returns its result.

    User errors (bad config, missing data, unusable device) raise ConfigError / DataError before
    any MLflow run or file is created.
    """
    from study import distributed

    cfg = spec.cfg
    d = distributed.from_env()
    device = resolve_device(spec.device)
    check_amp(cfg.stabilizers.amp, device)
    if d.enabled and resume_run_id is not None:
        raise ConfigError("--resume under torchrun: re-run the same command instead (the run identity resumes it)")
    if d.enabled and cfg.train.compile != "off":
        raise ConfigError("train.compile under torchrun is not supported: set train.compile=off")
    if d.enabled and cfg.train.batch_size % d.world:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} must be divisible by the {d.world} processes")
    if resume_run_id is None:
        splits = splits or load_splits(cfg.data)
    device = distributed.init(d, device)
    try:
        if not d.main:
            spec.echo = lambda _line: None  # one process speaks and logs
            result = _follow(spec, splits, d, device)
        else:
            result = _lead(spec, splits, resume_run_id, d, device)
    except BaseException:
        distributed.shutdown(d, clean=False)
        raise
    distributed.shutdown(d, clean=True)
    return result


def _lead(spec: RunSpec, splits: ImageSplits | None, resume_run_id: str | None, d, device: torch.device) -> RunResult:
    """Rank 0 (or the only process): find or create the MLflow run, then train it."""
    from study import distributed
    from study.tracking import find_run, setup

    cfg = spec.cfg
    uri, exp_id = setup(spec.tracking_uri, spec.experiment)
    import mlflow

    client = mlflow.MlflowClient()

    # --- which run: a new one, or the one with this identity, or the one named -----------------
    existing = None
    if resume_run_id is not None:
        try:
            existing = client.get_run(resume_run_id)
        except Exception:
            raise ConfigError(f"--resume {resume_run_id}: no such run in {uri}") from None
        found = checkpoint.load(Path(existing.data.tags.get("checkpoint_dir", "")))
        if found is None:
            raise ConfigError(f"--resume {resume_run_id}: its checkpoint directory has no readable checkpoint")
        cfg = unflatten(found[0]["config"])
        spec.cfg, spec.variant = cfg, existing.data.tags.get("variant", spec.variant)
        spec.preset = existing.data.tags.get("preset", spec.preset)
        splits = splits or load_splits(cfg.data)
        exp_id = existing.info.experiment_id
        check_amp(cfg.stabilizers.amp, device)
    key = run_key(spec.variant, cfg)
    if existing is None and not spec.fresh:
        existing = find_run(exp_id, key)
    if existing is not None and existing.info.status == "FINISHED" and "outcome" in existing.data.tags:
        m = existing.data.metrics
        spec.echo(f"run {existing.info.run_id} with this identity already finished ({existing.data.tags['outcome']})")
        distributed.broadcast({"done": True}, d)
        return RunResult(
            existing.info.run_id,
            existing.data.tags["outcome"],
            int(m.get("epoch", 0)),
            m.get("val_bpd", math.nan),
            m.get("test_bpd"),
            [],
            already_done=True,
        )

    model, opt, scaler, gen, run_state = _build(cfg, splits, device)

    # --- resume ---------------------------------------------------------------------------------
    found = None
    if existing is not None:
        run_id = existing.info.run_id
        ckpt_dir = Path(existing.data.tags["checkpoint_dir"])
        found = checkpoint.load(ckpt_dir, map_location=device)
        if found is not None and found[0].get("mlflow_run_id") != run_id:
            spec.echo(f"warning: checkpoint in {ckpt_dir} belongs to another run; starting from scratch")
            found = None
        client.update_run(run_id, status="RUNNING")
    else:
        run_id, ckpt_dir = _new_run(spec, exp_id, key, device)
    if found is None:  # epoch 0: the state a restore falls back to before any epoch finished
        checkpoint.save(ckpt_dir, _state(model, opt, scaler, gen, 0, 0, [], run_state, cfg, splits.shape, run_id))
    distributed.broadcast({"done": False, "run_id": run_id, "ckpt_dir": str(ckpt_dir)}, d)
    tracker = _Tracker(run_id)
    return _loop(spec, cfg, splits, d, device, model, opt, scaler, gen, run_state, run_id, ckpt_dir, found, tracker,
                 client)  # fmt: skip


def _build(cfg: Config, splits: ImageSplits, device: torch.device):
    """Model, optimizer, scaler, data generator and run state of a fresh run, fixed by the seed."""
    from study.flows import build_model

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    channels, size, _ = splits.shape
    model = build_model(cfg, in_channels=channels, image_size=size).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile != "off":  # compiles lazily, at the first step; state dicts are unaffected
        model.log_prob = compile_fn(model.log_prob, cfg.train.compile)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    run_state = {"amp": cfg.stabilizers.amp, "lr_factor": 1.0, "retries": 0, "events": []}
    scaler = torch.amp.GradScaler("cuda") if cfg.stabilizers.amp == "fp16" else None
    return model, opt, scaler, gen, run_state


def _follow(spec: RunSpec, splits: ImageSplits, d, device: torch.device) -> RunResult:
    """A rank other than 0 under torchrun: build the same model, learn from rank 0 which run and
    checkpoint it is, and train in lockstep without touching MLflow."""
    from study import distributed

    cfg = spec.cfg
    info = distributed.broadcast(None, d)
    if info["done"]:
        return RunResult("", "completed", 0, math.nan, None, [], already_done=True)
    model, opt, scaler, gen, run_state = _build(cfg, splits, device)
    ckpt_dir = Path(info["ckpt_dir"])
    found = checkpoint.load(ckpt_dir, map_location=device)
    if found is not None and found[0]["epoch"] == 0:
        found = None  # a fresh run: every rank starts from the same seed-determined initialisation
    return _loop(spec, cfg, splits, d, device, model, opt, scaler, gen, run_state, info["run_id"], ckpt_dir, found,
                 _NullTracker(), None)  # fmt: skip


def _loop(spec, cfg, splits, d, device, model, opt, scaler, gen, run_state, run_id, ckpt_dir, found, tracker,
          client) -> RunResult:  # fmt: skip
    """Resume from ``found`` if given, then the epoch loop and the end of the run."""
    from study import distributed

    data = {name: getattr(splits, name).to(device) for name in ("train", "val", "test")}
    stab = cfg.stabilizers
    history: list[dict[str, float]] = []
    start_epoch, step = 1, 0
    ddp = distributed.wrap(model, d, device) if d.enabled else None

    def restore(state: dict) -> None:
        nonlocal step, history, scaler
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        gen.set_state(state["rng_data"])
        step, history = state["step"], list(state["history"])

    if found is not None:
        state, path = found
        restore(state)
        run_state = state["run_state"]
        if run_state["amp"] == "off":
            scaler = None
        start_epoch = state["epoch"] + 1
        spec.echo(f"resuming run {run_id} after epoch {state['epoch']} from {path}")
        for entry in history:  # epochs checkpointed but not logged before the crash
            if int(entry["epoch"]) not in tracker.logged:
                tracker.metrics(entry, step=int(entry["epoch"]))

    # --- train ----------------------------------------------------------------------------------
    poison = _Poison()
    l2_params = model.l2_parameters() if stab.l2 > 0 else []
    max_norm = stab.grad_clip if stab.grad_clip > 0 else math.inf
    steps_per_epoch = max(1, len(data["train"]) // min(cfg.train.batch_size, len(data["train"])))
    show_bar = spec.progress if spec.progress is not None else sys.stderr.isatty()
    outcome, epoch = "completed", start_epoch
    status = "FINISHED"
    try:
        while epoch <= cfg.train.epochs:
            model.train()
            amp = run_state["amp"]
            t0 = time.perf_counter()
            reset_peak_memory(device)
            nll_sum, norms, clipped, skipped, diverged = 0.0, [], 0, 0, None
            batches = train_batches(data["train"], cfg.train.batch_size, gen, flip=cfg.data.flip)
            bar = None
            if show_bar:
                import click

                bar = click.progressbar(length=steps_per_epoch, label=f"epoch {epoch}", file=sys.stderr)
                bar.__enter__()
            n_images = 0
            for x in batches:
                x = shard(x, d)  # every rank drew the same global batch
                if cfg.train.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                lr = lr_at(step, cfg.train.lr, stab.warmup_steps, run_state["lr_factor"])
                for group in opt.param_groups:
                    group["lr"] = lr
                result = train_step(
                    model,
                    opt,
                    scaler,
                    x,
                    amp,
                    stab.l2,
                    l2_params,
                    max_norm,
                    loss_hook=lambda loss, s=step: poison(s, loss),
                    ddp=ddp,
                    d=d,
                )
                if not result.finite:
                    cause = "non-finite loss" if not math.isfinite(result.loss) else "non-finite gradient"
                    diverged = {"epoch": epoch, "step": step, "cause": cause, "amp": amp}
                    break
                skipped += int(result.skipped)
                nll_sum += result.nll * len(x) * d.world
                n_images += len(x) * d.world
                if math.isfinite(result.grad_norm):
                    norms.append(result.grad_norm)
                    clipped += int(result.grad_norm > max_norm)
                step += 1
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.__exit__(None, None, None)

            if diverged is not None:
                run_state["events"].append(diverged)
                action = "stop"
                if stab.nan_policy == "restore" and run_state["retries"] < stab.nan_retries:
                    action = "restore"
                diverged["action"] = action
                tracker.metrics({"nonfinite_event": 1.0}, step=epoch)
                spec.echo(
                    f"epoch {epoch}: {diverged['cause']} at step {diverged['step']} "
                    f"(amp {amp}); {'restoring the last good checkpoint' if action == 'restore' else 'stopping'}"
                )
                if action == "stop":
                    outcome = "diverged"
                    break
                run_state["retries"] += 1
                state = checkpoint.load(ckpt_dir, map_location=device)[0]
                restore(state)
                if stab.nan_amp_off:
                    run_state["amp"] = "off"
                    scaler = None
                run_state["lr_factor"] *= stab.nan_lr_factor
                # a different batch order, so a data-driven NaN is not replayed step for step
                gen.manual_seed(cfg.train.seed + 1000 * run_state["retries"])
                epoch = state["epoch"] + 1
                continue

            train_seconds = time.perf_counter() - t0
            val_bpd = evaluate(model, data["val"], cfg.train.eval_batch_size, amp, cfg.train.channels_last, d)
            epoch_seconds = time.perf_counter() - t0
            metrics = {
                "epoch": float(epoch),
                "train_bpd": bits_per_dim(-nll_sum / max(n_images, 1), model.num_dims),
                "val_bpd": val_bpd,
                "lr": lr_at(max(step - 1, 0), cfg.train.lr, stab.warmup_steps, run_state["lr_factor"]),
                "grad_norm_mean": sum(norms) / len(norms) if norms else math.nan,
                "grad_norm_max": max(norms) if norms else math.nan,
                "grad_norm_median": sorted(norms)[len(norms) // 2] if norms else math.nan,
                "clip_fraction": clipped / max(len(norms), 1),
                "nonfinite_events": float(sum(1 for e in run_state["events"] if e["epoch"] == epoch)),
                "skipped_steps": float(skipped),
                "images_per_s": n_images / train_seconds,
                "epoch_seconds": epoch_seconds,
                "peak_memory_mb": peak_memory_mb(device),
                "amp_on": float(amp != "off"),
            }
            if scaler is not None:
                metrics["grad_scale"] = scaler.get_scale()
            log_before = tracker.seconds
            history.append(metrics)
            t_ckpt = time.perf_counter()
            if d.main:
                state = _state(model, opt, scaler, gen, epoch, step, history, run_state, cfg, splits.shape, run_id)
                checkpoint.save(ckpt_dir, state)
            distributed.barrier(d)  # a restore on any rank must find this checkpoint
            ckpt_seconds = time.perf_counter() - t_ckpt
            _test_crash_after_checkpoint(epoch)
            if epoch not in tracker.logged:
                tracker.metrics(metrics, step=epoch)
                if d.main and (epoch % cfg.train.sample_every == 0 or epoch == cfg.train.epochs):
                    _log_samples(model, tracker, epoch)
                # MLflow calls only (not sampling, not checkpointing): the tracking overhead
                overhead = {"logging_seconds": tracker.seconds - log_before, "checkpoint_seconds": ckpt_seconds}
                tracker.metrics(overhead, step=epoch)
            spec.echo(
                f"epoch {epoch}/{cfg.train.epochs}  train {metrics['train_bpd']:.4f}  val {val_bpd:.4f} bits/dim  "
                f"{metrics['images_per_s']:.0f} img/s  {epoch_seconds:.1f} s"
            )
            if spec.on_epoch is not None:
                spec.on_epoch(epoch, val_bpd)
            epoch += 1

        # --- the end: test split, outcome, artifacts -------------------------------------------
        events = run_state["events"]
        test_bpd = None
        final_epoch = history[-1]["epoch"] if history else 0
        if outcome != "diverged":
            outcome = "recovered" if events else "completed"
        if outcome != "diverged" and spec.evaluate_test:
            test_bpd = evaluate(
                model, data["test"], cfg.train.eval_batch_size, run_state["amp"], cfg.train.channels_last, d
            )
            tracker.metrics({"test_bpd": test_bpd}, step=int(final_epoch))
        end_tags = {"outcome": outcome, "retries": run_state["retries"], "final_amp": run_state["amp"]}
        if events:
            end_tags["first_nonfinite_epoch"] = events[0]["epoch"]
            end_tags["divergence_causes"] = "; ".join(f"epoch {e['epoch']}: {e['cause']}" for e in events)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "divergence_events.json"
                path.write_text(json.dumps(events, indent=1))
                tracker.artifact(path, "events")
        tracker.tags(end_tags)
        if d.main:
            tracker.artifact(ckpt_dir / checkpoint.LAST, "checkpoint")
        val_last = history[-1]["val_bpd"] if history else math.nan
        summary = f"run {run_id}: {outcome}"
        if test_bpd is not None:
            summary += f", test {test_bpd:.4f} bits/dim"
        elif outcome != "diverged":
            summary += f", validation {val_last:.4f} bits/dim (test split not evaluated)"
        else:
            summary += f" at epoch {events[-1]['epoch']} ({events[-1]['cause']}); epochs before it are kept"
        spec.echo(summary)
        return RunResult(run_id, outcome, int(final_epoch), val_last, test_bpd, events)
    except RunPruned:
        status = "KILLED"
        tracker.tags({"outcome": "pruned"})
        spec.echo(f"run {run_id}: pruned after epoch {epoch}")
        val_last = history[-1]["val_bpd"] if history else math.nan
        return RunResult(run_id, "pruned", epoch, val_last, None, run_state["events"])
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if client is not None:
            client.set_terminated(run_id, status)


def _log_samples(model, tracker: _Tracker, epoch: int) -> None:
    from study.sampling import TEMPERATURES, sample_grid, save_grid

    with tempfile.TemporaryDirectory() as tmp:
        for t in TEMPERATURES:
            grid = sample_grid(model, 64, temperature=t)
            path = save_grid(grid, Path(tmp) / f"epoch_{epoch:03d}_t{t:.1f}.png")
            tracker.artifact(path, "samples")
