import math
import re

import pytest
import torch

from study.flows import FlowOptions, RealNVP, forward_flops_per_image, num_parameters
from study.metrics import bits_per_dim
from tests.conftest import SCALE_FNS, jacobian_logdet, randomize_


def tiny(scale_fn="tanh", bn_bijector=False, size=4, num_scales=2, **kw):
    stab = FlowOptions(scale_fn=scale_fn, bn_bijector=bn_bijector, zero_init=False, **kw)
    model = RealNVP(3, num_scales=num_scales, mid_channels=4, num_blocks=1, options=stab, image_size=size)
    return randomize_(model.double(), scale=0.2).eval()


def dequantized(n, size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, size, size), generator=gen).double()
    return (pixels + torch.rand(pixels.shape, generator=gen, dtype=torch.float64)) / 256


@pytest.mark.parametrize("scale_fn", SCALE_FNS)
@pytest.mark.parametrize("bn_bijector", [False, True])
@pytest.mark.parametrize("size,num_scales", [(4, 2), (8, 3)])
def test_model_logdet_is_slogdet_of_jacobian(scale_fn, bn_bijector, size, num_scales):
    model = tiny(scale_fn, bn_bijector, size=size, num_scales=num_scales)
    x = dequantized(1, size)
    z, ld = model(x)
    assert z.shape == x.shape and ld.shape == (1,)
    assert torch.allclose(ld[0], jacobian_logdet(lambda v: model(v)[0], x), atol=1e-6)


@pytest.mark.parametrize("scale_fn", SCALE_FNS)
@pytest.mark.parametrize("bn_bijector", [False, True])
def test_inverse_recovers_input_and_logdets_cancel(scale_fn, bn_bijector):
    model = tiny(scale_fn, bn_bijector, size=8, num_scales=2)
    x = dequantized(3, 8)
    z, ld = model(x)
    xr, ld_inv = model.inverse_with_logdet(z)
    assert torch.allclose(xr, x, atol=1e-6)
    assert torch.allclose(ld_inv, -ld, atol=1e-6)
    assert torch.allclose(model.inverse(z), x, atol=1e-6)


def test_log_prob_is_normal_density_plus_slogdet_and_nothing_else():
    model = tiny("softplus", True)
    x = dequantized(1)
    z = model(x)[0]
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
    expected = normal + jacobian_logdet(lambda v: model(v)[0], x)
    assert torch.allclose(model.log_prob(x)[0], expected, atol=1e-6)


