"""The training step and the evaluation pass, exactly as a run (and bench) executes them.

Where the training-time stabilizers act: gradient clipping, L2 and AMP are here; the others live in
the model (study/flows). One host sync per step, for the decision whether the step was finite.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from study.data import eval_batches
from study.distributed import SINGLE, Dist, all_sum, shard
from study.metrics import bits_per_dim


@dataclass
class Precision:
    """The precision a run trains in, held in one place: the AMP mode and, for fp16, its GradScaler.
    A divergence with ``nan_amp_off`` replaces it with :meth:`off`."""

    amp: str  # off | bf16 | fp16
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, amp: str, device: torch.device) -> Precision:
        return cls(amp, torch.amp.GradScaler(device.type) if amp == "fp16" else None)

    @classmethod
    def off(cls) -> Precision:
        return cls("off", None)


def compile_fn(fn, mode: str):
    """torch.compile ``fn`` (e.g. a model's log_prob) in one of TrainConfig.compile's modes."""
    return torch.compile(fn, mode=None if mode == "default" else mode)


def compile_training(model, mode: str) -> None:
    """Compile ``model.log_prob`` for training only; evaluation stays eager.

    Two measured reasons (2026-12-06, tests/test_fast_paths.py holds both):
    - dynamo keeps at most ``recompile_limit`` (8) graphs per function per process, and every new model
      is a new graph (weight norm's parametrisation makes a new class per layer). A study worker trains
      cell after cell in one process, so from its ninth cell on torch.compile silently ran eager. The
      cache is emptied here, once per run; inductor's on-disk cache keeps the kernels, so a warm
      recompile costs seconds, not the cold minute.
    - evaluation in eval mode is another graph, recompiled again for a smaller last batch: 4-20 s a
      cell for a pass that is 2-4% of it eager.
    """
    import torch._dynamo

    torch._dynamo.reset()
    eager, compiled = model.log_prob, compile_fn(model.log_prob, mode)
    model.log_prob = lambda x: compiled(x) if model.training else eager(x)


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
def evaluate(model, images: torch.Tensor, batch_size: int, channels_last: bool = False, d: Dist = SINGLE) -> float:
    """Bits/dim over every image of a split in eval mode and fp32, whatever precision the model trains
    in: the mean of per-image values, so batches of different sizes are weighted by their size.
    Restores the model's previous mode. Under torchrun each rank takes its share of every batch (same
    noise as one process) and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=images.device)  # sum of bits/dim, count
    for x in eval_batches(images, batch_size):
        x = shard(x, d)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        total[0] += bits_per_dim(model.log_prob(x).double(), model.num_dims).sum()
        total[1] += len(x)
    model.train(was_training)
    total = all_sum(total, d)
    return (total[0] / total[1]).item()


@torch.no_grad()
def per_image_bpd(model, images: torch.Tensor, batch_size: int, train_mode: bool = False) -> torch.Tensor:
    """(N,) float64 bits/dim of every image in fp32, with evaluate's fixed dequantization noise; in
    ``train_mode`` each batch is normalised by its own statistics (the model is not changed: batch-norm
    running averages are put back). Restores the model's previous mode."""
    import copy

    was_training = model.training
    running = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k})
    model.train(train_mode)
    values = [bits_per_dim(model.log_prob(x).double(), model.num_dims) for x in eval_batches(images, batch_size)]
    model.load_state_dict(running, strict=False)
    model.train(was_training)
    return torch.cat(values)


@dataclass
class StepResult:
    loss: float  # the optimised loss: NLL in nats per image plus the L2 term
    nll: float  # NLL in nats per image
    grad_norm: float  # global gradient norm before clipping
    finite: bool  # False: nothing was applied, the caller decides what a divergence means
    skipped: bool  # fp16 GradScaler skipped the step for inf/NaN gradients
    clipped: bool = False  # the clip threshold acted on this step


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
    clipped = math.isfinite(norm_v) and norm_v > max_norm
    finite = math.isfinite(loss_v) and math.isfinite(norm_v)
    if scaler is not None:
        # GradScaler's own rule: a step whose loss or gradients are not finite is skipped (nothing is
        # applied) and the scale halves; that is fp16 overflow, not a divergence, while the scale can
        # still be the cause. At a scale of 1 or less the scaled values are no larger than the
        # unscaled ones, so a non-finite step there is the model's, and the caller's to decide.
        before = scaler.get_scale()
        if not finite and before <= 1.0:
            return StepResult(loss_v, nll_v, norm_v, False, False)
        scaler.step(opt)
        scaler.update()
        return StepResult(loss_v, nll_v, norm_v, True, scaler.get_scale() < before, clipped)
    if not finite:
        return StepResult(loss_v, nll_v, norm_v, False, False)
    opt.step()
    return StepResult(loss_v, nll_v, norm_v, True, False, clipped)
