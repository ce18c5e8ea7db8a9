"""The epoch loop of one run, read top to bottom (nanoGPT style): for each epoch train, handle a
divergence, evaluate, checkpoint, log; then the end of the run.

Order inside an epoch: checkpoint first (it holds every epoch's metrics), then log to MLflow. A
crash between the two is repaired on resume by logging the epochs that MLflow is missing from the
checkpoint's history, so every epoch is logged exactly once.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from study import distributed, schema, signals
from study.config import Config
from study.data import train_batches
from study.distributed import Dist, shard
from study.flows.activity import read_and_reset
from study.memory import peak_memory_mb, reset_peak_memory
from study.metrics import bits_per_dim
from study.run import checkpoint, divergence
from study.run.outcome import classify
from study.run.ownership import LostOwnership
from study.run.progress import clock, epoch_bar, remaining
from study.run.spec import RunPruned, RunResult, RunSpec
from study.run.state import RunState, to_checkpoint
from study.run.step import evaluate, lr_at, train_step
from study.storage import StorageFault, best_effort
from study.store import RunLogger


@dataclass
class Run:
    """What stays fixed while a run trains: its spec and config, where it runs, its data and records."""

    spec: RunSpec
    cfg: Config
    device: torch.device
    d: Dist
    data: dict[str, torch.Tensor]  # train, val, test uint8 images on the device
    image_shape: tuple[int, int, int]
    run_id: str
    ckpt_dir: Path
    log: RunLogger
    ddp: torch.nn.Module | None = None  # the DistributedDataParallel wrapper under torchrun
    l2_params: list = field(default_factory=list)
    # raises ownership.LostOwnership once another process has taken the run over (the leader's
    # Heartbeat.check); called before each checkpoint, each epoch's metrics and the run's end
    check_owner: Callable[[], None] = field(default=lambda: None)

    @property
    def max_norm(self) -> float:
        return self.cfg.stabilizers.grad_clip if self.cfg.stabilizers.grad_clip > 0 else math.inf


@dataclass
class EpochTotals:
    """What one epoch of steps adds up to, for its metrics."""

    nll_sum: float = 0.0
    l2_sum: float = 0.0  # the L2 term, nats per image, summed over steps
    steps: int = 0
    images: int = 0
    norms: list[float] = field(default_factory=list)
    clipped: int = 0
    skipped: int = 0
    seconds: float = 0.0


def train_epoch(run: Run, st: RunState, epoch: int) -> tuple[EpochTotals, dict | None]:
    """One pass over the training data; stops at the first non-finite step and returns its event."""
    cfg, acc = run.cfg, EpochTotals()
    st.model.train()
    read_and_reset(st.model)  # the activity counters cover this epoch's steps only
    t0 = time.perf_counter()
    steps = max(1, len(run.data["train"]) // min(cfg.train.batch_size, len(run.data["train"])))
    with epoch_bar(run.spec.progress, steps, f"epoch {epoch}") as bar:
        for x in train_batches(run.data["train"], cfg.train.batch_size, st.gen, flip=cfg.data.flip):
            x = shard(x, run.d)  # every rank drew the same global batch
            if cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for group in st.opt.param_groups:
                group["lr"] = lr_at(st.step, cfg.train.lr, cfg.stabilizers.warmup_steps, st.lr_factor)
            hook = lambda loss, s=st.step: run.spec.hooks.loss(s, loss)  # noqa: E731
            result = train_step(st.model, st.opt, st.precision.scaler, x, st.precision.amp, cfg.stabilizers.l2,
                                run.l2_params, run.max_norm, loss_hook=hook, ddp=run.ddp, d=run.d)  # fmt: skip
            if not result.finite:
                updates = st.step - acc.skipped - sum(int(h.get(schema.SKIPPED_STEPS, 0)) for h in st.history)
                return acc, divergence.event(epoch, st.step, result.loss, st.precision.amp, updates=updates)
            acc.skipped += int(result.skipped)
            if not math.isfinite(result.loss):  # fp16: GradScaler skipped an overflowing step, nothing to add
                st.step += 1
                bar.update(1)
                continue
            acc.steps += 1
            acc.l2_sum += result.loss - result.nll
            acc.nll_sum += result.nll * len(x) * run.d.world
            acc.images += len(x) * run.d.world
            if math.isfinite(result.grad_norm):
                acc.norms.append(result.grad_norm)
                acc.clipped += int(result.clipped)
            st.step += 1
            bar.update(1)
    acc.seconds = time.perf_counter() - t0
    return acc, None


def epoch_metrics(run: Run, st: RunState, acc: EpochTotals, epoch: int, t0: float) -> dict[str, float]:
    """Evaluate the validation split (fp32, eval mode) and put the epoch's numbers together: losses,
    speed, and how much each stabilizer acted (schema names)."""
    cfg, norms, num_dims = run.cfg, acc.norms, st.model.num_dims
    activity = {schema.FLOW_ACTIVITY[k]: v for k, v in read_and_reset(st.model).items()}
    val_bpd = evaluate(st.model, run.data["val"], cfg.train.eval_batch_size, cfg.train.channels_last, run.d)
    ratios = sorted(n / run.max_norm for n in norms)
    metrics = {
        schema.TRAIN_BPD: bits_per_dim(-acc.nll_sum / max(acc.images, 1), num_dims),
        schema.VAL_BPD: val_bpd,
        schema.LR: lr_at(max(st.step - 1, 0), cfg.train.lr, cfg.stabilizers.warmup_steps, st.lr_factor),
        schema.GRAD_NORM_MEAN: sum(norms) / len(norms) if norms else math.nan,
        schema.GRAD_NORM_MAX: max(norms) if norms else math.nan,
        schema.GRAD_NORM_MEDIAN: sorted(norms)[len(norms) // 2] if norms else math.nan,
        schema.CLIP_FRACTION: acc.clipped / max(len(norms), 1),
        schema.CLIP_RATIO_MEDIAN: ratios[len(ratios) // 2] if ratios and math.isfinite(run.max_norm) else 0.0,
        schema.L2_PENALTY: acc.l2_sum / max(acc.steps, 1),
        **activity,
        schema.NONFINITE_EVENTS: float(sum(1 for e in st.events if e["epoch"] == epoch)),
        schema.SKIPPED_STEPS: float(acc.skipped),
        schema.IMAGES_PER_S: acc.images / acc.seconds,
        schema.EPOCH_SECONDS: time.perf_counter() - t0,
        schema.PEAK_MEMORY_MB: peak_memory_mb(run.device),
        schema.AMP_ON: float(st.precision.amp != "off"),
    }
    if st.precision.scaler is not None:
        metrics[schema.GRAD_SCALE] = st.precision.scaler.get_scale()
    return metrics


def on_divergence(run: Run, st: RunState, event: dict) -> bool:
    """Record a divergence and apply the NaN policy; True when the run must stop."""
    stab = run.cfg.stabilizers
    st.events.append(event)
    event["action"] = divergence.decide(stab, st.retries)
    run.log.metrics({schema.NONFINITE_EVENTS: float(sum(e["epoch"] == event["epoch"] for e in st.events))},
                    step=event["epoch"])  # fmt: skip
    doing = "restoring the last good checkpoint" if event["action"] == "restore" else "stopping"
    run.spec.echo(f"epoch {event['epoch']}: {event['cause']} at step {event['step']} (amp {event['amp']}); {doing}")
    if event["action"] == "stop":
        return True
    divergence.restore_last_good(st, stab, run.cfg.train.seed, run.ckpt_dir, run.device)
    return False


def record_epoch(run: Run, st: RunState, metrics: dict[str, float], epoch: int) -> None:
    """Checkpoint the epoch (every rank waits for it), then log it to MLflow once, with its samples."""
    metrics = {schema.EPOCH: float(epoch), **metrics}  # kept in the checkpoint's history, not logged
    st.history.append(metrics)
    st.epoch = epoch
    t_ckpt = time.perf_counter()
    run.check_owner()
    if run.d.main:
        checkpoint.save(run.ckpt_dir, to_checkpoint(st, run.cfg, run.image_shape, run.run_id))
    distributed.barrier(run.d)  # a restore on any rank must find this checkpoint
    ckpt_seconds = time.perf_counter() - t_ckpt
    run.spec.hooks.after_checkpoint(epoch)
    if epoch in run.log.logged:
        return
    log_before = run.log.seconds
    run.check_owner()
    run.log.metrics({k: v for k, v in metrics.items() if k != schema.EPOCH}, step=epoch)
    if run.d.main and (epoch % run.cfg.train.sample_every == 0 or epoch == run.cfg.train.epochs):
        log_samples(st.model, run.log, epoch)
    # MLflow calls only (not sampling, not checkpointing): the tracking overhead
    overhead = {schema.LOGGING_SECONDS: run.log.seconds - log_before, schema.CHECKPOINT_SECONDS: ckpt_seconds}
    run.log.metrics(overhead, step=epoch)


def run_epochs(run: Run, st: RunState) -> str:
    """Train from the epoch after ``st.epoch`` to the configured last one; returns the outcome."""
    cfg, epoch, took = run.cfg, st.epoch + 1, []
    while epoch <= cfg.train.epochs:
        t0 = time.perf_counter()
        reset_peak_memory(run.device)
        acc, event = train_epoch(run, st, epoch)
        if event is not None:
            if on_divergence(run, st, event):
                return "diverged"
            epoch = st.epoch + 1  # the restored checkpoint's next epoch
            continue
        metrics = epoch_metrics(run, st, acc, epoch, t0)
        if not math.isfinite(metrics[schema.VAL_BPD]):  # a model that scores inf or NaN has diverged
            cause = divergence.eval_cause(st.model, run.data["val"], cfg.train.eval_batch_size, "validation")
            event = divergence.event(epoch, st.step, metrics[schema.VAL_BPD], st.precision.amp, cause)
            if on_divergence(run, st, event):
                return "diverged"
            epoch = st.epoch + 1
            continue
        record_epoch(run, st, metrics, epoch)
        took.append(time.perf_counter() - t0)
        eta = remaining(took, cfg.train.epochs - epoch)
        run.spec.echo(
            f"epoch {epoch}/{cfg.train.epochs}  train {metrics[schema.TRAIN_BPD]:.4f}  "
            f"val {metrics[schema.VAL_BPD]:.4f} bits/dim  {metrics[schema.IMAGES_PER_S]:.0f} img/s  "
            f"{metrics[schema.EPOCH_SECONDS]:.1f} s" + (f"  ETA {clock(eta)}" if epoch < cfg.train.epochs else "")
        )
        if run.spec.on_epoch is not None:
            run.spec.on_epoch(epoch, metrics[schema.VAL_BPD])
        epoch += 1
    return "recovered" if st.events else "completed"


def finish(run: Run, st: RunState, outcome: str) -> RunResult:
    """The end of a run: the test split, the outcome and divergence tags, the final artifacts."""
    cfg, events = run.cfg, st.events
    final_epoch = int(st.history[-1][schema.EPOCH]) if st.history else 0
    test_bpd = None
    if outcome != "diverged" and run.spec.evaluate_test:
        test_bpd = evaluate(st.model, run.data["test"], cfg.train.eval_batch_size, cfg.train.channels_last, run.d)
        run.check_owner()
        if math.isfinite(test_bpd):
            run.log.metrics({schema.TEST_BPD: test_bpd}, step=final_epoch)
        else:  # no policy can repair the final model: the run diverged at its test
            cause = divergence.eval_cause(st.model, run.data["test"], cfg.train.eval_batch_size, "test")
            events.append({**divergence.event(final_epoch, st.step, test_bpd, st.precision.amp, cause),
                           "action": "stop"})  # fmt: skip
            outcome, test_bpd = "diverged", None
    final_bpd = test_bpd if test_bpd is not None else (st.history[-1][schema.VAL_BPD] if st.history else None)
    end_tags = {schema.OUTCOME: outcome, schema.RETRIES: st.retries, schema.FINAL_AMP: st.precision.amp,
                schema.RESULT: classify(outcome, events, final_bpd)}
    if events:
        end_tags[schema.FIRST_NONFINITE_EPOCH] = events[0]["epoch"]
        end_tags[schema.DIVERGENCE_CAUSES] = "; ".join(f"epoch {e['epoch']}: {e['cause']}" for e in events)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / schema.DIVERGENCE_EVENTS_FILE
            path.write_text(json.dumps(events, indent=1))
            run.log.artifact(path, schema.EVENTS_DIR)
    run.check_owner()
    run.log.tags(end_tags)
    if run.d.main:
        run.log.artifact(run.ckpt_dir / checkpoint.LAST, schema.CHECKPOINT_ARTIFACT_DIR)
    val_last = st.history[-1][schema.VAL_BPD] if st.history else math.nan
    summary = f"run {run.run_id}: {outcome}"
    if test_bpd is not None:
        summary += f", test {test_bpd:.4f} bits/dim"
    elif outcome != "diverged":
        summary += f", validation {val_last:.4f} bits/dim (test split not evaluated)"
    else:
        summary += f" at epoch {events[-1]['epoch']} ({events[-1]['cause']}); epochs before it are kept"
    run.spec.echo(summary)
    return RunResult(run.run_id, outcome, final_epoch, val_last, test_bpd, events)


def pruned(run: Run, st: RunState, epoch: int) -> RunResult:
    run.log.tags({schema.OUTCOME: "pruned"})
    run.spec.echo(f"run {run.run_id}: pruned after epoch {epoch}")
    val_last = st.history[-1][schema.VAL_BPD] if st.history else math.nan
    return RunResult(run.run_id, "pruned", epoch, val_last, None, st.events)


def train_to_the_end(run: Run, st: RunState) -> RunResult:
    """The epochs and the end of the run, with its MLflow status set whatever happens: FINISHED, or
    FAILED for a run that diverged (its outcome tag says so), KILLED when interrupted or pruned."""
    status = "FINISHED"
    try:
        result = finish(run, st, run_epochs(run, st))
        status = "FAILED" if result.outcome == "diverged" else "FINISHED"
        return result
    except RunPruned:
        status = "KILLED"
        return pruned(run, st, st.epoch)
    except LostOwnership:  # the run is another process's now: its status is not ours to set
        status = None
        raise
    except StorageFault as e:  # the last checkpoint is whole: the same command resumes from it
        status = None
        if not e.locked:  # a full disk may still take two small records; a locked store takes none
            with best_effort():
                run.log.tags({schema.OUTCOME: "interrupted", schema.INTERRUPTED_BY: "disk-full"})
                run.log.terminate("KILLED")
        raise  # else the run stays RUNNING, its owner gone when this process exits: it is taken over
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: the last checkpoint stays, the run can resume
        status = "KILLED"
        run.log.tags({schema.OUTCOME: "interrupted", schema.INTERRUPTED_BY: signals.name(e)})
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if status is not None:
            run.log.terminate(status)


def log_samples(model, log: RunLogger, epoch: int) -> None:
    from study.sampling import TEMPERATURES, sample_grid, save_grid

    with tempfile.TemporaryDirectory() as tmp:
        for t in TEMPERATURES:
            grid = sample_grid(model, 64, temperature=t)
            log.artifact(save_grid(grid, Path(tmp) / schema.sample_file(epoch, t)), schema.SAMPLES_DIR)
