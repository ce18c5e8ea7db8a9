import math

import pytest
import torch

from study.flows.transforms import BatchNormBijector, LogitTransform, checkerboard, squeeze, unsqueeze
from tests.conftest import jacobian_logdet, randomize_


def test_squeeze_moves_each_2x2_block_into_channels():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = squeeze(x)
    assert y.shape == (1, 4, 2, 2)
    # channel 2i + j holds offset (i, j) of each 2x2 block
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert y[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_squeeze_unsqueeze_exact_in_bf16():
    x = torch.randn(2, 3, 8, 8).bfloat16()
    assert torch.equal(unsqueeze(squeeze(x)), x)
    assert torch.equal(squeeze(unsqueeze(squeeze(x))), squeeze(x))


def test_checkerboard_alternates():
    m0, m1 = checkerboard(4, 0), checkerboard(4, 1)
    assert torch.equal(m0 + m1, torch.ones(1, 1, 4, 4))
    assert m0[0, 0, 0, 0] == 1 and m0[0, 0, 0, 1] == 0 and m0[0, 0, 1, 0] == 0
    assert m0.sum() == 8


@pytest.mark.parametrize("form", ["softplus", "log"])
def test_logit_logdet_matches_jacobian_and_closed_form(form):
    t = LogitTransform(alpha=0.05, logdet_form=form)
    x = torch.rand(1, 3, 2, 2, dtype=torch.float64)
    y, ld = t(x)
    assert torch.allclose(ld[0], jacobian_logdet(lambda v: t(v)[0], x), atol=1e-6)
    p = 0.05 + 0.9 * x
    closed = (math.log(0.9) - torch.log(p) - torch.log(1 - p)).sum()
    assert torch.allclose(ld[0], closed, atol=1e-10)
    assert torch.allclose(y, torch.log(p / (1 - p)), atol=1e-12)


def test_logit_forms_agree_and_inverse_exact():
    x = torch.rand(4, 3, 4, 4, dtype=torch.float64)
    a = LogitTransform(0.05, "softplus")
    b = LogitTransform(0.05, "log")
    ya, lda = a(x)
    yb, ldb = b(x)
    assert torch.allclose(ya, yb) and torch.allclose(lda, ldb, atol=1e-9)
    xr, ldi = a.inverse(ya)
    assert torch.allclose(xr, x, atol=1e-12)
    assert torch.allclose(ldi, -lda, atol=1e-9)


def test_logit_input_clamp_does_not_bind_on_valid_data():
    x = torch.tensor([0.0, 1.0 - 1e-9, 0.5], dtype=torch.float64).reshape(1, 3, 1, 1)
    plain, clamped = LogitTransform(0.05), LogitTransform(0.05, clamp=3.0)
    assert torch.equal(plain(x)[0], clamped(x)[0])
    bad = torch.tensor([1.5], dtype=torch.float64).reshape(1, 1, 1, 1)  # outside [0, 1]
    assert clamped(bad)[0].abs().max() <= 3.0 + 1e-12


def test_batchnorm_bijector_eval_logdet_and_inverse():
    bn = randomize_(BatchNormBijector(3).double(), seed=1).eval()
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    y, ld = bn(x)
    assert torch.allclose(ld[0], jacobian_logdet(lambda v: bn(v)[0], x), atol=1e-6)
    xr, ldi = bn.inverse(y)
    assert torch.allclose(xr, x, atol=1e-10) and torch.allclose(ldi, -ld)


def test_batchnorm_bijector_train_normalises_and_tracks_running_stats():
    bn = BatchNormBijector(2, momentum=0.5).double()
    x = torch.randn(64, 2, 4, 4, dtype=torch.float64) * 3 + 1
    y, ld = bn(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-3)
    var = x.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(ld[0], (-0.5 * torch.log(var + bn.eps)).sum() * 16)
    assert torch.allclose(bn.running_mean.flatten(), 0.5 * x.mean(dim=(0, 2, 3)))


def test_batchnorm_bijector_running_statistics_follow_the_momentum_convention():
    """PyTorch's convention (the official code's decay 0.9 is momentum 0.1 here): running <- (1 - m)
    running + m batch, for the mean and the (biased, as used in the forward) variance. At m = 0.1 the
    other convention, running <- m running + (1 - m) batch, gives different numbers."""
    m = 0.1
    bn = BatchNormBijector(2, momentum=m).double()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 2, 4, 4, generator=gen, dtype=torch.float64) * s + o for s, o in ((3, 1), (0.5, -2))]
    mean, var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for x in batches:
        bn(x)
        mean = (1 - m) * mean + m * x.mean(dim=(0, 2, 3))
        var = (1 - m) * var + m * x.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(bn.running_mean.flatten(), mean, atol=1e-12)
    assert torch.allclose(bn.running_var.flatten(), var, atol=1e-12)
    # after the first batch alone: 0.9 * 1 + 0.1 * var (not 0.1 * 1 + 0.9 * var)
    fresh = BatchNormBijector(2, momentum=m).double()
    fresh(batches[0])
    v0 = batches[0].var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(fresh.running_var.flatten(), 0.9 + 0.1 * v0, atol=1e-12)
    assert not torch.allclose(fresh.running_var.flatten(), 0.1 + 0.9 * v0, atol=1e-3)
    bn.eval()
    bn(batches[0])  # eval mode never updates them
    assert torch.allclose(bn.running_mean.flatten(), mean, atol=1e-12)
