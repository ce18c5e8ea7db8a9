"""How much each bound in the flow acted: counters the modules fill in training mode, read and reset
by whoever trains (once per epoch: one host sync). A switch that is off never counts, so its activity
reads 0; one that is on but never binds also reads 0, which is what a reader must be told.

Counters are non-persistent buffers named ``_act_<kind>`` holding (hits, total): checkpoints and
state dicts do not see them.
"""

from __future__ import annotations

import torch
from torch import nn

PREFIX = "_act_"
KINDS = ("input_clamp", "s_clamp", "scale_bound", "bn_mean_gap", "bn_logvar_gap", "logit_form_gap")


def add_counter(module: nn.Module, kind: str) -> None:
    module.register_buffer(PREFIX + kind, torch.zeros(2, dtype=torch.float64), persistent=False)


@torch.no_grad()
def count(module: nn.Module, kind: str, hits: torch.Tensor, total: torch.Tensor | float) -> None:
    """Add ``hits`` out of ``total`` to a counter (no host sync: both stay on the device)."""
    counter = getattr(module, PREFIX + kind)
    counter[0] += hits.to(counter.dtype)
    counter[1] += total if isinstance(total, float) else total.to(counter.dtype)


@torch.no_grad()
def read_and_reset(model: nn.Module) -> dict[str, float]:
    """Every kind's hits / total since the last call (0.0 where nothing counted), then zero them."""
    sums = {kind: torch.zeros(2, dtype=torch.float64) for kind in KINDS}
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if name.startswith(PREFIX):
                sums[name[len(PREFIX) :]] += buf.detach().cpu()
                buf.zero_()
    return {kind: (float(s[0] / s[1]) if s[1] > 0 else 0.0) for kind, s in sums.items()}
