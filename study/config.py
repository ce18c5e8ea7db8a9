"""Configuration as data: one frozen dataclass per concern, flattened to ``section.key``.

Every switch the study ablates lives here, once, with its source. The command line and Optuna
change a configuration only through :func:`apply_overrides`, which type-checks each value, so an
unknown key or a bad value is an error before anything is written anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration a user wrote that cannot be used; the message is one line saying why."""


@dataclass(frozen=True)
class DataConfig:
    """Where images come from and how they are split (see :mod:`study.data`)."""

    # patches: embedded offline default (scikit-image photos); npz: a folder with *train*.npz and
    # *test*.npz (e.g. ../shared/data/cifar10-slices); cifar10: torchvision's CIFAR10 under `path`.
    source: Literal["patches", "npz", "cifar10"] = "patches"
    path: str = ""
    download: bool = False  # cifar10 only: let torchvision download when a network is there
    val_fraction: float = 0.1  # held out from the training data; the test split is never used to tune
    split_seed: int = 0  # fixed across runs so every variant and seed sees the same split
    train_limit: int = 0  # use only the first N training images (0: all); for quick runs
    flip: bool = True  # random horizontal flips, the paper's only augmentation


@dataclass(frozen=True)
class ModelConfig:
    """Size of the multi-scale Real NVP (paper, CIFAR-10: 2 scales, 64 maps, 8 residual blocks)."""

    num_scales: int = 2
    mid_channels: int = 64
    num_blocks: int = 8


