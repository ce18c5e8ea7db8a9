"""The s/t network of a coupling: a ResNet with optional weight norm and batch norm (paper 4.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations


class _HalfConvCPU(torch.autograd.Function):
    """fp16 convolution on the CPU whose weight gradient is accumulated in fp32 and rounded to fp16.

    PyTorch's CPU kernel for the fp16 weight gradient takes a reference path about 90x slower than
    fp32 (2.2 s against 24 ms for one 16-map 3x3 layer at batch 64, measured here), which makes fp16
    training unusable on a CPU. A GPU kernel accumulates in fp32 and writes fp16 too, so this keeps
    what fp16 means for the recipe: fp16 activations, weights and gradients, overflow to inf where
    fp16 overflows (the GradScaler then skips the step), fp16 rounding of every result."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = padding, bias is not None
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, padding=ctx.padding)
        grad_w = torch.nn.grad.conv2d_weight(x.float(), weight.shape, grad.float(), padding=ctx.padding).half()
        grad_b = grad.float().sum(dim=(0, 2, 3)).half() if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None


class Conv2d(nn.Conv2d):
    """nn.Conv2d that runs fp16 autocast on the CPU at a usable speed (see _HalfConvCPU)."""

    def _conv_forward(self, input, weight, bias):
        if (input.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.float16 and self.groups == 1
                and self.stride == (1, 1) and self.dilation == (1, 1) and self.padding_mode == "zeros"):  # fmt: skip
            with torch.autocast("cpu", enabled=False):
                half = (input.half(), weight.half(), None if bias is None else bias.half())
                return _HalfConvCPU.apply(*half, self.padding)
        return super()._conv_forward(input, weight, bias)


def _conv(cin: int, cout: int, kernel: int, weight_norm: bool, zero: bool = False) -> nn.Module:
    conv = Conv2d(cin, cout, kernel, padding=kernel // 2)
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
