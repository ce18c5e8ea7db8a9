"""The s/t network of a coupling: a ResNet with optional weight norm and batch norm (paper 4.1)."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrizations


def _conv(cin: int, cout: int, kernel: int, weight_norm: bool, zero: bool = False) -> nn.Module:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.zeros_(conv.bias)
    if zero and not weight_norm:
        nn.init.zeros_(conv.weight)
    if weight_norm:
        conv = parametrizations.weight_norm(conv)
        if zero:
            # g = 0 makes the weight exactly zero while v keeps a direction to grow from
            nn.init.zeros_(conv.parametrizations.weight.original0)
    return conv


def _norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


class ResidualBlock(nn.Module):
    """Pre-activation block: h + conv(relu(norm(conv(relu(norm(h))))))."""

    def __init__(self, channels: int, weight_norm: bool, batchnorm: bool):
        super().__init__()
        self.norm1 = _norm(channels, batchnorm)
        self.conv1 = _conv(channels, channels, 3, weight_norm)
        self.norm2 = _norm(channels, batchnorm)
        self.conv2 = _conv(channels, channels, 3, weight_norm)
        self.act = nn.ReLU()

    def forward(self, h):
        r = self.conv1(self.act(self.norm1(h)))
        r = self.conv2(self.act(self.norm2(r)))
        return h + r


class STNet(nn.Module):
    """in_channels -> (s, t) stacked as 2 * out_channels maps, through ``num_blocks`` residual blocks.

    The last convolution is zero-initialised when ``zero_init`` (Glow), so the coupling starts as
    the identity.
    """

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        num_blocks: int,
        weight_norm: bool = True,
        batchnorm: bool = True,
        zero_init: bool = True,
    ):
        super().__init__()
        self.inp = _conv(in_channels, mid_channels, 3, weight_norm)
        self.blocks = nn.Sequential(*[ResidualBlock(mid_channels, weight_norm, batchnorm) for _ in range(num_blocks)])
        self.out_norm = _norm(mid_channels, batchnorm)
        self.act = nn.ReLU()
        self.out = _conv(mid_channels, 2 * out_channels, 3, weight_norm, zero=zero_init)

    def forward(self, x):
        h = self.blocks(self.inp(x))
        return self.out(self.act(self.out_norm(h)))
