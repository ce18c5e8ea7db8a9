"""The NaN policy: what a run does when a step's loss or gradient is not finite.

``stop`` ends the run with outcome ``diverged`` (earlier epochs are kept). ``restore`` reloads the
last good checkpoint, optionally with AMP off and a lower learning rate (the seed report's advice),
and a new batch order, at most ``nan_retries`` times; the run then ends ``recovered``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from study.config import Stabilizers
from study.run import checkpoint
from study.run.state import RunState, restore
from study.run.step import Precision


def event(epoch: int, step: int, loss: float, amp: str, cause: str | None = None, updates: int | None = None
          ) -> dict[str, Any]:  # fmt: skip
    """One divergence, as recorded in the run's events; by default a training step's (its loss, else
    its gradient was not finite). ``updates``: optimizer updates applied before it (global steps less
    GradScaler's skipped ones; 0 means the model never left its initialisation)."""
    cause = cause or ("non-finite loss" if not math.isfinite(loss) else "non-finite gradient")
    out = {"epoch": epoch, "step": step, "cause": cause, "amp": amp}
    if updates is not None:
        out["updates"] = updates
    return out


def eval_cause(model, images: torch.Tensor, batch_size: int, split: str) -> str:
    """Why an evaluation (eval mode, fp32) came out non-finite although training was finite: the same
    images scored with each batch's own statistics tell whether batch norm's running averages are
    what breaks (the model is left as it was)."""
    from study.run.step import per_image_bpd

    with_batch_stats = per_image_bpd(model, images, batch_size, train_mode=True)
    if bool(torch.isfinite(with_batch_stats).all()):
        return f"non-finite {split} (eval mode); finite with batch statistics: batch-norm running statistics"
    return f"non-finite {split} (eval mode and with batch statistics)"


def decide(stab: Stabilizers, retries: int) -> str:
    """``stop`` or ``restore``: restore while the policy allows and retries are left."""
    return "restore" if stab.nan_policy == "restore" and retries < stab.nan_retries else "stop"


def restore_last_good(st: RunState, stab: Stabilizers, seed: int, ckpt_dir: Path, device: torch.device) -> None:
    """Reload the newest checkpoint into ``st`` and apply the policy's changes for the next attempt."""
    st.retries += 1
    restore(st, checkpoint.load(ckpt_dir, map_location=device)[0], device, bookkeeping=False)
    if stab.nan_amp_off:
        st.precision = Precision.off()
    st.lr_factor *= stab.nan_lr_factor
    # a different batch order, so a data-driven NaN is not replayed step for step
    st.gen.manual_seed(seed + 1000 * st.retries)
