"""A human-readable description of the model and data a configuration gives."""

from __future__ import annotations

from study.config import Config, flatten


def model_summary(cfg: Config) -> str:
    from analysis.baselines import histogram_bpd
    from study.data import load_splits
    from study.flows import forward_flops_per_image, num_parameters
    from study.model import build_model

    splits = load_splits(cfg.data)
    channels, size, _ = splits.shape
    model = build_model(cfg, in_channels=channels, image_size=size)
    baseline = histogram_bpd(splits.train, splits.test)
    stab = {k.split(".", 1)[1]: v for k, v in flatten(cfg).items() if k.startswith("stabilizers.")}
    lines = [
        f"data        {splits.description}",
        f"splits      train {len(splits.train)}, validation {len(splits.val)}, test {len(splits.test)}"
        f" images of {channels}x{size}x{size}",
        f"model       Real NVP, {cfg.model.num_scales} scales, {cfg.model.mid_channels} maps, "
        f"{cfg.model.num_blocks} residual blocks",
        f"parameters  {num_parameters(model) / 1e6:.3f} M",
        f"forward     {forward_flops_per_image(model) / 1e9:.3f} GFLOP per image",
        f"baselines   uniform 8.000 bits/dim; per-channel pixel histogram {baseline:.3f} bits/dim on the test split",
        "stabilizers " + ", ".join(f"{k}={v}" for k, v in stab.items()),
    ]
    return "\n".join(lines)
