"""The one place where bits/dim is computed."""

from __future__ import annotations

import math

import torch

# the bits/dim of the uniform density on the 256 values of every dimension (log p = 0 below): a model
# that scores no better has learned nothing (study.run.outcome's "trains badly")
UNIFORM_BPD = 8.0


def bits_per_dim(log_prob: torch.Tensor | float, num_dims: int) -> torch.Tensor | float:
    """Bits per dimension of 8-bit data from the log-density (nats) of its dequantization in [0, 1].

    With x = (pixel + u) / 256, the discrete log-likelihood bound is log p(x) - D log 256, so
    bpd = -(log p(x) - D ln 256) / (D ln 2) = -log p(x) / (D ln 2) + 8 (official code's formula).
    A uniform density on [0, 1]^D (log p = 0) is exactly 8.0 bits/dim.
    """
    return -log_prob / (num_dims * math.log(2.0)) + UNIFORM_BPD
