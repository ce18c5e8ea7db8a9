"""Timing of the training step and the evaluation pass, as the training loop runs them.

Numbers are medians over timed steps after warm-up, reported as images/s with the spread
(25th-75th percentile), achieved GFLOP/s from torch's FLOP count (forward + backward taken as 3x
the forward), and peak memory. Compare configurations within one run of the same machine.
"""

from __future__ import annotations

import functools
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from experiments.presets import model_sizes
from study.config import Config, apply_values
from study.flows import forward_flops_per_image
from study.memory import peak_memory_mb, reset_peak_memory
from study.model import build_model
from study.run.spec import resolve_device
from study.run.step import Precision, autocast, compile_fn, train_step

SIZES = model_sizes()  # name -> (num_scales, mid_channels, num_blocks), from experiments/presets.py
ARCHS = ("ours", "usual-repro")  # usual-repro: bench.usual_repro, the targets' baseline


@dataclass
class BenchResult:
    arch: str
    size: str
    device: str
    amp: str
    channels_last: bool
    compiled: str  # off, or the torch.compile mode
    batch: int
    train_ips: float  # images/s, median
    train_ips_lo: float  # 25th percentile
    train_ips_hi: float  # 75th percentile
    eval_ips: float
    train_gflops: float  # achieved GFLOP/s in the training step
    peak_memory_mb: float
    params_m: float
    peak_gflops: float = math.nan  # this machine's matmul peak in the step's precision (matmul_peak)

    def row(self) -> dict:
        return {
            "model": self.arch,
            "size": self.size,
            "params M": round(self.params_m, 2),
            "device": self.device,
            "amp": self.amp,
            "channels_last": self.channels_last,
            "compile": self.compiled,
            "batch": self.batch,
            "train img/s": round(self.train_ips, 1),
            "train IQR": f"{self.train_ips_lo:.1f}-{self.train_ips_hi:.1f}",
            "eval img/s": round(self.eval_ips, 1),
            "train GFLOP/s": round(self.train_gflops, 1),
            "of matmul peak": f"{self.train_gflops / self.peak_gflops:.0%}" if self.peak_gflops > 0 else "?",
            "peak MB": round(self.peak_memory_mb),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """25th percentile, median, 75th percentile."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


@dataclass
class Prepared:
    """A model set up for timing: ``step()`` runs one training step exactly as the loop does,
    ``evaluate()`` one evaluation forward pass. bench/optimisations.py wraps these to time
    the "before" of each optimisation."""

    model: torch.nn.Module
    step: Callable[[], object]
    evaluate: Callable[[], object]
    device: torch.device
    flops: float  # forward FLOPs per image
    params_m: float


def bench_model(size: str, arch: str = "ours", image_size: int = 32):
    """(config, model) that bench times at ``size``: the default recipe, or the usual reproduction's
    s/t network shape for ``arch="usual-repro"``."""
    scales, mid, blocks = SIZES[size]
    cfg = apply_values(Config(), {"model.num_scales": scales, "model.mid_channels": mid, "model.num_blocks": blocks})
    model = build_model(cfg, image_size=image_size)
    if arch == "usual-repro":
        from bench.usual_repro import reference_shaped

        model = reference_shaped(model)
    return cfg, model


def prepare(
    size: str = "demo",
    device: str = "auto",
    amp: str = "off",
    channels_last: bool = False,
    compile: str = "off",
    batch: int = 16,
    image_size: int = 32,
    arch: str = "ours",
) -> Prepared:
    """Build a model of ``size`` with its optimizer and a fixed batch. ``compile`` is off or a
    torch.compile mode."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: use one of {', '.join(SIZES)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown model {arch!r}: use one of {', '.join(ARCHS)}")
    if batch < 2:
        raise ValueError("--batch must be >= 2 (batch norm needs a batch)")
    dev = resolve_device(device)
    precision = Precision.create(amp, dev)
    torch.manual_seed(0)
    cfg, model = bench_model(size, arch, image_size)
    model = model.to(dev)
    flops = forward_flops_per_image(model, batch=1)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    # compiling log_prob itself: torch.compile(model) would only compile forward()
    log_prob = model.log_prob if compile == "off" else compile_fn(model.log_prob, compile)
    stepper = SimpleNamespace(log_prob=log_prob)  # all train_step needs of a model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = precision.scaler
    stab = cfg.stabilizers
    l2_params = model.l2_parameters() if stab.l2 > 0 else []
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand((batch, 3, image_size, image_size), generator=gen, device=dev).contiguous(memory_format=fmt)

    def step():
        model.train()
        return train_step(stepper, opt, scaler, x, amp, stab.l2, l2_params, stab.grad_clip or math.inf)

    @torch.no_grad()
    def evaluate():
        model.eval()
        with autocast(amp, dev):
            return log_prob(x)

    return Prepared(model, step, evaluate, dev, flops, params_m)


