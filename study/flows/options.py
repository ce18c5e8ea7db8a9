"""The switches the flow itself has: how a coupling scales, how inputs are preprocessed, what its s/t
networks hold. The flow package takes these and nothing of the harness (the harness maps its own
configuration onto them in study/model.py), so it can be used alone, like nflows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class FlowOptions:
    """Defaults are chrischute/real-nvp's choices with the paper's logit alpha; see
    study.config.Stabilizers for each switch's source and the readings of the seed report."""

    # the coupling's log-scale s from the s-network output h: exp (s = h), tanh (s = w tanh h) or
    # softplus (exp(s) = softplus(h + c) + eps, c so that h = 0 is the identity)
    scale_fn: Literal["exp", "tanh", "softplus"] = "tanh"
    softplus_eps: float = 1e-3
    s_clamp: float = 0.0  # clamp of s (0: off): hard clamp(s, -c, c) or soft c * 2/pi * atan(s / c)
    s_clamp_kind: Literal["hard", "soft"] = "hard"
    logit_alpha: float = 0.05  # y = logit(alpha + (1 - 2 alpha) x)
    logit_logdet: Literal["softplus", "log"] = "softplus"  # how the logit's log-det is written
    input_clamp: float = 0.0  # clamp of the logit-space input to [-c, c] (0: off)
    weight_norm: bool = True  # weight-normalised s/t convolutions
    l2_plain_convs: bool = True  # without weight norm, L2 falls on the plain conv weights (see l2_parameters)
    st_batchnorm: bool = True  # batch norm inside the s/t ResNets
    bn_bijector: bool = False  # the paper's batch-norm bijector after every coupling (eqs. 17-18)
    bn_momentum: float = 0.1  # its running averages (PyTorch convention)
    zero_init: bool = True  # last s/t convolution zero-initialised: couplings start as the identity
