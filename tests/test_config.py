import dataclasses

import pytest

from study.config import Config, ConfigError, apply_overrides, apply_values, flatten, unflatten
from tests.conftest import ROOT, copy_committed_study


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


def test_execution_only_settings_leave_identities_alone():
    from study.config import identity
    from study.run.spec import run_key

    cfg = Config()
    fast = apply_values(cfg, {"train.compile": "reduce-overhead"})
    assert run_key("v", fast) == run_key("v", cfg) and identity(fast) == identity(cfg)
    assert run_key("v", apply_values(cfg, {"train.lr": 2e-3})) != run_key("v", cfg)


def test_recorded_runs_keep_their_identity(tmp_path):
    """Adding a config field must not orphan recorded runs: every run of the committed study still
    hashes to the run_key it was tagged with, so `ablation` resumes it instead of training it again."""
    import mlflow

    from study.config import SECTIONS
    from study.run.spec import run_key

    # a copy: opening a store may migrate its schema in place
    db = copy_committed_study(ROOT / "studies" / "cifar-study", tmp_path / "cifar-study")
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if "run_key" in r.data.tags]  # fmt: skip
    assert len(runs) >= 78
    for r in runs:
        params = {k: v for k, v in r.data.params.items() if k.partition(".")[0] in SECTIONS}
        assert run_key(r.data.tags["variant"], apply_values(Config(), params)) == r.data.tags["run_key"]


def test_the_flow_package_and_the_study_config_agree_on_every_switch():
    """The flow package keeps its own FlowOptions so it can be used alone; each of its switches is also a
    field of study.config.Stabilizers, with the same default and the same type, so the two copies cannot
    drift (a different default would make a run's recorded config lie about the model it built)."""
    import dataclasses
    import typing

    from study.config import Stabilizers
    from study.flows import FlowOptions
    from study.model import flow_options

    flow, study = FlowOptions(), Stabilizers()
    study_types = typing.get_type_hints(Stabilizers)
    for f in dataclasses.fields(FlowOptions):
        assert hasattr(study, f.name), f"FlowOptions.{f.name} has no Stabilizers field"
        assert getattr(flow, f.name) == getattr(study, f.name), f"{f.name}: defaults differ"
        assert typing.get_type_hints(FlowOptions)[f.name] == study_types[f.name], f"{f.name}: types differ"
    assert flow_options(study) == flow  # the bridge carries every switch across
    changed = dataclasses.replace(study, scale_fn="softplus", bn_bijector=True, input_clamp=3.0)
    assert flow_options(changed) == FlowOptions(scale_fn="softplus", bn_bijector=True, input_clamp=3.0)
