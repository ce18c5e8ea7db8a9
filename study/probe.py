"""The initialisation probe: one forward pass of a freshly initialised model on a real training batch,
exactly as a run's first step sees it (same seeding, train mode, fp32), without any update.

Why: a run that is non-finite at global step 0 says something about initialisation, not about
training stability. This measures that directly and cheaply, at any size (the paper's included) on a
CPU: it costs one forward pass per (configuration, seed).
"""

from __future__ import annotations

import math

import torch

from study.config import Config
from study.data import train_batches
from study.model import build_model


@torch.no_grad()
def probe_init(cfg: Config, images: torch.Tensor) -> dict[str, float]:
    """For ``cfg`` (its size, switches and train.seed) and ``images`` (N, C, H, W) uint8 training
    images: the first batch a run of this seed would draw, scored by the model a run of this seed
    would start from. Returns nonfinite_fraction (images of the batch whose log-density is NaN or
    infinite), batch_nonfinite (1.0 when the batch loss, their mean, is non-finite: the run's step 0
    would be a divergence in fp32), max_abs_s (largest |s| over every coupling's used positions; inf
    or NaN when it overflowed), and batch (images scored)."""
    torch.manual_seed(cfg.train.seed)  # as study.run.state.new_state: the same initial weights
    model = build_model(cfg, in_channels=images.shape[1], image_size=images.shape[2])
    model.train()  # the first training step's mode: batch norm normalises with this batch's statistics
    gen = torch.Generator().manual_seed(cfg.train.seed)
    x = next(train_batches(images, cfg.train.batch_size, gen, flip=cfg.data.flip))
    seen: list[float] = []

    def record(module, inputs, s):
        where = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
        seen.append(float((s if where is None else s * where).abs().max()))

    from study.flows.coupling import ScaleFunction

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, ScaleFunction)]
    try:
        lp = model.log_prob(x)
    finally:
        for h in hooks:
            h.remove()
    bad = ~torch.isfinite(lp)
    return {"nonfinite_fraction": float(bad.double().mean()), "batch_nonfinite": float(not torch.isfinite(lp.mean())),
            "max_abs_s": _largest(seen), "batch": len(x)}  # fmt: skip


def _largest(values: list[float]) -> float:
    """The maximum of ``values``; inf when any overflowed, NaN when any is NaN and none is inf."""
    if any(math.isinf(v) for v in values):
        return math.inf
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=0.0)
