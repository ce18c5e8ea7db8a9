"""Multi-scale Real NVP (Dinh, Sohl-Dickstein & Bengio, ICLR 2017, section 3.6).

Per scale: 3 checkerboard couplings, squeeze, 3 channel-wise couplings, factor out half the
channels; the last scale: 4 checkerboard couplings. s/t ResNets have ``mid_channels`` maps at the
first scale's checkerboard couplings and twice as many for each squeeze (chrischute/real-nvp's
layout, which gives 19.6 M parameters at the CIFAR-10 size with its ResNet).

Contract (tests and tools rely on it):
    model(x) -> (z, log_det): x (N, C, H, W) dequantized in [0, 1]; z the same shape (latents of all
        scales in image layout); log_det (N,) in nats, including the logit preprocessing.
    model.inverse(z) -> x;  model.log_prob(x) -> (N,);  model.sample(n, temperature) -> x in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from study.flows.coupling import ChannelCoupling, CheckerboardCoupling
from study.flows.options import FlowOptions
from study.flows.transforms import BatchNormBijector, LogitTransform, squeeze, unsqueeze


def _logdet_dtype(x: torch.Tensor) -> torch.dtype:
    """Log-dets accumulate in at least fp32 (fp64 stays fp64 for the tests' tight tolerances)."""
    return torch.promote_types(x.dtype, torch.float32)


class FlowSequence(nn.Module):
    """Transforms applied in order; inverse in reverse order. Log-dets add up."""

    def __init__(self, transforms: list[nn.Module]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x):
        total = x.new_zeros(x.shape[0], dtype=_logdet_dtype(x))
        for t in self.transforms:
            x, ld = t(x)
            total = total + ld
        return x, total

    def inverse(self, y):
        total = y.new_zeros(y.shape[0], dtype=_logdet_dtype(y))
        for t in reversed(self.transforms):
            y, ld = t.inverse(y)
            total = total + ld
        return y, total


def _with_bn(couplings: list[nn.Module], channels: int, stab: FlowOptions) -> list[nn.Module]:
    """Insert the paper's batch-norm bijector after each coupling when the switch is on."""
    if not stab.bn_bijector:
        return couplings
    out: list[nn.Module] = []
    for c in couplings:
        out += [c, BatchNormBijector(channels, momentum=stab.bn_momentum)]
    return out


class Scale(nn.Module):
    """One scale of the multi-scale architecture, acting on (C, size, size)."""

    def __init__(self, channels, size, mid_channels, num_blocks, last, stab: FlowOptions):
        super().__init__()
        self.last = last
        n_checker = 4 if last else 3
        checker = [
            CheckerboardCoupling(channels, size, i % 2, mid_channels, num_blocks, stab) for i in range(n_checker)
        ]
        self.checker = FlowSequence(_with_bn(checker, channels, stab))
        if not last:
            chan = [ChannelCoupling(4 * channels, i % 2, 2 * mid_channels, num_blocks, stab) for i in range(3)]
            self.channel = FlowSequence(_with_bn(chan, 4 * channels, stab))

    def forward(self, x):
        """(C, s, s) -> (4C, s/2, s/2) (or (C, s, s) at the last scale), log-det."""
        x, ld = self.checker(x)
        if self.last:
            return x, ld
        x, ld2 = self.channel(squeeze(x))
        return x, ld + ld2

    def inverse(self, y):
        if self.last:
            return self.checker.inverse(y)
        y, ld = self.channel.inverse(y)
        x, ld2 = self.checker.inverse(unsqueeze(y))
        return x, ld + ld2


class RealNVP(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_scales: int = 2,
        mid_channels: int = 64,
        num_blocks: int = 8,
        options: FlowOptions | None = None,
        image_size: int = 32,
    ):
        super().__init__()
        stab = options or FlowOptions()
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        if image_size % (2 ** (num_scales - 1)) or image_size < 2**num_scales:
            raise ValueError(f"image_size {image_size} must be divisible by 2^(num_scales-1) and at least 2^num_scales")
        self.in_channels = in_channels
        self.image_size = image_size
        self.options = stab
        self.preprocess = LogitTransform(stab.logit_alpha, stab.logit_logdet, stab.input_clamp)
        scales = []
        channels, size, mid = in_channels, image_size, mid_channels
        for i in range(num_scales):
            last = i == num_scales - 1
            scales.append(Scale(channels, size, mid, num_blocks, last, stab))
            # the kept half of the squeezed 4C channels goes on; the other half is factored out
            channels, size, mid = 2 * channels, size // 2, 2 * mid
        self.scales = nn.ModuleList(scales)

    @property
    def num_dims(self) -> int:
        return self.in_channels * self.image_size * self.image_size

    def _check(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"RealNVP expects inputs shaped (N, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [0, 1] (N, C, H, W) -> (z same shape, log_det (N,) in nats)."""
        self._check(x)
        h, log_det = self.preprocess(x)
        factored = []
        for scale in self.scales[:-1]:
            h, ld = scale(h)
            log_det = log_det + ld
            h, z_out = h.chunk(2, dim=1)
            factored.append(z_out)
        h, ld = self.scales[-1](h)
        log_det = log_det + ld
        for z_out in reversed(factored):
            h = unsqueeze(torch.cat((h, z_out), dim=1))
        return h, log_det

    def inverse_with_logdet(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z -> (x, log|det dx/dz|)."""
        self._check(z)
        factored = []
        h = z
        for _ in self.scales[:-1]:
            h, z_out = squeeze(h).chunk(2, dim=1)
            factored.append(z_out)
        h, log_det = self.scales[-1].inverse(h)
        for scale, z_out in zip(reversed(self.scales[:-1]), reversed(factored), strict=True):
            h, ld = scale.inverse(torch.cat((h, z_out), dim=1))
            log_det = log_det + ld
        x, ld = self.preprocess.inverse(h)
        return x, log_det + ld

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return self.inverse_with_logdet(z)[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats, (N,): standard-normal log-density of z plus the log-det."""
        return self.log_density(*self(x))

    @staticmethod
    def log_density(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
        """log p(x) from the forward pass's (z, log_det); for callers that run forward through a
        wrapper (DistributedDataParallel only syncs gradients of calls to forward)."""
        z = z.to(_logdet_dtype(z))
        prior = -0.5 * (z * z + math.log(2 * math.pi))
        return prior.flatten(1).sum(1) + log_det

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, clamp: bool = True
    ) -> torch.Tensor:
        """n samples from z ~ N(0, temperature^2 I), in eval mode (running statistics), clamped to the
        image range [0, 1] unless ``clamp`` is False (the inverse logit can leave it by alpha / (1 - 2 alpha))."""
        was_training = self.training
        self.eval()
        try:
            param = next(self.parameters())
            shape = (n, self.in_channels, self.image_size, self.image_size)
            z = torch.randn(shape, generator=generator, device=param.device, dtype=param.dtype) * temperature
            x = self.inverse(z)
            return x.clamp(0.0, 1.0) if clamp else x
        finally:
            self.train(was_training)

    def l2_parameters(self) -> list[nn.Parameter]:
        """Parameters under the L2 penalty (paper, official code): the weight-norm magnitudes g and
        the tanh rescale w; without weight norm, the plain convolution weights when
        ``options.l2_plain_convs`` (the same penalty on the effective weights), else none of them."""
        params = []
        plain = not self.options.weight_norm and self.options.l2_plain_convs
        for name, p in self.named_parameters():
            if name.endswith("parametrizations.weight.original0") or name.endswith("scale.rescale"):
                params.append(p)
            elif plain and name.endswith(".weight") and p.dim() == 4:
                params.append(p)
        return params


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops_per_image(model: RealNVP, batch: int = 2) -> float:
    """Forward FLOPs per image counted by torch's FlopCounterMode (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.rand(batch, model.in_channels, model.image_size, model.image_size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / batch