def test_zero_initialised_model_is_the_logit_transform():
    model = RealNVP(3, 2, 4, 1, FlowOptions(zero_init=True), image_size=4).double().eval()
    x = dequantized(2)
    z, ld = model(x)
    p = 0.05 + 0.9 * x
    # squeeze/split/unsqueeze is a permutation that the reassembly undoes: z is the logit itself
    assert torch.allclose(z, torch.log(p / (1 - p)), atol=1e-12)
    closed = (math.log(0.9) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
    assert torch.allclose(ld, closed, atol=1e-9)


def test_eval_log_prob_does_not_depend_on_the_rest_of_the_batch():
    model = tiny("tanh", True, st_batchnorm=True)
    x = dequantized(5)
    alone = torch.cat([model.log_prob(x[i : i + 1]) for i in range(5)])
    together = model.log_prob(x)
    other = model.log_prob(torch.cat([x[:1], dequantized(4, seed=9)]))
    assert torch.allclose(alone, together, atol=1e-9)
    assert torch.allclose(other[0], together[0], atol=1e-9)


# Per-channel constants added before a train-mode batch norm are cancelled by its mean subtraction,
# so the biases of the s/t convolutions that feed one (inp, conv1, conv2: every path from them to the
# output passes a BatchNorm2d) have a true gradient of exactly zero. Anything they get is rounding.
BEFORE_BATCHNORM = re.compile(r"\.net\.(inp|blocks\.\d+\.conv[12])\.bias$")


@pytest.mark.parametrize("scale_fn", SCALE_FNS)
@pytest.mark.parametrize("weight_norm", [True, False])
@pytest.mark.parametrize("st_batchnorm", [True, False])
def test_every_parameter_receives_a_gradient(scale_fn, weight_norm, st_batchnorm):
    torch.manual_seed(0)
    stab = FlowOptions(scale_fn=scale_fn, weight_norm=weight_norm, st_batchnorm=st_batchnorm, bn_bijector=True,
                       zero_init=False)  # fmt: skip
    # random, seeded values everywhere: at the zero/one initialisation some gradients vanish by symmetry
    model = randomize_(RealNVP(3, 2, 4, 1, stab, image_size=4).double(), seed=3, scale=0.2).train()
    x = dequantized(8)
    (-model.log_prob(x).mean()).backward()
    structural = 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if st_batchnorm and BEFORE_BATCHNORM.search(name):
            structural += 1
            assert p.grad.abs().max() < 1e-10, name  # exactly zero but for float64 rounding
        else:
            assert p.grad.abs().max() > 1e-7, name  # a real gradient, far above rounding
    assert structural == (30 if st_batchnorm else 0)  # 10 couplings x (inp, conv1, conv2)


def test_temperature_scales_the_spread_of_samples_before_clamping():
    # a zero-initialised model is the identity after the logit, so logit-space samples are z * T exactly
    model = RealNVP(3, 2, 4, 1, FlowOptions(zero_init=True), image_size=8).double().eval()
    draws = {}
    for t in (1.0, 0.5):
        x = model.sample(256, temperature=t, generator=torch.Generator().manual_seed(0), clamp=False)
        p = 0.05 + 0.9 * x
        draws[t] = torch.log(p) - torch.log1p(-p)
    assert torch.allclose(draws[0.5], 0.5 * draws[1.0], atol=1e-9)
    assert (draws[1.0].abs() > 2.95).any()  # some samples fall outside [0, 1]: clamping would hide them
    # a trained-looking (random) model: lower temperature, smaller spread of unclamped pixels
    rand = tiny("tanh", size=8)
    spread = {t: rand.sample(256, t, torch.Generator().manual_seed(0), clamp=False).std().item() for t in (1.0, 0.5)}
    assert spread[0.5] < 0.8 * spread[1.0]
    clamped = rand.sample(256, 1.0, torch.Generator().manual_seed(0))
    assert clamped.min() >= 0 and clamped.max() <= 1


def test_sample_shape_range_and_mode():
    model = tiny("tanh").float()
    gen = torch.Generator().manual_seed(0)
    s = model.sample(6, temperature=0.7, generator=gen)
    assert s.shape == (6, 3, 4, 4)
    assert s.min() >= 0 and s.max() <= 1
    assert not model.training  # tiny() set eval; sample restores whatever mode it found
    model.train()
    model.sample(2)
    assert model.training


def test_l2_parameters_follow_weight_norm_switch():
    with_wn = RealNVP(3, 2, 4, 1, FlowOptions(weight_norm=True), image_size=4)
    names = {id(p): n for n, p in with_wn.named_parameters()}
    wn = [names[id(p)] for p in with_wn.l2_parameters()]
    assert wn and all(n.endswith("original0") or n.endswith("rescale") for n in wn)
    no_wn = RealNVP(3, 2, 4, 1, FlowOptions(weight_norm=False, scale_fn="exp"), image_size=4)
    names = {id(p): n for n, p in no_wn.named_parameters()}
    plain = [names[id(p)] for p in no_wn.l2_parameters()]
    assert plain and all(n.endswith(".weight") for n in plain)


def test_bad_shape_is_a_clear_error():
    model = RealNVP(3, 2, 4, 1, image_size=8)
    with pytest.raises(ValueError, match=r"expects inputs shaped \(N, 3, 8, 8\)"):
        model(torch.rand(2, 3, 4, 4))
    with pytest.raises(ValueError, match="image_size"):
        RealNVP(3, 3, 4, 1, image_size=6)


def test_paper_size_parameters_and_flops():
    model = RealNVP()  # 2 scales, 64 maps, 8 blocks
    assert 17e6 < num_parameters(model) < 21e6  # the usual reproduction: 19.6 M
    gflop = forward_flops_per_image(model, batch=1) / 1e9
    assert 11 < gflop < 14  # the usual reproduction: 12.9 GFLOP forward


# --- bits/dim ---------------------------------------------------------------------------------


def test_bits_per_dim_of_uniform_density_is_eight():
    assert bits_per_dim(torch.zeros(3), 3072).tolist() == [8.0, 8.0, 8.0]


def test_bits_per_dim_divides_by_dimensions_and_ln2():
    # log p = -D ln 2 nats is one bit per dimension below the uniform density: 9 bits/dim, for any D
    for d in (1, 3, 3072):
        assert math.isclose(bits_per_dim(-d * math.log(2.0), d), 9.0, rel_tol=1e-12)
    # +1000 nats over 3072 dims: 8 - 1000 / (3072 ln 2)
    assert math.isclose(bits_per_dim(1000.0, 3072), 8 - 1000 / (3072 * math.log(2)), rel_tol=1e-12)


def test_bits_per_dim_hand_computed_gaussian():
    # x ~ N(0.5, sigma^2) per dim, D = 2 dims, evaluated at the mean: log p = -D/2 log(2 pi sigma^2)
    sigma, d = 0.1, 2
    log_p = torch.tensor(-d / 2 * math.log(2 * math.pi * sigma**2), dtype=torch.float64)
    expected = (d / 2 * math.log2(2 * math.pi * sigma**2)) / d + 8
    assert abs(bits_per_dim(log_p, d).item() - expected) < 1e-12
    assert abs(expected - (8 + 0.5 * math.log2(2 * math.pi * 0.01))) < 1e-12


def test_model_bits_per_dim_of_identity_flow_is_closed_form():
    # zero-init model: z = logit(p); log p(x) = N(z) + logit log-det, computed here by hand
    model = RealNVP(3, 2, 4, 1, FlowOptions(zero_init=True), image_size=4).double().eval()
    x = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    # p = 0.5, z = 0, log-det per dim = log 0.9 - 2 log 0.5
    per_dim = -0.5 * math.log(2 * math.pi) + math.log(0.9) + 2 * math.log(2)
    expected_bpd = -per_dim / math.log(2) + 8
    assert abs(bits_per_dim(model.log_prob(x), 48).item() - expected_bpd) < 1e-9
