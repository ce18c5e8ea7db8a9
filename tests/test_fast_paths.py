"""The fast paths (channels_last, bf16 autocast, torch.compile) compute the same likelihood as the
eager fp32 path, within stated tolerances in bits/dim."""

import torch

from study.flows import FlowOptions, RealNVP
from study.metrics import bits_per_dim
from study.run.step import autocast

# stated tolerances on bits/dim (a 3x32x32 image; ~0.01 bpd is far below seed-to-seed spread)
TOL = {"channels_last": 1e-5, "bf16": 2e-2, "compile": 1e-4}


def _model_and_data():
    torch.manual_seed(0)
    model = RealNVP(3, 2, 8, 1, FlowOptions(zero_init=False, bn_bijector=True), image_size=32)
    x = (torch.randint(0, 256, (8, 3, 32, 32)).float() + torch.rand(8, 3, 32, 32)) / 256
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(3):  # move off the initialisation so batch-norm statistics are not trivial
        opt.zero_grad()
        (-model.log_prob(x).mean()).backward()
        opt.step()
    return model.eval(), x


def _bpd(model, x, amp="off"):
    with torch.no_grad(), autocast(amp, x.device):
        return bits_per_dim(model.log_prob(x).double(), model.num_dims)


def test_channels_last_matches_eager():
    model, x = _model_and_data()
    ref = _bpd(model, x)
    cl = model.to(memory_format=torch.channels_last)
    assert torch.allclose(_bpd(cl, x.contiguous(memory_format=torch.channels_last)), ref, atol=TOL["channels_last"])


def test_bf16_autocast_matches_eager_and_keeps_logdet_fp32():
    model, x = _model_and_data()
    ref = _bpd(model, x)
    with torch.no_grad(), autocast("bf16", x.device):
        z, log_det = model(x)
        lp = model.log_prob(x)
    assert log_det.dtype == torch.float32 and lp.dtype == torch.float32
    assert torch.allclose(_bpd(model, x, "bf16"), ref, atol=TOL["bf16"])


# a cold torch.compile takes about a minute on 2 CPU cores
def test_compiled_log_prob_matches_eager():
    model, x = _model_and_data()
    ref = _bpd(model, x)
    compiled = torch.compile(model.log_prob)
    with torch.no_grad():
        out = bits_per_dim(compiled(x).double(), model.num_dims)
    assert torch.allclose(out, ref, atol=TOL["compile"])
