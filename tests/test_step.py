"""The training step against independent computations: clipping, non-finite gradients, L2, AMP,
the learning-rate schedule, and the global RNG."""

from __future__ import annotations

import math

import pytest
import torch

from study.flows import FlowOptions, RealNVP
from study.run.step import lr_at, train_step


def _model(seed: int = 0, **stab) -> RealNVP:
    torch.manual_seed(seed)
    defaults = {"zero_init": False, "scale_fn": "tanh"}
    return RealNVP(3, 2, 4, 1, FlowOptions(**{**defaults, **stab}), image_size=8).train()


def _batch(n: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in params])


def _reference_grad(model: RealNVP, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The raw gradient of the mean NLL (no L2) computed on a copy by plain autograd, and its norm."""
    import copy

    twin = copy.deepcopy(model)
    loss = -twin.log_prob(x).mean()
    grads = torch.autograd.grad(loss, list(twin.parameters()), allow_unused=True)
    flat = torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, twin.parameters(), strict=True)
    ])  # fmt: skip
    return flat, flat.norm().item()


def _sgd_update(model: RealNVP, x: torch.Tensor, max_norm: float, **kw):
    """Run train_step with SGD at lr 1, so the applied update *is* the (clipped) gradient."""
    params = list(model.parameters())
    before = _flat(params)
    opt = torch.optim.SGD(params, lr=1.0)
    result = train_step(model, opt, None, x, "off", 0.0, [], max_norm, **kw)
    return result, before - _flat(params)


@pytest.mark.parametrize("ratio", [0.25, 0.9])
def test_clipping_scales_the_gradient_down_to_the_threshold(ratio):
    model, x = _model(), _batch()
    raw, norm = _reference_grad(model, x)
    result, update = _sgd_update(model, x, max_norm=ratio * norm)
    assert math.isclose(result.grad_norm, norm, rel_tol=1e-5)  # reported before clipping
    assert math.isclose(update.norm().item(), ratio * norm, rel_tol=1e-4)
    assert torch.allclose(update, raw * ratio, rtol=1e-3, atol=1e-7)  # same direction, scaled


def test_clipping_leaves_a_gradient_below_the_threshold_alone():
    model, x = _model(), _batch()
    raw, norm = _reference_grad(model, x)
    _, update = _sgd_update(model, x, max_norm=2.0 * norm)
    assert torch.allclose(update, raw, rtol=1e-4, atol=1e-7)
    _, unclipped = _sgd_update(_model(), x, max_norm=math.inf)
    assert torch.allclose(unclipped, raw, rtol=1e-4, atol=1e-7)


def test_non_finite_gradient_with_finite_loss_is_not_applied_and_is_reported():
    model, x = _model(), _batch()
    victim = next(p for n, p in model.named_parameters() if n.endswith("inp.bias"))
    handle = victim.register_hook(lambda g: g * float("inf"))
    params = list(model.parameters())
    before = _flat(params)
    opt = torch.optim.Adam(params, lr=1e-3)
    result = train_step(model, opt, None, x, "off", 0.0, [], 100.0)
    handle.remove()
    assert math.isfinite(result.loss) and math.isfinite(result.nll)
    assert not result.finite and not math.isfinite(result.grad_norm)
    assert torch.equal(_flat(params), before)  # nothing applied
    assert not opt.state  # Adam's moments were not touched either


def test_l2_enters_the_loss_as_half_l2_times_the_sum_of_squares():
    model, x = _model(), _batch()
    l2 = 0.37
    targets = model.l2_parameters()
    by_hand = 0.5 * l2 * sum(float((p.detach().double() ** 2).sum()) for p in targets)
    nll = -model.log_prob(x).mean().item()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    result = train_step(model, opt, None, x, "off", l2, targets, math.inf)
    assert math.isclose(result.nll, nll, rel_tol=1e-6)
    assert math.isclose(result.loss - result.nll, by_hand, rel_tol=1e-4)
    # and its gradient reaches exactly the penalised parameters: l2 * p on top of the NLL's
    model2 = _model()
    raw, _ = _reference_grad(model2, x)
    _, update = _sgd_update(model2, x, max_norm=math.inf)  # no L2: the raw gradient
    model3 = _model()
    params = list(model3.parameters())
    before = _flat(params)
    opt3 = torch.optim.SGD(params, lr=1.0)
    train_step(model3, opt3, None, x, "off", l2, model3.l2_parameters(), math.inf)
    penalty = torch.cat([
        (l2 * p.detach() if any(p is q for q in model3.l2_parameters()) else torch.zeros_like(p)).reshape(-1)
        for p in params
    ])  # fmt: skip
    penalty_before = torch.cat([
        (l2 * b if any(p is q for q in model3.l2_parameters()) else torch.zeros_like(b)).reshape(-1)
        for p, b in zip(params, torch.split(before, [p.numel() for p in params]), strict=True)
    ])  # fmt: skip
    assert penalty.abs().sum() > 0
    assert torch.allclose(before - _flat(params), raw + penalty_before, rtol=1e-3, atol=1e-6)
    assert torch.allclose(update, raw, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_matches_the_fp32_step_within_tolerance(amp):
    x = _batch(16)
    fp32 = _model()
    before = _flat(fp32.parameters())
    ref = train_step(fp32, torch.optim.SGD(fp32.parameters(), lr=1e-4), None, x, "off", 0.0, [], 100.0)
    ref_update = before - _flat(fp32.parameters())
    low = _model()
    # a scale that does not overflow fp16 at this loss (the default 2^16 skips the first steps)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if amp == "fp16" else None
    got = train_step(low, torch.optim.SGD(low.parameters(), lr=1e-4), scaler, x, amp, 0.0, [], 100.0)
    update = before - _flat(low.parameters())
    assert got.finite and not got.skipped
    # the loss comes from an fp16/bf16 forward: within 1% (bf16 keeps 8 mantissa bits)
    assert math.isclose(got.nll, ref.nll, rel_tol=1e-2)
    assert math.isclose(got.grad_norm, ref.grad_norm, rel_tol=5e-2)  # unscaled before it is measured
    # the applied update: same direction and size as fp32's within a few percent
    cosine = torch.nn.functional.cosine_similarity(update, ref_update, dim=0).item()
    assert cosine > 0.99 and math.isclose(update.norm().item(), ref_update.norm().item(), rel_tol=5e-2)


def test_fp16_overflow_is_skipped_by_the_scaler_not_applied():
    model, x = _model(), _batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    victim = next(p for n, p in model.named_parameters() if n.endswith("inp.bias"))
    handle = victim.register_hook(lambda g: g * float("inf"))  # what an fp16 overflow looks like
    params = list(model.parameters())
    before = _flat(params)
    result = train_step(model, torch.optim.SGD(params, lr=1.0), scaler, x, "fp16", 0.0, [], 100.0)
    handle.remove()
    assert result.finite and result.skipped  # a skipped step, not a divergence
    assert torch.equal(_flat(params), before)
    assert scaler.get_scale() == 2.0**15  # halved


def test_warmup_schedule_values():
    base, warm = 1e-3, 4
    by_hand = [base * 1 / 4, base * 2 / 4, base * 3 / 4, base, base, base]
    assert [lr_at(s, base, warm) for s in range(6)] == pytest.approx(by_hand, rel=1e-12)
    assert lr_at(0, base, 0) == base and lr_at(7, base, 0, factor=0.25) == base / 4


def test_step_and_evaluation_never_draw_from_the_global_rng():
    """Resume does not need torch's global RNG: after set-up nothing draws from it (data, noise and
    sampling use their own generators). Checkpoints still store it, which costs nothing."""
    from study.data import train_batches
    from study.run.step import evaluate

    model = _model()
    images = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    state = torch.get_rng_state()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x in train_batches(images, 8, gen):
        train_step(model, opt, None, x, "off", 5e-5, model.l2_parameters(), 100.0)
    evaluate(model, images, 10)
    assert torch.equal(torch.get_rng_state(), state)
