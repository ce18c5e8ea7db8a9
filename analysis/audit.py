"""The accounting audit: one trained model evaluated under each plausible bits/dim accounting.

Each variant is a way public Real NVP code has computed (or could compute) bits/dim wrongly
(../shared/design/REFERENCE.md, "Accounting variants"). The table of shifts shows how a figure like
3.47 can arise from a model whose correct figure is different.
"""

from __future__ import annotations

import copy
import math

import pandas as pd
import torch

from study.data import dequantize, eval_batches
from study.flows.coupling import CheckerboardCoupling
from study.metrics import bits_per_dim


def _mean_bpd(model, images: torch.Tensor, batch: int, seed: int = 0) -> float:
    """The correct accounting: eval mode, every image once, per-image mean (= study.run.step.evaluate)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x in eval_batches(images, batch, seed):
            total += bits_per_dim(model.log_prob(x).double(), model.num_dims).sum().item()
            n += len(x)
    return total / n


def _masked_logdet_extra(model, x: torch.Tensor) -> torch.Tensor:
    """(N,) the log-det a checkerboard coupling would add if it also summed s over the half it
    leaves unchanged (its conditioning positions)."""
    extra = torch.zeros(len(x), dtype=torch.float64)
    hooks = []

    def hook(module: CheckerboardCoupling, inputs, _output):
        (inp,) = inputs
        b = module.mask.to(inp.dtype)
        s_full, _ = module._split_params(inp * b, inp.dtype)  # s before the mask is applied
        extra.add_((s_full * b).flatten(1).sum(1).double())

    for m in model.modules():
        if isinstance(m, CheckerboardCoupling):
            hooks.append(m.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return extra


def audit(model, val: torch.Tensor, train: torch.Tensor, batch: int = 64) -> pd.DataFrame:
    """Evaluate ``model`` (eval mode on entry and exit) under each accounting variant.

    val, train: uint8 (N, C, H, W) images. Returns one row per variant: bits/dim, shift against the
    correct accounting, and what the variant does.
    """
    model.eval()
    d = model.num_dims
    correct = _mean_bpd(model, val, batch)
    rows = [("correct", correct, "eval mode, validation split, per-image mean, dequantized, full log-det")]

    with torch.no_grad():
        total, n = 0.0, 0
        for x in eval_batches(val, batch):
            lp = model.log_prob(x).double() + _masked_logdet_extra(model, x)
            total += bits_per_dim(lp, d).sum().item()
            n += len(x)
    rows.append(("log-det over masked half", total / n, "checkerboard couplings also sum s where the mask keeps x"))

    alpha = model.preprocess.alpha
    # transform with 1 - 2 alpha, log-det with 1 - alpha: every dimension gains log((1-a)/(1-2a))
    mismatch = math.log((1 - alpha) / (1 - 2 * alpha)) / math.log(2)
    rows.append(
        ("logit alpha mismatch", correct - mismatch, "logit of a + (1-2a)x, log-det with (1-a) (the paper's misprint)")
    )

    train_mode = copy.deepcopy(model).train()  # batch statistics; the copy keeps running stats intact
    with torch.no_grad():
        total, n = 0.0, 0
        for x in eval_batches(val, batch):
            total += bits_per_dim(train_mode.log_prob(x).double(), d).sum().item()
            n += len(x)
    rows.append(("train-mode batch norm", total / n, "batch statistics instead of running averages at evaluation"))

    rows.append(
        (
            "training images",
            _mean_bpd(model, train[: len(val)], batch),
            "evaluated on training images, not the validation split",
        )
    )

    with torch.no_grad():
        total, n = 0.0, 0
        for start in range(0, len(val), batch):
            x = val[start : start + batch].double().div(256).float()  # pixel / 256: no noise
            total += bits_per_dim(model.log_prob(x).double(), d).sum().item()
            n += len(x)
    rows.append(("no dequantization noise", total / n, "density at pixel/256 instead of pixel + U[0,1)"))
    rows.append(("no -D log 256 term", correct - 8.0, "the discretisation term left out: -log p(x) / (D ln 2)"))

    # unweighted batch means: a last batch far smaller than the rest weighs as much as a full one
    small = max(1, len(val) // 10)
    sizes = [len(val) - small, small]
    gen = torch.Generator().manual_seed(0)
    means, start = [], 0
    with torch.no_grad():
        for size in sizes:
            x = dequantize(val[start : start + size], gen)
            means.append(bits_per_dim(model.log_prob(x).double(), d).mean().item())
            start += size
    rows.append(("unweighted batch means", sum(means) / len(means), f"mean of batch means over batches of {sizes}"))

    table = pd.DataFrame(rows, columns=["accounting", "bits/dim", "what it does"])
    table.insert(2, "shift", table["bits/dim"] - correct)
    return table
