"""A timing stand-in for the usual PyTorch reproduction (chrischute/real-nvp), for `bench`.

The speed target of the harness is stated against that code ("at least the 5.8 images/s measured
here for the usual reproduction", ../shared/design/REFERENCE.md). Its code cannot run here as
published (it fails on torch 2.x) and is not ours to ship, so the benchmark times this stand-in in the
same process instead: our flow with each coupling's s/t network replaced by one of the usual
reproduction's *shape*, as REFERENCE.md describes it:

- the input doubled as (x, -x) before a weight-normed 3x3 convolution;
- a weight-normed 1x1 "skip" convolution after the input and after every residual block, summed;
- batch norm + ReLU + a weight-normed 1x1 output convolution;
- a NaN check in every coupling that forces a host sync.

At the paper size this has 19.64 M parameters and 12.91 GFLOP per forward image, the figures
REFERENCE.md gives for the original (19.6 M, 12.9 GFLOP); tests/test_bench.py checks both. It is for
timing only: nothing else in the harness uses it. Measured side by side in one process against the
real chrischute/real-nvp step (paper size, fp32, batch 16, 2 CPU threads, alternating steps), our step
is 1.04x the real code's where this stand-in gives 1.15x: the real code is slower than its stand-in
(README, Benchmarks), so ratios against the stand-in overstate our speed-up by about 10%.
"""

from __future__ import annotations

import torch
from torch import nn

from study.flows import RealNVP
from study.flows.coupling import _Coupling
from study.flows.resnet import ResidualBlock, _conv


class ReferenceSTNet(nn.Module):
    """The usual reproduction's s/t ResNet shape (see the module docstring)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, num_blocks: int):
        super().__init__()
        # the same weight-normed convolutions and pre-activation blocks as ours (study.flows.resnet)
        self.inp = _conv(2 * in_channels, mid_channels, 3, weight_norm=True)
        self.in_skip = _conv(mid_channels, mid_channels, 1, weight_norm=True)
        self.blocks = nn.ModuleList(ResidualBlock(mid_channels, weight_norm=True, batchnorm=True)
                                    for _ in range(num_blocks))  # fmt: skip
        self.skips = nn.ModuleList(_conv(mid_channels, mid_channels, 1, weight_norm=True) for _ in range(num_blocks))
        self.out_norm = nn.BatchNorm2d(mid_channels)
        self.out = _conv(mid_channels, out_channels, 1, weight_norm=True)

    def forward(self, x):
        h = self.inp(torch.cat((x, -x), dim=1))
        acc = self.in_skip(h)
        for block, skip in zip(self.blocks, self.skips, strict=True):
            h = block(h)
            acc = acc + skip(h)
        out = self.out(torch.relu(self.out_norm(acc)))
        if torch.isnan(out).any():  # the original checks every coupling: one host sync each
            raise RuntimeError("scale factor has NaN entries")
        return out


def reference_shaped(model: RealNVP) -> RealNVP:
    """``model`` with every coupling's s/t network replaced by a ReferenceSTNet of the same sizes."""
    for module in model.modules():
        if isinstance(module, _Coupling):
            net = module.net
            module.net = ReferenceSTNet(net.inp.in_channels, net.inp.out_channels, net.out.out_channels,
                                        len(net.blocks))  # fmt: skip
    return model
