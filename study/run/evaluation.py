"""Evaluate a recorded run's checkpoint again: on any data source and split, in eval mode (running
batch-norm statistics) or train mode (each batch's own), optionally after re-estimating the running
statistics from training batches. What `run_study.py evaluate` and the report's diagnoses use.

Bits/dim is the mean over images of each image's bits/dim in fp32 (study.run.step.per_image_bpd,
the same noise as the run's own evaluation), with its standard error over images.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from study.flows.transforms import BatchNormBijector
from study.run.step import per_image_bpd

SPLITS = ("val", "test", "train")
MODES = ("eval", "train")


@dataclass
class Evaluation:
    run_id: str
    split: str
    mode: str
    data: str  # "own" (the run's data) or the --data spec it was evaluated on
    recalibrate: int  # training batches the batch-norm statistics were re-estimated from (0: not)
    bpd: float
    se: float  # standard error over images
    n: int

    @property
    def metric(self) -> str:
        """The MLflow metric name: what data, which split, which mode, e.g. ``evaluate.own.test.eval``."""
        data = "own" if self.data == "own" else re.sub(r"[^A-Za-z0-9_-]+", "-", self.data).strip("-")
        mode = self.mode + (f"-recal{self.recalibrate}" if self.recalibrate else "")
        return f"evaluate.{data}.{self.split}.{mode}"


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, limit: int) -> int:
    """Re-estimate every batch-norm running statistic (the s/t networks' BatchNorm2d and the batch-norm
    bijector) as the plain average over ``limit`` training batches, in train mode; returns the batches
    used. The model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches below
    seen: dict[BatchNormBijector, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def record(module, inputs):
        (x,) = inputs
        seen.setdefault(module, []).append((x.mean(dim=(0, 2, 3), keepdim=True),
                                            x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)))  # fmt: skip

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, BatchNormBijector)]
    used = 0
    try:
        model.train()
        for x in batches:
            if used >= limit:
                break
            model.log_prob(x)
            used += 1
    finally:
        for h in hooks:
            h.remove()
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
    for module, stats in seen.items():
        module.running_mean.copy_(torch.stack([m for m, _ in stats]).mean(0))
        module.running_var.copy_(torch.stack([v for _, v in stats]).mean(0))
    model.eval()
    return used


def evaluate_model(model, cfg, splits, split: str = "test", mode: str = "eval", recalibrate: int = 0,
                   batch: int | None = None, seed: int = 0) -> tuple[float, float, int, int]:  # fmt: skip
    """(bits/dim, standard error, images, batches recalibrated) of ``model`` on a split."""
    from study.data import train_batches

    if split not in SPLITS or mode not in MODES or recalibrate < 0:
        raise ValueError(f"split must be one of {SPLITS}, mode one of {MODES}, and recalibration >= 0")
    images = getattr(splits, split)
    if len(images) == 0:
        raise ValueError(f"the {split} split of this data is empty: choose another split or data source")
    used = 0
    if recalibrate:
        gen = torch.Generator().manual_seed(seed)
        used = recalibrate_batchnorm(model, train_batches(splits.train, cfg.train.batch_size, gen), recalibrate)
    values = per_image_bpd(model, images, batch or cfg.train.eval_batch_size, train_mode=mode == "train")
    n = len(values)
    se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return float(values.mean()), se, n, used


def evaluate_run(store, run_id: str, data: str | None = None, split: str = "test", mode: str = "eval",
                 recalibrate: int = 0, batch: int | None = None, log: bool = True) -> Evaluation:  # fmt: skip
    """Evaluate a run's last checkpoint; with ``log`` record the result on that run (at its last epoch)
    under :attr:`Evaluation.metric` and ``.se``. Raises ValueError with a one-line reason."""
    import dataclasses

    from study.data import load_splits, parse_data_spec
    from study.run.state import checkpoint_of_run, model_from_checkpoint

    state = checkpoint_of_run(store, run_id)
    model, cfg = model_from_checkpoint(state)
    data_cfg = cfg.data
    if data:
        spec = parse_data_spec(data)
        data_cfg = dataclasses.replace(cfg.data, source=spec["data.source"], path=spec["data.path"])
    splits = load_splits(data_cfg)
    bpd, se, n, used = evaluate_model(model, cfg, splits, split, mode, recalibrate, batch)
    result = Evaluation(run_id, split, mode, data or "own", used, bpd, se, n)
    if log:
        store.log_metrics(run_id, {result.metric: bpd, result.metric + ".se": se}, int(state["epoch"]), timestamp_ms=0)
    return result
