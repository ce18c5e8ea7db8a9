import dataclasses

import pytest

from study.config import Config, ConfigError, apply_overrides, apply_values, flatten, unflatten


def test_flatten_round_trips_every_field():
    cfg = apply_overrides(Config(), ["stabilizers.scale_fn=softplus", "train.lr=3e-4", "data.flip=false"])
    flat = flatten(cfg)
    assert flat["stabilizers.scale_fn"] == "softplus" and flat["train.lr"] == 3e-4 and flat["data.flip"] is False
    assert unflatten(flat) == cfg
    n_fields = sum(len(dataclasses.fields(getattr(cfg, s.name))) for s in dataclasses.fields(cfg))
    assert len(flat) == n_fields


def test_overrides_are_type_checked():
    cfg = apply_overrides(Config(), ["model.num_blocks=2", "stabilizers.s_clamp=1.5", "stabilizers.bn_bijector=on"])
    assert cfg.model.num_blocks == 2 and cfg.stabilizers.s_clamp == 1.5 and cfg.stabilizers.bn_bijector is True
    assert Config().model.num_blocks == 8  # frozen defaults untouched


@pytest.mark.parametrize(
    "item,match",
    [
        ("model.num_blockz=2", "unknown config key 'model.num_blockz'"),
        ("optim.lr=1", "unknown config key 'optim.lr'"),
        ("model.num_blocks=two", "expected an integer"),
        ("train.lr=fast", "expected a number"),
        ("data.flip=maybe", "expected a boolean"),
        ("stabilizers.scale_fn=sigmoid", "must be one of exp, tanh, softplus"),
        ("stabilizers.amp=fp8", "must be one of off, fp16, bf16"),
        ("train.lr=-1", "train.lr must be > 0"),
        ("lr", "write section.key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(item, match):
    with pytest.raises(ConfigError, match=match) as info:
        apply_overrides(Config(), [item])
    assert "\n" not in str(info.value)


def test_apply_values_accepts_typed_values_and_rejects_wrong_types():
    assert apply_values(Config(), {"train.lr": 1}).train.lr == 1.0
    with pytest.raises(ConfigError, match="expected int"):
        apply_values(Config(), {"train.epochs": 2.5})
    with pytest.raises(ConfigError, match="expected bool"):
        apply_values(Config(), {"data.flip": 1})
