"""A human-readable description of the model and data a configuration gives."""

from __future__ import annotations

from study.config import Config, flatten
from study.data import DataError, load_splits

KNOWN_SHAPE = {"cifar10": (3, 32)}  # (channels, size) of a source whose files may be absent here


def model_summary(cfg: Config) -> str:
    from analysis.baselines import histogram_bpd
    from study.flows import forward_flops_per_image, num_parameters
    from study.model import build_model

    try:
        splits = load_splits(cfg.data)
    except DataError as e:  # CIFAR-10's shape is known without its files: the model can still be described
        if cfg.data.source not in KNOWN_SHAPE:
            raise
        splits, (channels, size) = None, KNOWN_SHAPE[cfg.data.source]
        missing = str(e).split(" (")[0]  # "cifar10 source: no CIFAR-10 under DIR", without torchvision's words
    else:
        channels, size, _ = splits.shape
    model = build_model(cfg, in_channels=channels, image_size=size)
    stab = {k.split(".", 1)[1]: v for k, v in flatten(cfg).items() if k.startswith("stabilizers.")}
    if splits is not None:
        baseline = histogram_bpd(splits.train, splits.test)
        data = [f"data        {splits.description}",
                f"splits      train {len(splits.train)}, validation {len(splits.val)}, test {len(splits.test)}"
                f" images of {channels}x{size}x{size}"]  # fmt: skip
        baselines = f"uniform 8.000 bits/dim; per-channel pixel histogram {baseline:.3f} bits/dim on the test split"
    else:
        data = [f"data        {missing}: the model alone, for its {channels}x{size}x{size} images"]
        baselines = "uniform 8.000 bits/dim; the pixel histogram's needs the data"
    lines = [
        *data,
        f"model       Real NVP, {cfg.model.num_scales} scales, {cfg.model.mid_channels} maps, "
        f"{cfg.model.num_blocks} residual blocks",
        f"parameters  {num_parameters(model) / 1e6:.3f} M",
        f"forward     {forward_flops_per_image(model) / 1e9:.3f} GFLOP per image",
        f"baselines   {baselines}",
        "stabilizers " + ", ".join(f"{k}={v}" for k, v in stab.items()),
    ]
    return "\n".join(lines)