@dataclass(frozen=True)
class Stabilizers:
    """Every stabilizer of the seed report, and the paper's own choices, as independent switches.

    Sources: the paper (Dinh et al. 2017), the official TensorFlow code (tensorflow/models
    research/real_nvp), chrischute/real-nvp (the PyTorch code the seed report copied), the seed
    report (KTH ID2223), Glow (Kingma & Dhariwal 2018) and FrEIA.

    ``scale_fn`` -- how the coupling turns the s-network output h into the log-scale s of
    y = x * exp(s) + t (paper eq. 2):

    - ``exp``: s = h, unbounded; the paper's eq. 2 read literally.
    - ``tanh``: s = w * tanh(h) with a learned per-channel w (paper section 4.1 and official code;
      chrischute's ``Rescale``). Bounded by |w|.
    - ``softplus``: exp(s) = softplus(h + c) + eps, c chosen so h = 0 gives scale 1; a positive
      scale that cannot overflow (nflows/FrEIA style).

    Which "Softplus" the seed report meant: most plausibly *not* the scale. The report says it took
    the code from chrischute/real-nvp, and the only softplus in that code is the numerically stable
    form of the logit preprocessing log-det, softplus(y) + softplus(-y) in place of
    -log p - log(1 - p). The report's words ("constrain the output ... to always be positive") are a
    textbook description of the function, which fits the scale reading too, so both readings are
    switches: ``scale_fn="softplus"`` (scale reading) and ``logit_logdet="softplus"`` (code reading).
    """

    # --- the coupling's scale -------------------------------------------------------------------
    scale_fn: Literal["exp", "tanh", "softplus"] = "tanh"
    softplus_eps: float = 1e-3  # floor of the softplus scale, so log-scale >= log(eps)
    # clamp of s itself (0: off). hard: clamp(s, -c, c); soft: c * 2/pi * atan(s / c) (FrEIA).
    # Either keeps the coupling exactly invertible with log-det = sum of the clamped s.
    s_clamp: float = 0.0
    s_clamp_kind: Literal["hard", "soft"] = "hard"

    # --- preprocessing --------------------------------------------------------------------------
    # y = logit(alpha + (1 - 2 alpha) x) (official code; the paper prints 1 - alpha, which is wrong)
    logit_alpha: float = 0.05
    # log-det of the logit written as softplus(y) + softplus(-y) (chrischute) or log-terms
    logit_logdet: Literal["softplus", "log"] = "softplus"
    # The seed's "restricting the values of the input (using clamp)": clamp the logit-space input
    # to [-c, c] (0: off). With alpha = 0.05 dequantized pixels lie in |y| <= 2.944, so a clamp
    # above that never binds on valid data; it only guards against inputs outside [0, 1]. Where it
    # binds the map is not invertible: the log-det is that of the logit at the clamped point.
    input_clamp: float = 0.0

    # --- the s/t networks -----------------------------------------------------------------------
    weight_norm: bool = True  # weight-normalised convolutions (paper, official code, chrischute)
    # L2 coefficient on the weight-norm magnitudes g and the tanh rescale w (paper: 5e-5; 0: off).
    l2: float = 5e-5
    # Without weight norm there are no magnitudes: True puts the same L2 on the plain conv weights
    # instead (sum g^2 of a filter equals sum w^2, so it is the same penalty on the effective weights,
    # but it acts on every direction of w, not only the magnitude); False leaves the convolutions
    # unpenalised. No effect with weight norm on. The necessity study sets False, so its
    # no-weightnorm variant changes the architecture alone and does not move L2.
    l2_plain_convs: bool = True
    st_batchnorm: bool = True  # batch norm inside the s/t ResNets (paper, chrischute)
    # the paper's batch-norm bijector on every coupling output (eqs. 17-18), with running averages
    # for evaluation; chrischute has none
    bn_bijector: bool = False
    bn_momentum: float = 0.1  # PyTorch convention; the official code's decay 0.9 equals 0.1 here
    zero_init: bool = True  # last conv of s/t zero-initialised: each coupling starts as the identity (Glow)

    # --- training-time switches (used by study.run.step) ----------------------------------------
    grad_clip: float = 100.0  # global-norm clipping max norm (official code, chrischute); 0: off
    # autocast precision: fp16 with a GradScaler (the seed report's literal recipe; the CPU runs it
    # too, see study.flows.resnet.Conv2d), or bf16, which has fp32's exponent range and needs none
    amp: Literal["off", "fp16", "bf16"] = "off"
    warmup_steps: int = 0  # linear learning-rate warm-up (Glow reproductions); 0: off
    nan_policy: Literal["stop", "restore"] = "stop"  # on a non-finite loss or gradient
    nan_retries: int = 3  # restore: at most this many reloads of the last good checkpoint
    nan_amp_off: bool = True  # restore: turn AMP off after a divergence (the seed report's advice)
    nan_lr_factor: float = 1.0  # restore: multiply the learning rate by this after a divergence


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping (paper: Adam 1e-3, batch 64, 100 epochs)."""

    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    eval_batch_size: int = 100  # official code's evaluation batch
    seed: int = 0
    threads: int = 0  # torch.set_num_threads; 0: leave torch's default (logged either way)
    channels_last: bool = False
    # torch.compile of log_prob for training and evaluation: off, default, reduce-overhead (adds CUDA
    # graphs on a GPU) or max-autotune. A cold compile costs about a minute on a CPU. It changes how
    # fast, not what is computed (tests/test_fast_paths.py), so it is not part of a run's identity.
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    sample_every: int = 5  # epochs between sample grids (and one at the end)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stabilizers: Stabilizers = field(default_factory=Stabilizers)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))

# Settings that change only how fast a run goes, left out of the identity of runs, studies and searches,
# so a run may be resumed with or without them. (channels_last and threads are execution-only too, but
# they were part of identities before this list existed; moving them would orphan recorded runs.)
EXECUTION_ONLY = ("train.compile",)

# Settings added after runs were recorded, with the value that reproduces what those runs computed:
# left out of a run's identity while they hold that value, so recorded runs keep their identity.
ADDED_LATER: dict[str, Any] = {"stabilizers.l2_plain_convs": True}


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"section.key": value}`` for every field: MLflow params and pandas columns use these names."""
    flat = {}
    for section in SECTIONS:
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            flat[f"{section}.{key}"] = value
    return flat


def identity(cfg: Config) -> dict[str, Any]:
    """The settings that define what a run computes: :func:`flatten` without EXECUTION_ONLY keys and
    without ADDED_LATER keys at their old behaviour."""
    return {k: v for k, v in flatten(cfg).items()
            if k not in EXECUTION_ONLY and not (k in ADDED_LATER and v == ADDED_LATER[k])}  # fmt: skip


def unflatten(flat: dict[str, Any]) -> Config:
    """Inverse of :func:`flatten` (values must already have the right types)."""
    return apply_values(Config(), flat)


