"""What happened to a run, from its events and final value (study.run.outcome), on synthetic
histories; and GradScaler's own skips, which are not divergences while the scale can be the cause."""

from __future__ import annotations

import math

import pytest
import torch

from study.run.outcome import classify
from study.run.step import train_step
from tests.test_step import _batch, _flat, _model


@pytest.mark.parametrize(
    "outcome, events, final, expected",
    [
        # a NaN on the very first forward pass: nothing was ever updated
        ("diverged", [{"epoch": 1, "step": 0, "cause": "non-finite loss", "updates": 0}], None, "fails-at-init"),
        # recorded before `updates` existed: global step 0 is before any update
        ("diverged", [{"epoch": 1, "step": 0, "cause": "non-finite loss"}], None, "fails-at-init"),
        # a late NaN after 53 updates
        ("diverged", [{"epoch": 1, "step": 53, "cause": "non-finite loss", "updates": 53}], None,
         "diverges-in-training"),
        # fp16: 16 steps skipped by GradScaler from step 0, then non-finite at a scale of 1: never updated
        ("diverged", [{"epoch": 1, "step": 16, "cause": "non-finite loss", "updates": 0}], None, "fails-at-init"),
        # training finite, the eval-mode validation not
        ("diverged", [{"epoch": 2, "step": 100, "cause": "non-finite validation (eval mode); finite with batch "
                       "statistics: batch-norm running statistics", "updates": 100}], None, "fails-in-eval"),
        ("diverged", [{"epoch": 6, "step": 336, "cause": "non-finite test (eval mode and with batch statistics)"}],
         None, "fails-in-eval"),
        # finite but worse than the uniform density
        ("completed", [], 20.0, "trains-badly"),
        ("completed", [], 8.0, "trains-badly"),
        ("completed", [], math.nan, "trains-badly"),
        ("completed", [], 4.2, "trained"),
        # a recovered run that ends well trained
        ("recovered", [{"epoch": 2, "step": 80, "cause": "non-finite loss", "updates": 80, "action": "restore"}], 4.5,
         "trained"),
        ("interrupted", [], None, None),
        ("skipped", [], None, None),
    ],
)  # fmt: skip
def test_outcome_classification_on_synthetic_histories(outcome, events, final, expected):
    assert classify(outcome, events, final) == expected


def _nan_loss(loss):
    return loss * float("nan")


def test_fp16_nonfinite_loss_is_a_gradscaler_skip_while_the_scale_is_above_one():
    model, x = _model(), _batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    params = list(model.parameters())
    before = _flat(params)
    result = train_step(model, torch.optim.SGD(params, lr=1.0), scaler, x, "fp16", 0.0, [], 100.0, loss_hook=_nan_loss)
    assert result.finite and result.skipped and not math.isfinite(result.loss)
    assert torch.equal(_flat(params), before)  # nothing applied
    assert scaler.get_scale() == 2.0


def test_fp16_nonfinite_step_at_a_scale_of_one_is_a_divergence():
    model, x = _model(), _batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    params = list(model.parameters())
    before = _flat(params)
    result = train_step(model, torch.optim.SGD(params, lr=1.0), scaler, x, "fp16", 0.0, [], 100.0, loss_hook=_nan_loss)
    assert not result.finite and not result.skipped
    assert torch.equal(_flat(params), before)
    assert scaler.get_scale() == 1.0  # the scaler was not stepped


def test_fp32_nonfinite_loss_is_a_divergence():
    model, x = _model(), _batch()
    params = list(model.parameters())
    before = _flat(params)
    result = train_step(model, torch.optim.SGD(params, lr=1.0), None, x, "off", 0.0, [], 100.0, loss_hook=_nan_loss)
    assert not result.finite
    assert torch.equal(_flat(params), before)
