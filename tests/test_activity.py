"""Every ablated switch provably acts: each activity metric is 0 with its switch off and > 0 when the
switch is forced to bind; fp16 with a GradScaler runs on the CPU; the families hold one switch each."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch

from experiments.ablation import FAMILIES, STABILIZERS
from experiments.studies import get_study
from study.config import Config, apply_values, identity
from study.flows import FlowOptions, RealNVP
from study.flows.activity import read_and_reset
from study.run.engine import train
from tests.test_training import history, spec

OFF = {"input_clamp": 0.0, "s_clamp": 0.0, "scale_bound": 0.0, "bn_mean_gap": 0.0, "bn_logvar_gap": 0.0}


def _counts(**options) -> dict[str, float]:
    torch.manual_seed(0)
    model = RealNVP(3, 2, 4, 1, FlowOptions(zero_init=False, **options), image_size=8).train()
    with torch.no_grad():
        for p in model.parameters():  # large weights: the s-network's outputs reach every bound
            p.mul_(4.0)
    model.log_prob(torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    return read_and_reset(model)


def test_flow_activity_is_zero_with_every_switch_off():
    counts = _counts(scale_fn="exp")
    assert {k: v for k, v in counts.items() if k != "logit_form_gap"} == OFF
    assert counts["logit_form_gap"] < 1e-6  # both spellings of the logit log-det agree to rounding


@pytest.mark.parametrize(
    "options,kind",
    [
        ({"input_clamp": 1.0}, "input_clamp"),
        ({"scale_fn": "exp", "s_clamp": 0.05}, "s_clamp"),
        ({"scale_fn": "exp", "s_clamp": 0.05, "s_clamp_kind": "soft"}, "s_clamp"),
        ({"scale_fn": "tanh"}, "scale_bound"),
        ({"scale_fn": "softplus", "softplus_eps": 0.2}, "scale_bound"),
        ({"scale_fn": "tanh", "bn_bijector": True}, "bn_mean_gap"),
        ({"scale_fn": "tanh", "bn_bijector": True}, "bn_logvar_gap"),
    ],
)
def test_each_flow_activity_counts_when_its_switch_binds(options, kind):
    counts = _counts(**options)
    assert 0.0 < counts[kind], (kind, counts)
    others = (kind, "bn_mean_gap", "bn_logvar_gap", "scale_bound", "logit_form_gap")
    assert all(v == 0.0 for k, v in counts.items() if k not in others)


def test_activity_is_not_counted_in_eval_mode_and_resets():
    torch.manual_seed(0)
    model = RealNVP(3, 2, 4, 1, FlowOptions(input_clamp=0.5), image_size=8)
    model.train().log_prob(torch.rand(4, 3, 8, 8))
    assert read_and_reset(model)["input_clamp"] > 0
    assert read_and_reset(model)["input_clamp"] == 0.0  # reset by the read
    model.eval().log_prob(torch.rand(4, 3, 8, 8))
    assert read_and_reset(model)["input_clamp"] == 0.0
    assert not any(k.startswith("_act_") for k in model.state_dict())  # not in checkpoints


def test_training_logs_every_activity_metric_off_and_forced(store, tmp_path):
    quiet = {"stabilizers.grad_clip": 0.0, "stabilizers.l2": 0.0, "stabilizers.scale_fn": "exp", "train.epochs": 1}
    forced = {"stabilizers.grad_clip": 1.0, "stabilizers.l2": 0.1, "stabilizers.scale_fn": "tanh",
              "stabilizers.input_clamp": 1.0, "stabilizers.s_clamp": 0.001, "stabilizers.bn_bijector": True,
              "stabilizers.zero_init": False, "train.epochs": 1}  # fmt: skip
    client = mlflow.MlflowClient(store)
    metrics = ("clip_fraction", "clip_ratio_median", "l2_penalty", "input_clamp_fraction", "s_clamp_fraction",
               "scale_bound_fraction", "bn_mean_gap", "bn_logvar_gap")  # fmt: skip
    got = {}
    for name, values in (("quiet", quiet), ("forced", forced)):
        run_id = train(spec(store, tmp_path, name, **values)).run_id
        got[name] = {m: history(client, run_id, m)[0][1] for m in metrics}
    assert all(v == 0.0 for v in got["quiet"].values()), got["quiet"]
    assert all(v > 0.0 for v in got["forced"].values()), got["forced"]
    assert got["forced"]["clip_fraction"] == 1.0 and got["forced"]["clip_ratio_median"] > 1.0


def test_fp16_with_gradscaler_trains_on_the_cpu(store, tmp_path):
    result = train(spec(store, tmp_path, **{"stabilizers.amp": "fp16", "train.epochs": 2}))
    assert result.outcome in ("completed", "recovered", "diverged")
    client = mlflow.MlflowClient(store)
    scale = history(client, result.run_id, "grad_scale")
    assert scale and all(0 < v <= 2.0**16 for _, v in scale)  # the GradScaler ran and reports its scale
    assert history(client, result.run_id, "amp_on")[0][1] == 1.0
    assert client.get_run(result.run_id).data.params["stabilizers.amp"] == "fp16"


def test_cpu_fp16_convolution_matches_the_native_fp16_gradients():
    from study.flows.resnet import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        ours = conv(x)
    ours.float().square().sum().backward()
    ours_grads = [t.grad.clone() for t in (x, conv.weight, conv.bias)]
    for t in (x, conv.weight, conv.bias):
        t.grad = None
    with torch.autocast("cpu", dtype=torch.float16):  # torch's own fp16 path (slow on the CPU)
        native = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    native.float().square().sum().backward()
    assert ours.dtype == native.dtype == torch.float16 and torch.equal(ours, native)
    # both against float64 from the same fp16 operands: the native fp16 kernel's accumulation order differs
    # between CPUs (oneDNN with or without AMX), so each is held to fp16 rounding of the exact gradient, and
    # ours (fp32 accumulation, one rounding) may be no farther from it than the native one
    # (the upstream gradient is 2 y of the fp16 output y, as both backward passes see it)
    x16, w16 = x.detach().half().double(), conv.weight.detach().half().double()
    g = 2 * ours.detach().double()
    exact = (torch.nn.grad.conv2d_input(x16.shape, w16, g, padding=1),
             torch.nn.grad.conv2d_weight(x16, w16.shape, g, padding=1), g.sum(dim=(0, 2, 3)))  # fmt: skip
    for a, b, e, t in zip(ours_grads, (x.grad, conv.weight.grad, conv.bias.grad), exact, (x, conv.weight, conv.bias),
                          strict=True):  # fmt: skip
        assert a.dtype == t.dtype and torch.allclose(a.double(), e, rtol=2e-3, atol=2e-3)
        assert (a.double() - e).abs().max() <= (b.double() - e).abs().max() + 1e-6


def test_leave_one_out_and_decomposition_change_one_switch_each():
    def switches(overrides):
        return {k: v for k, v in apply_values(Config(), overrides).__dict__.items()}

    by = {v.name: v for v in STABILIZERS}
    base = Config()
    for fam in FAMILIES:
        if fam.name == "references":
            continue  # chrischute differs in several switches by design, and the report says so
        for name in fam.members[1:]:
            ref = fam.comparator(name)
            a = identity(apply_values(base, by[ref].overrides))
            b = identity(apply_values(base, by[name].overrides))
            changed = {k for k in a if a[k] != b[k]} - {"stabilizers.s_clamp_kind"}
            assert len(changed) == 1, (fam.name, name, changed)
    assert switches(by["no-weightnorm"].overrides)  # a valid config
    # without weight norm and with l2_plain_convs off, L2 falls on no convolution
    model = RealNVP(3, 2, 4, 1, FlowOptions(weight_norm=False, l2_plain_convs=False), image_size=4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("rescale") for p in model.l2_parameters())


def test_a_setting_added_later_keeps_recorded_identities():
    cfg = Config()
    assert "stabilizers.l2_plain_convs" not in identity(cfg)  # at its old behaviour: not in the identity
    assert identity(apply_values(cfg, {"stabilizers.l2_plain_convs": False}))["stabilizers.l2_plain_convs"] is False


def test_every_study_variant_is_a_valid_config():
    for study in ("stabilizers", "factorial", "factorial-full"):
        for v in get_study(study):
            assert v.rationale and apply_values(Config(), v.overrides)
    assert not any(v.needs_cuda for v in STABILIZERS)  # fp16 runs on every device now
    assert math.isfinite(len(get_study("factorial")))


def test_logit_form_gap_measures_the_two_spellings_and_is_rounding_on_valid_inputs():
    """The softplus and log spellings of the logit log-det are one function: on every valid input they
    differ by float rounding only, which is why the no-softplus-logit reading cannot act."""
    import torch.nn.functional as F

    from study import schema
    from study.flows.transforms import LogitTransform

    logit = LogitTransform(0.05, "softplus").train()
    x = torch.cat([torch.rand(4, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 255.999 / 256)])
    logit(x)
    counted = read_and_reset(logit)["logit_form_gap"]
    p = 0.05 + 0.9 * x
    y = torch.log(p) - torch.log1p(-p)
    by_hand = ((-torch.log(p) - torch.log1p(-p)) - (F.softplus(y) + F.softplus(-y))).abs().mean().item()
    assert counted == pytest.approx(by_hand, rel=1e-6, abs=1e-12)
    assert counted < schema.SWITCH_THRESHOLD[schema.LOGIT_FORM_GAP] / 100
