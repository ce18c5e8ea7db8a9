"""Timing of the training step and the evaluation pass, as the training loop runs them.

Numbers are medians over timed steps after warm-up, reported as images/s with the spread
(25th-75th percentile), achieved GFLOP/s from torch's FLOP count (forward + backward taken as 3x
the forward), and peak memory. Compare configurations within one run of the same machine.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from study.config import Config, apply_values
from study.flows import build_model, forward_flops_per_image
from study.training import autocast, check_amp, resolve_device, train_step

SIZES = {  # (num_scales, mid_channels, num_blocks)
    "paper": (2, 64, 8),
    "small": (2, 32, 2),
    "demo": (2, 8, 1),
}


@dataclass
class BenchResult:
    size: str
    device: str
    amp: str
    channels_last: bool
    compiled: bool
    batch: int
    train_ips: float  # images/s, median
    train_ips_lo: float  # 25th percentile
    train_ips_hi: float  # 75th percentile
    eval_ips: float
    train_gflops: float  # achieved GFLOP/s in the training step
    peak_memory_mb: float
    params_m: float

    def row(self) -> dict:
        return {
            "size": self.size,
            "device": self.device,
            "amp": self.amp,
            "channels_last": self.channels_last,
            "compile": self.compiled,
            "batch": self.batch,
            "train img/s": round(self.train_ips, 1),
            "train IQR": f"{self.train_ips_lo:.1f}-{self.train_ips_hi:.1f}",
            "eval img/s": round(self.eval_ips, 1),
            "train GFLOP/s": round(self.train_gflops, 1),
            "peak MB": round(self.peak_memory_mb),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def bench(
    size: str = "demo",
    device: str = "auto",
    amp: str = "off",
    channels_last: bool = False,
    compile: bool = False,
    batch: int = 16,
    steps: int = 5,
    warmup: int = 2,
    image_size: int = 32,
) -> BenchResult:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: use one of {', '.join(SIZES)}")
    if batch < 2 or steps < 1 or warmup < 0:
        raise ValueError("--batch must be >= 2, --steps >= 1 and --warmup >= 0")
    dev = resolve_device(device)
    check_amp(amp, dev)
    scales, mid, blocks = SIZES[size]
    cfg = apply_values(Config(), {"model.num_scales": scales, "model.mid_channels": mid, "model.num_blocks": blocks})
    torch.manual_seed(0)
    model = build_model(cfg, image_size=image_size).to(dev)
    flops = forward_flops_per_image(model, batch=1)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    # compiling log_prob itself: torch.compile(model) would only compile forward()
    log_prob = torch.compile(model.log_prob) if compile else model.log_prob
    stepper = SimpleNamespace(log_prob=log_prob)  # all train_step needs of a model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    l2_params = model.l2_parameters()
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand((batch, 3, image_size, image_size), generator=gen, device=dev).contiguous(memory_format=fmt)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    # the training step exactly as the loop runs it
    times = []
    for i in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        train_step(stepper, opt, scaler, x, amp, 5e-5, l2_params, 100.0)
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    lo, mid_ips, hi = _quartiles(sorted(batch / t for t in times))

    model.eval()
    eval_times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            _sync(dev)
            t0 = time.perf_counter()
            with autocast(amp, dev):
                log_prob(x)
            _sync(dev)
            if i >= warmup:
                eval_times.append(time.perf_counter() - t0)
    eval_ips = batch / statistics.median(eval_times)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return BenchResult(
        size, str(dev), amp, channels_last, compile, batch, mid_ips, lo, hi, eval_ips,
        3 * flops * mid_ips / 1e9, peak, params_m,
    )  # fmt: skip


MATRIX = [  # the useful combinations on a CPU; a GPU adds fp16
    ("off", False),
    ("off", True),
    ("bf16", False),
    ("bf16", True),
]


def matrix(size: str, device: str, batch: int, steps: int, compile: bool = False) -> list[BenchResult]:
    dev = resolve_device(device)
    combos = MATRIX + ([("fp16", True)] if dev.type == "cuda" else [])
    return [bench(size, device, amp, cl, compile, batch, steps) for amp, cl in combos]


def log_results(results: list[BenchResult], tracking_uri: str | None, experiment: str = "bench") -> str:
    """Record a bench table as one MLflow run: the machine and torch as tags, one metric per
    combination and quantity (e.g. ``bf16_cl.train_ips``). Returns the run id."""
    import platform

    import mlflow
    from mlflow.entities import Metric, Param

    from study.tracking import git_commit, setup

    setup(tracking_uri, experiment)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    first = results[0]
    tags = {"kind": "bench", "size": first.size, "device": first.device, "torch_version": torch.__version__,
            "threads": str(torch.get_num_threads()), "machine": platform.processor() or platform.machine(),
            "git_commit": git_commit()}  # fmt: skip
    run = client.create_run(exp.experiment_id, tags=tags, run_name=f"bench-{first.size}-{first.device}")
    metrics = []
    for r in results:
        name = f"{r.amp}{'_cl' if r.channels_last else ''}{'_compile' if r.compiled else ''}"
        for key in ("train_ips", "train_ips_lo", "train_ips_hi", "eval_ips", "train_gflops", "peak_memory_mb"):
            metrics.append(Metric(f"{name}.{key}", float(getattr(r, key)), 0, 0))
    params = [Param("batch", str(first.batch)), Param("params_m", f"{first.params_m:.3f}")]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id