def _field_types(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def parse_value(key: str, raw: str, annotation: Any) -> Any:
    """Convert the string ``raw`` to the field's type, or raise ConfigError naming the key."""
    text = raw.strip()
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        if text not in choices:
            raise ConfigError(f"{key}={raw!r}: must be one of {', '.join(choices)}")
        return text
    if annotation is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={raw!r}: expected a boolean (true/false)")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected an integer") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a number") from None
    if annotation is str:
        return text
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")  # a programming error


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Validate an already-typed value (from a preset or Optuna); ints are accepted for floats."""
    if isinstance(value, str):
        return parse_value(key, value, annotation)
    if typing.get_origin(annotation) is Literal:
        return parse_value(key, str(value), annotation)
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is bool and isinstance(value, bool):
        return value
    raise ConfigError(f"{key}={value!r}: expected {getattr(annotation, '__name__', annotation)}")


def apply_values(cfg: Config, values: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with ``{"section.key": value}`` applied, each value type-checked."""
    sections = {name: getattr(cfg, name) for name in SECTIONS}
    changes: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        section, _, name = key.partition(".")
        if section not in sections or not name:
            raise ConfigError(f"unknown config key {key!r}: use section.key with section in {', '.join(SECTIONS)}")
        types = _field_types(type(sections[section]))
        if name not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key {key!r}: {section} has {known}")
        changes[section][name] = _check_type(key, value, types[name])
    new = {name: dataclasses.replace(sections[name], **changes[name]) for name in SECTIONS}
    result = Config(**new)
    validate(result)
    return result


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["a.b=1", ...]`` -> ``{"a.b": "1"}``; a malformed item is a ConfigError."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad override {item!r}: write section.key=value")
        out[key.strip()] = value
    return out


def apply_overrides(cfg: Config, items: list[str] | tuple[str, ...]) -> Config:
    """Apply command-line ``section.key=value`` strings to ``cfg`` with type checks."""
    return apply_values(cfg, parse_overrides(items))


def validate(cfg: Config) -> None:
    """Range checks a type cannot express; raises ConfigError with the offending key."""
    checks = [
        (0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction must be in [0, 1)"),
        (cfg.data.train_limit >= 0, "data.train_limit must be >= 0"),
        (cfg.model.num_scales >= 1, "model.num_scales must be >= 1"),
        (cfg.model.mid_channels >= 1, "model.mid_channels must be >= 1"),
        (cfg.model.num_blocks >= 0, "model.num_blocks must be >= 0"),
        (0.0 <= cfg.stabilizers.logit_alpha < 0.5, "stabilizers.logit_alpha must be in [0, 0.5)"),
        (cfg.stabilizers.softplus_eps > 0, "stabilizers.softplus_eps must be > 0"),
        (cfg.stabilizers.s_clamp >= 0, "stabilizers.s_clamp must be >= 0 (0: off)"),
        (cfg.stabilizers.input_clamp >= 0, "stabilizers.input_clamp must be >= 0 (0: off)"),
        (cfg.stabilizers.l2 >= 0, "stabilizers.l2 must be >= 0 (0: off)"),
        (0 < cfg.stabilizers.bn_momentum <= 1, "stabilizers.bn_momentum must be in (0, 1]"),
        (cfg.stabilizers.grad_clip >= 0, "stabilizers.grad_clip must be >= 0 (0: off)"),
        (cfg.stabilizers.warmup_steps >= 0, "stabilizers.warmup_steps must be >= 0"),
        (cfg.stabilizers.nan_retries >= 0, "stabilizers.nan_retries must be >= 0"),
        (cfg.stabilizers.nan_lr_factor > 0, "stabilizers.nan_lr_factor must be > 0"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.batch_size >= 2, "train.batch_size must be >= 2 (batch norm needs a batch)"),
        (cfg.train.eval_batch_size >= 1, "train.eval_batch_size must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (cfg.train.threads >= 0, "train.threads must be >= 0"),
        (cfg.train.sample_every >= 1, "train.sample_every must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for section in SECTIONS:  # inf and nan pass every range check above: refuse them by name
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section}.{key}={value}: must be a finite number")
