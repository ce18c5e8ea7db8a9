"""The exact, parameter-light pieces of Real NVP: squeeze, masks, logit preprocessing, batch norm.

Every transform returns ``(output, log_det)`` with ``log_det`` of shape (N,) in nats, in both
directions (nflows' convention), so one loop composes them and tests can check each one alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from study.flows.activity import add_counter, count


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, 4C, H/2, W/2): each 2x2 block becomes 4 channels (paper section 3.6).

    A pure reshape/permute, so it is exact in every dtype (a permutation done as a convolution is
    not exact in bf16/TF32). Output channel ``4c + 2i + j`` holds input channel c at offset (i, j).
    """
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2)
    x = x.permute(0, 1, 3, 5, 2, 4)
    return x.reshape(n, c * 4, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze`: (N, 4C, H, W) -> (N, C, 2H, 2W)."""
    n, c4, h, w = x.shape
    c = c4 // 4
    x = x.reshape(n, c, 2, 2, h, w)
    x = x.permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, c, h * 2, w * 2)


def checkerboard(size: int, parity: int) -> torch.Tensor:
    """(1, 1, size, size) float mask, 1 where (row + col) % 2 == parity (paper fig. 3, left)."""
    idx = torch.arange(size)
    mask = ((idx[:, None] + idx[None, :]) % 2 == parity).to(torch.float32)
    return mask.reshape(1, 1, size, size)


class LogitTransform(nn.Module):
    """x in [0, 1] -> y = logit(alpha + (1 - 2 alpha) x), the paper's preprocessing (section 4.1).

    The log-det is d/dx of that map, log(1 - 2 alpha) - log p - log(1 - p), counted in the
    likelihood. ``logdet_form="softplus"`` writes -log p - log(1 - p) as softplus(y) + softplus(-y)
    (chrischute/real-nvp), which is stable when p is near 0 or 1; both forms are the same function.
    ``clamp`` > 0 clamps y to [-clamp, clamp] (see FlowOptions.input_clamp).
    """

    def __init__(self, alpha: float = 0.05, logdet_form: str = "softplus", clamp: float = 0.0):
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"logit alpha must be in [0, 0.5), got {alpha}")
        if logdet_form not in ("softplus", "log"):
            raise ValueError(f"logit logdet_form must be 'softplus' or 'log', got {logdet_form!r}")
        self.alpha = alpha
        self.logdet_form = logdet_form
        self.clamp = clamp
        add_counter(self, "input_clamp")
        add_counter(self, "logit_form_gap")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alpha
        p = a + (1.0 - 2.0 * a) * x
        if self.clamp > 0:
            lo = 1.0 / (1.0 + math.exp(self.clamp))  # sigmoid(-clamp)
            if self.training:  # how many logit-space inputs the clamp moves
                count(self, "input_clamp", ((p < lo) | (p > 1.0 - lo)).sum(), float(p.numel()))
            p = p.clamp(lo, 1.0 - lo)
        y = torch.log(p) - torch.log1p(-p)
        if self.logdet_form == "softplus":
            neg_log_p_1mp = F.softplus(y) + F.softplus(-y)
        else:
            neg_log_p_1mp = -torch.log(p) - torch.log1p(-p)
        if self.training:  # how far the other spelling of the log-det is from this one (rounding only?)
            log_form = -torch.log(p) - torch.log1p(-p)
            other = log_form if self.logdet_form == "softplus" else F.softplus(y) + F.softplus(-y)
            count(self, "logit_form_gap", (other - neg_log_p_1mp).abs().sum(), float(p.numel()))
        ld = math.log(1.0 - 2.0 * a) + neg_log_p_1mp
        return y, ld.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alpha
        p = torch.sigmoid(y)
        x = (p - a) / (1.0 - 2.0 * a)
        # d x / d y = p (1 - p) / (1 - 2a)
        ld = torch.log(p) + torch.log1p(-p) - math.log(1.0 - 2.0 * a)
        return x, ld.flatten(1).sum(1)


class BatchNormBijector(nn.Module):
    """The paper's batch normalisation as a bijector (eqs. 17-18), per channel.

    y = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta, log-det = sum over every position
    of log_gamma - 1/2 log(var + eps). Training uses the batch's statistics (so the map depends on
    the batch, as in the paper) and updates running averages; evaluation, and the inverse always,
    use the running averages, which makes it an ordinary per-example affine bijection there.
    """

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-4):
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("running_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("running_var", torch.ones(1, channels, 1, 1))
        add_counter(self, "bn_mean_gap")
        add_counter(self, "bn_logvar_gap")

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return self.running_mean, self.running_var
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
        with torch.no_grad():
            # how far this batch is from what evaluation will use (before the running update):
            # the mean in running standard deviations, the variance as a log ratio; channel means
            run_var = self.running_var + self.eps
            count(self, "bn_mean_gap", ((mean - self.running_mean).abs() / run_var.sqrt()).mean(), 1.0)
            count(self, "bn_logvar_gap", (torch.log(var + self.eps) - torch.log(run_var)).abs().mean(), 1.0)
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)
        return mean, var

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self._stats(x)
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)
        y = (x - mean) * torch.exp(log_scale) + self.beta
        per_position = log_scale.sum() * x.shape[2] * x.shape[3]
        return y, per_position.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self.running_mean, self.running_var
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)
        x = (y - self.beta) * torch.exp(-log_scale) + mean
        per_position = -log_scale.sum() * y.shape[2] * y.shape[3]
        return x, per_position.expand(y.shape[0])