@functools.cache
def matmul_peak(device: str, amp: str = "off", threads: int | None = None) -> float:  # threads: the cache key
    """GFLOP/s of the best of 10 square matrix products in the step's precision (fp32; bf16 or fp16
    under autocast) with this process's threads: what the machine's BLAS reaches on the most regular
    work there is, the ceiling a training step's GFLOP/s is read against. 1024 x 1024 on a CPU (a few
    ms a product at one thread), 8192 on a GPU."""
    dev = resolve_device(device)
    dtype = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    n = 8192 if dev.type == "cuda" else 1024
    gen = torch.Generator(device=dev).manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen, device=dev).to(dtype) for _ in range(2))
    best = math.inf
    for i in range(13):
        _sync(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(dev)
        if i >= 3:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def time_calls(fn: Callable[[], object], device: torch.device, steps: int, warmup: int = 2) -> list[float]:
    """Seconds per call of ``fn`` for ``steps`` calls after ``warmup`` untimed ones."""
    if steps < 1 or warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bench(
    size: str = "demo",
    device: str = "auto",
    amp: str = "off",
    channels_last: bool = False,
    compile: str = "off",
    batch: int = 16,
    steps: int = 5,
    warmup: int = 2,
    image_size: int = 32,
    arch: str = "ours",
) -> BenchResult:
    """Time one configuration: the training step, then the evaluation pass."""
    dev = resolve_device(device)
    reset_peak_memory(dev)
    p = prepare(size, device, amp, channels_last, compile, batch, image_size, arch)
    lo, mid_ips, hi = quartiles(sorted(batch / t for t in time_calls(p.step, dev, steps, warmup)))
    eval_ips = batch / statistics.median(time_calls(p.evaluate, dev, steps, warmup))
    return BenchResult(
        arch, size, str(dev), amp, channels_last, compile, batch, mid_ips, lo, hi, eval_ips,
        3 * p.flops * mid_ips / 1e9, peak_memory_mb(dev), p.params_m,
        matmul_peak(str(dev), amp, torch.get_num_threads()),
    )  # fmt: skip


MATRIX = [  # the useful combinations on a CPU; a GPU adds fp16
    ("off", False),
    ("off", True),
    ("bf16", False),
    ("bf16", True),
]


def matrix(size: str, device: str, batch: int, steps: int, compile: str = "off") -> list[BenchResult]:
    """The usual reproduction's shape in fp32 first (the baseline of the targets), then ours in every
    useful precision x memory format."""
    dev = resolve_device(device)
    combos = MATRIX + ([("fp16", True)] if dev.type == "cuda" else [])
    baseline = bench(size, device, "off", False, "off", batch, steps, arch="usual-repro")
    return [baseline] + [bench(size, device, amp, cl, compile, batch, steps) for amp, cl in combos]


CPUINFO = "/proc/cpuinfo"


def machine(device: str | torch.device) -> str:
    """What a timing was measured on: the GPU's name, or the CPU's model with its bf16 instructions
    and torch's thread count; then torch's version. bf16 speed-ups depend on the CPU's bf16 units
    (AMX-BF16 or only AVX512-BF16), so rates and ratios from different machines are not comparable."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":  # the first processor's entry is enough
                    flags = set(value.split())
                    break
    except OSError:  # not Linux: the model from platform, flags unknown
        pass
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["no bf16 instructions"]
    return f"{model} ({', '.join(bf16)}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def table(results: list[BenchResult]):
    """The results as a DataFrame; with a usual-repro row, each row's training rate relative to it."""
    import pandas as pd

    df = pd.DataFrame([r.row() for r in results])
    base = [r.train_ips for r in results if r.arch == "usual-repro"]
    if base:
        df["x usual-repro"] = [round(r.train_ips / base[0], 2) for r in results]
    return df


def log_results(results: list[BenchResult], store, experiment: str = "bench") -> str:
    """Record a bench table as one MLflow run: the machine and torch as tags, one metric per
    combination and quantity (e.g. ``bf16_cl.train_ips``) in ``store`` (study.store.Store). Returns the
    run id."""
    from study import schema

    exp_id = store.open_experiment(experiment)
    first = results[0]
    tags = {schema.KIND: schema.KIND_BENCH, schema.SIZE: first.size, schema.DEVICE: first.device,
            schema.TORCH_VERSION: torch.__version__, schema.THREADS: torch.get_num_threads(),
            schema.MACHINE: machine(first.device)}  # fmt: skip
    params = {"batch": first.batch, "params_m": f"{first.params_m:.3f}"}
    run_id = store.create_run(exp_id, f"bench-{first.size}-{first.device}", tags, params)
    metrics = []
    for r in results:
        name = f"{r.arch}.{r.amp}{'_cl' if r.channels_last else ''}{'' if r.compiled == 'off' else '_' + r.compiled}"
        for key in ("train_ips", "train_ips_lo", "train_ips_hi", "eval_ips", "train_gflops", "peak_gflops",
                    "peak_memory_mb"):  # fmt: skip
            metrics.append((f"{name}.{key}", float(getattr(r, key)), 0, 0))
    store.log_metric_rows(run_id, metrics)
    store.set_status(run_id, "FINISHED")
    return run_id
