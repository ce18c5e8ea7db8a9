"""Affine coupling layers (paper eq. 2 and section 3.4) with a swappable scale function.

y_b = x_b;  y_(1-b) = x_(1-b) * exp(s(x_b)) + t(x_b);  log-det = sum of s over the updated half.
The scale function is where the stabilizers differ (``FlowOptions.scale_fn`` and ``s_clamp``).
s and t are computed in float32 even under autocast, so log-dets and the loss stay in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from study.flows.activity import add_counter, count
from study.flows.options import FlowOptions
from study.flows.resnet import STNet
from study.flows.transforms import checkerboard


class ScaleFunction(nn.Module):
    """Network output h -> log-scale s; see study.config.Stabilizers for each kind's source.

    Each kind maps h = 0 to s = 0 (up to float rounding for softplus), so a zero-initialised
    network gives an identity coupling whatever the kind.
    """

    def __init__(self, channels: int, stab: FlowOptions):
        super().__init__()
        self.kind = stab.scale_fn
        self.clamp = stab.s_clamp
        self.clamp_kind = stab.s_clamp_kind
        self.eps = stab.softplus_eps
        if self.kind == "tanh":
            # learned per-channel rescale w of s = w * tanh(h) (official code's "rescale")
            self.rescale = nn.Parameter(torch.ones(1, channels, 1, 1))
        elif self.kind == "softplus":
            # softplus(0 + offset) + eps = 1, i.e. offset = softplus^-1(1 - eps)
            self.offset = math.log(math.expm1(1.0 - self.eps))
        elif self.kind != "exp":
            raise ValueError(f"unknown scale function {self.kind!r}: use exp, tanh or softplus")
        add_counter(self, "scale_bound")
        add_counter(self, "s_clamp")

    def forward(self, h: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """``where`` (broadcastable to h, 1 = used): the positions whose s the coupling uses, for
        the activity counts only (a checkerboard coupling discards s on its conditioning half)."""
        track = self.training
        used = (torch.ones_like(h) if where is None else where.expand_as(h)) if track else None
        if self.kind == "exp":
            s = h
        elif self.kind == "tanh":
            th = torch.tanh(h)
            if track:  # saturated: s within 1% of its bound |w|
                count(self, "scale_bound", ((th.abs() > 0.99) * used).sum(), used.sum())
            s = self.rescale * th
        else:
            sp = F.softplus(h + self.offset)
            if track:  # at its floor: the scale is below 2 eps
                count(self, "scale_bound", ((sp < self.eps) * used).sum(), used.sum())
            s = torch.log(sp + self.eps)
        if self.clamp > 0:
            if track:
                count(self, "s_clamp", ((s.abs() > self.clamp) * used).sum(), used.sum())
            if self.clamp_kind == "hard":
                s = s.clamp(-self.clamp, self.clamp)
            else:
                s = self.clamp * (2.0 / math.pi) * torch.atan(s / self.clamp)
        return s


class _Coupling(nn.Module):
    """Shared forward/inverse; subclasses say how x splits into (conditioning, updated) parts."""

    def _split_params(
        self, cond: torch.Tensor, dtype: torch.dtype, where: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(cond).to(dtype)  # fp32 even when the net ran in bf16/fp16
        h_s, t = h.chunk(2, dim=1)
        return self.scale(h_s, where), t


class CheckerboardCoupling(_Coupling):
    """Coupling with a spatial checkerboard mask b: positions where b = 1 condition, the rest change."""

    def __init__(self, channels: int, size: int, parity: int, mid_channels: int, num_blocks: int, stab: FlowOptions):
        super().__init__()
        # built once as a buffer; not saved in checkpoints since it is a pure function of the shape
        self.register_buffer("mask", checkerboard(size, parity), persistent=False)
        self.net = STNet(
            channels, mid_channels, channels, num_blocks, stab.weight_norm, stab.st_batchnorm, stab.zero_init
        )
        self.scale = ScaleFunction(channels, stab)

    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.mask.to(x.dtype)
        s, t = self._split_params(x * b, x.dtype, 1 - b)
        # only the updated half is scaled and shifted; masking s also keeps it out of the log-det
        return s * (1 - b), t * (1 - b)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._params(x)
        return x * torch.exp(s) + t, s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._params(y)  # y * b == x * b: the conditioning half passed through unchanged
        return (y - t) * torch.exp(-s), -s.flatten(1).sum(1)


class ChannelCoupling(_Coupling):
    """Coupling with a channel-wise mask: one half of the channels conditions, the other changes."""

    def __init__(self, channels: int, parity: int, mid_channels: int, num_blocks: int, stab: FlowOptions):
        super().__init__()
        if channels % 2:
            raise ValueError(f"channel-wise coupling needs an even channel count, got {channels}")
        self.parity = parity
        half = channels // 2
        self.net = STNet(half, mid_channels, half, num_blocks, stab.weight_norm, stab.st_batchnorm, stab.zero_init)
        self.scale = ScaleFunction(half, stab)

    def _halves(self, x):
        a, b = x.chunk(2, dim=1)
        return (a, b) if self.parity == 0 else (b, a)

    def _join(self, cond, changed):
        return torch.cat((cond, changed), dim=1) if self.parity == 0 else torch.cat((changed, cond), dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, change = self._halves(x)
        s, t = self._split_params(cond, x.dtype)
        return self._join(cond, change * torch.exp(s) + t), s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond, change = self._halves(y)
        s, t = self._split_params(cond, y.dtype)
        return self._join(cond, (change - t) * torch.exp(-s)), -s.flatten(1).sum(1)
