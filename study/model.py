"""The harness's bridge to the flow: a study Config's model size and switches -> a RealNVP."""

from __future__ import annotations

import dataclasses

from study.config import Config, ConfigError, Stabilizers
from study.flows import FlowOptions, RealNVP

_FLOW_FIELDS = tuple(f.name for f in dataclasses.fields(FlowOptions))


def flow_options(stab: Stabilizers) -> FlowOptions:
    """The stabilizers that live in the model (the rest act in the training step)."""
    return FlowOptions(**{name: getattr(stab, name) for name in _FLOW_FIELDS})


def build_model(cfg: Config, in_channels: int = 3, image_size: int = 32) -> RealNVP:
    """The RealNVP a Config describes (size from cfg.model, switches from cfg.stabilizers)."""
    return RealNVP(
        in_channels=in_channels,
        num_scales=cfg.model.num_scales,
        mid_channels=cfg.model.mid_channels,
        num_blocks=cfg.model.num_blocks,
        options=flow_options(cfg.stabilizers),
        image_size=image_size,
    )


def check_fits(cfg: Config, image_shape: tuple[int, int, int]) -> None:
    """The model a config describes can take these images: each of the num_scales - 1 squeezes halves
    the size, and the last scale still needs a checkerboard. A ConfigError names the fix."""
    size, scales = image_shape[1], cfg.model.num_scales
    if size % 2 ** (scales - 1) or size < 2**scales:
        fit = max(n for n in range(1, 8) if size % 2 ** (n - 1) == 0 and size >= 2**n) if size >= 2 else 0
        raise ConfigError(f"model.num_scales={scales} does not fit {size}x{size} images: use model.num_scales <= {fit}")
