"""Real NVP and its pieces; see realnvp.py for the public contract."""

from study.flows.realnvp import RealNVP, forward_flops_per_image, num_parameters

__all__ = ["RealNVP", "build_model", "forward_flops_per_image", "num_parameters"]


def build_model(cfg, in_channels: int = 3, image_size: int = 32) -> RealNVP:
    """The RealNVP a Config describes (model size from cfg.model, switches from cfg.stabilizers)."""
    return RealNVP(
        in_channels=in_channels,
        num_scales=cfg.model.num_scales,
        mid_channels=cfg.model.mid_channels,
        num_blocks=cfg.model.num_blocks,
        stabilizers=cfg.stabilizers,
        image_size=image_size,
    )
