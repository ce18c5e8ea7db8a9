"""Named starting configurations, defined once. A preset is a name plus config overrides."""

from __future__ import annotations

from experiments.ladder import RUNGS as LADDER_RUNGS
from study.config import Config, ConfigError, apply_values

PRESETS: dict[str, dict[str, object]] = {
    # embedded offline data and a tiny model: one run in well under a minute on 2 CPU cores
    "demo": {
        "data.source": "patches",
        "data.train_limit": 1024,
        "model.num_scales": 2,
        "model.mid_channels": 8,
        "model.num_blocks": 1,
        "train.epochs": 3,
        "train.batch_size": 32,
        "train.eval_batch_size": 200,
        "train.sample_every": 3,
    },
    # real CIFAR-10 at a reduced size that a 2-core CPU trains in minutes. Data defaults to
    # torchvision's CIFAR10 under data/cifar10; here pass --data npz:../shared/data/cifar10-slices.
    "cifar-cpu": {
        "data.source": "cifar10",
        "data.path": "data/cifar10",
        "model.num_scales": 2,
        "model.mid_channels": 16,
        "model.num_blocks": 2,
        "train.epochs": 10,
        "train.batch_size": 64,
        "train.sample_every": 5,
    },
    # the committed stabilizer study (studies/cifar-study): real CIFAR-10 at a size where 78 cells of
    # 6 epochs take about 90 minutes on 2 CPU cores (README, "The committed study")
    "cifar-study": {
        "data.source": "cifar10",
        "data.path": "data/cifar10",
        "model.num_scales": 2,
        "model.mid_channels": 8,
        "model.num_blocks": 2,
        "train.epochs": 6,
        "train.batch_size": 64,
        "train.sample_every": 6,
    },
    # the long-run study (studies/long-run): the committed study's size for the seed report's 100
    # epochs, so that its own statistic (validation bits/dim over the last 40 epochs) exists. The
    # learning rate is constant, so its first 6 epochs are a cifar-study run of the same seed.
    "cifar-long": {
        "data.source": "cifar10",
        "data.path": "data/cifar10",
        "model.num_scales": 2,
        "model.mid_channels": 8,
        "model.num_blocks": 2,
        "train.epochs": 100,
        "train.batch_size": 64,
        "train.sample_every": 25,
    },
    # the scale ladder (experiments/ladder.py, `ablation transfer`): each cell sets its own size and
    # learning rate; 3 epochs of the 3,600 training images, sized so the 144 cells take about 4 hours on 2
    # CPU cores (the dry run measures it). No sample grid before the last epoch.
    "ladder": {
        "data.source": "cifar10",
        "data.path": "data/cifar10",
        "model.num_scales": 2,
        "model.mid_channels": 8,
        "model.num_blocks": 2,
        "train.epochs": 3,
        "train.batch_size": 64,
        "train.sample_every": 3,
    },
    # the paper's CIFAR-10 configuration (section 4.1), for a GPU
    "paper": {
        "data.source": "cifar10",
        "data.path": "data/cifar10",
        "model.num_scales": 2,
        "model.mid_channels": 64,
        "model.num_blocks": 8,
        "train.epochs": 100,
        "train.batch_size": 64,
        "train.lr": 1e-3,
        "stabilizers.l2": 5e-5,
        "train.sample_every": 5,
    },
}


# sizes bench times besides the presets' own: "small" sits between cifar-cpu and paper; "rung-32x4"
# is the largest rung the scale ladder (issue 28) plans on a CPU, where cell throughput is measured
BENCH_SIZES: dict[str, dict[str, int]] = {
    "small": {"model.num_scales": 2, "model.mid_channels": 32, "model.num_blocks": 2},
    "rung-32x4": {"model.num_scales": 2, "model.mid_channels": 32, "model.num_blocks": 4},
    # the ladder's rungs (experiments/ladder.py), which its dry run times
    **{f"rung-{name}": {"model.num_scales": 2, "model.mid_channels": maps, "model.num_blocks": blocks}
       for name, maps, blocks in LADDER_RUNGS},
}


def model_sizes() -> dict[str, tuple[int, int, int]]:
    """(num_scales, mid_channels, num_blocks) of every preset and bench size, by name."""
    sizes = {}
    for name, values in {**PRESETS, **BENCH_SIZES}.items():
        cfg = apply_values(Config(), {k: v for k, v in values.items() if k.startswith("model.")})
        sizes[name] = (cfg.model.num_scales, cfg.model.mid_channels, cfg.model.num_blocks)
    return sizes


def preset_config(name: str) -> Config:
    """The Config of a named preset; an unknown name is a ConfigError listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return apply_values(Config(), PRESETS[name])
