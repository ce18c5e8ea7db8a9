import pytest
import torch

from study.flows import FlowOptions
from study.flows.coupling import ChannelCoupling, CheckerboardCoupling, ScaleFunction
from tests.conftest import SCALE_FNS, jacobian_logdet, randomize_

CLAMPS = [(0.0, "hard"), (0.5, "hard"), (0.5, "soft")]


def _coupling(kind, stab, parity=0):
    if kind == "checker":
        c = CheckerboardCoupling(3, 4, parity, mid_channels=4, num_blocks=1, stab=stab)
        x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    else:
        c = ChannelCoupling(4, parity, mid_channels=4, num_blocks=1, stab=stab)
        x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    return randomize_(c.double(), seed=parity + 3).eval(), x


@pytest.mark.parametrize("kind", ["checker", "channel"])
@pytest.mark.parametrize("scale_fn", SCALE_FNS)
@pytest.mark.parametrize("clamp,clamp_kind", CLAMPS)
@pytest.mark.parametrize("parity", [0, 1])
def test_logdet_equals_slogdet_of_jacobian_and_inverse_recovers(kind, scale_fn, clamp, clamp_kind, parity):
    stab = FlowOptions(scale_fn=scale_fn, s_clamp=clamp, s_clamp_kind=clamp_kind, zero_init=False)
    c, x = _coupling(kind, stab, parity)
    y, ld = c(x)
    assert torch.allclose(ld[0], jacobian_logdet(lambda v: c(v)[0], x), atol=1e-6)
    xr, ldi = c.inverse(y)
    assert torch.allclose(xr, x, atol=1e-6)
    assert torch.allclose(ldi, -ld, atol=1e-9)
    assert ld.abs().item() > 1e-3  # the coupling really scales something


@pytest.mark.parametrize("kind", ["checker", "channel"])
@pytest.mark.parametrize("parity", [0, 1])
def test_conditioning_half_is_never_changed(kind, parity):
    c, x = _coupling(kind, FlowOptions(zero_init=False), parity)
    x = x.repeat(2, 1, 1, 1) + torch.randn(2, *x.shape[1:], dtype=torch.float64)
    y = c(x)[0]
    if kind == "checker":
        b = c.mask.bool().expand_as(x)
        assert torch.equal(y[b], x[b])
        assert not torch.allclose(y[~b], x[~b])
    else:
        half = x.shape[1] // 2
        keep = slice(0, half) if parity == 0 else slice(half, None)
        change = slice(half, None) if parity == 0 else slice(0, half)
        assert torch.equal(y[:, keep], x[:, keep])
        assert not torch.allclose(y[:, change], x[:, change])


@pytest.mark.parametrize("kind", ["checker", "channel"])
@pytest.mark.parametrize("scale_fn", SCALE_FNS)
@pytest.mark.parametrize("weight_norm", [True, False])
def test_zero_initialised_coupling_is_identity(kind, scale_fn, weight_norm):
    stab = FlowOptions(scale_fn=scale_fn, zero_init=True, weight_norm=weight_norm)
    if kind == "checker":
        c = CheckerboardCoupling(3, 4, 0, 4, 1, stab).double()
        x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    else:
        c = ChannelCoupling(4, 0, 4, 1, stab).double()
        x = torch.randn(5, 4, 2, 2, dtype=torch.float64)
    y, ld = c(x)
    assert torch.allclose(y, x, atol=1e-12)
    assert torch.allclose(ld, torch.zeros(5, dtype=torch.float64), atol=1e-9)


def test_scale_functions_closed_forms():
    h = torch.linspace(-30, 30, 61, dtype=torch.float64).reshape(1, 1, 61, 1)
    exp = ScaleFunction(1, FlowOptions(scale_fn="exp"))
    assert torch.equal(exp(h), h)
    tanh = ScaleFunction(1, FlowOptions(scale_fn="tanh")).double()
    with torch.no_grad():
        tanh.rescale.fill_(2.0)
    assert torch.allclose(tanh(h), 2.0 * torch.tanh(h))
    sp = ScaleFunction(1, FlowOptions(scale_fn="softplus", softplus_eps=1e-3))
    s = sp(h)
    assert torch.isfinite(s).all()
    assert s.min() >= torch.log(torch.tensor(1e-3, dtype=torch.float64)) - 1e-12  # bounded below
    assert torch.all(s[..., 1:, :] >= s[..., :-1, :])  # monotone in h
    assert abs(sp(torch.zeros(1, 1, 1, 1, dtype=torch.float64)).item()) < 1e-12
    hard = ScaleFunction(1, FlowOptions(scale_fn="exp", s_clamp=2.0, s_clamp_kind="hard"))
    soft = ScaleFunction(1, FlowOptions(scale_fn="exp", s_clamp=2.0, s_clamp_kind="soft"))
    assert hard(h).abs().max() == 2.0
    assert soft(h).abs().max() < 2.0
    assert torch.allclose(soft(h), 2.0 * 2 / torch.pi * torch.atan(h / 2.0))
