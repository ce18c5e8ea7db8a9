"""Before/after timing of each speed optimisation of the training step, in one process.

    .venv/bin/python -m bench.optimisations [--preset paper] [--device cpu] [--batch 16] [--steps 4]

Each row times the same training step (forward, backward, clip, Adam; bench.timing.prepare) without
and with one optimisation, alternating one step of each, so the ratio is measured on the same machine
in the same run under the same conditions:

- usual-repro -> ours: the usual reproduction's s/t network shape (bench.usual_repro) -> ours;
- host syncs: a NaN check with a host sync after every coupling (as the usual reproduction) -> one
  sync per step (study.run.step.train_step);
- channels_last, bf16 autocast: off -> on;
- weight-norm caching: ``parametrize.cached()`` around the step (kept out: see the result);
- torch.compile (at the small size: a cold compile of the paper size takes minutes on a CPU);
- data path: a DataLoader over float images with per-image flips -> the uint8 set on the device with
  whole-batch flips and dequantization (study.data.train_batches), images/s of the data alone.

Prints a Markdown table for the README.
"""

import argparse
import sys
import time

import torch
from torch.nn.utils import parametrize

from bench.timing import SIZES, machine, prepare, quartiles, time_calls
from study.flows.coupling import _Coupling

ROWS = []


def spread(rates: list[float]) -> tuple[float, str]:
    """Median and the 25th-75th percentile as text."""
    lo, mid, hi = quartiles(rates)
    return mid, f"{lo:.1f}-{hi:.1f}"


def row(name: str, before: tuple[float, str], after: tuple[float, str], unit: str, note: str) -> None:
    ROWS.append((name, before, after, unit, note))
    print(f"{name}: {before[0]:.1f} -> {after[0]:.1f} {unit} (x{after[0] / before[0]:.2f})", file=sys.stderr,
          flush=True)  # fmt: skip


def pair(args, before, after, steps=None) -> tuple[float, float]:
    """Training images/s of two prepared steps, timed alternately (one step each per round after two
    warm-up rounds) so that drift in the machine's speed hits both alike."""
    for fn in (before, after) * 2:
        fn()
    times = {before: [], after: []}
    for _ in range(steps or args.steps):
        for fn in (before, after):
            times[fn] += time_calls(fn, torch.device(args.device), 1, warmup=0)
    return spread([args.batch / t for t in times[before]]), spread([args.batch / t for t in times[after]])


def step(args, **kw):
    return prepare(args.size, args.device, batch=args.batch, **kw).step


def sync_per_coupling(args):
    p = prepare(args.size, args.device, batch=args.batch)

    def check(_module, _inputs, output):  # the usual reproduction's per-coupling NaN check
        if torch.isnan(output[0]).any():
            raise RuntimeError("NaN")

    for m in p.model.modules():
        if isinstance(m, _Coupling):
            m.register_forward_hook(check)
    return p.step


def cached_weight_norm(args):
    p = prepare(args.size, args.device, batch=args.batch)

    def cached_step():
        with parametrize.cached():
            p.step()

    return cached_step


def data_path(args):
    """Images/s of one epoch of batches, DataLoader vs device-resident (data only, no model)."""
    from torch.utils.data import DataLoader, Dataset

    from study.data import train_batches

    device = torch.device(args.device)
    images = torch.randint(0, 256, (4000, 3, 32, 32), dtype=torch.uint8)  # the CIFAR-10 slice's shape
    gen = torch.Generator(device=device).manual_seed(0)

    class Flipped(Dataset):  # the common torchvision-style pipeline: per-image transform in __getitem__
        def __init__(self, data):
            self.data = data.float() / 255

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            x = self.data[i]
            return x.flip(-1) if torch.rand(()) < 0.5 else x

    loader = DataLoader(Flipped(images), batch_size=64, shuffle=True, drop_last=True)

    def before():
        for x in loader:
            x = x.to(device)
            x = (x * 255 + torch.rand(x.shape, generator=gen, device=device)) / 256

    on_device = images.to(device)

    def after():
        for _x in train_batches(on_device, 64, gen):
            pass

    n = 4000 // 64 * 64
    return tuple(spread([n / t for t in time_calls(fn, device, 3, 1)]) for fn in (before, after))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", dest="size", default="paper", choices=list(SIZES), help="the model size to time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--compile-size", default="small", choices=[*SIZES, "none"],
                        help="size of the torch.compile row (none: leave it out)")  # fmt: skip
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    row("model: usual-repro shape -> ours", *pair(args, step(args, arch="usual-repro"), step(args)), "img/s", "fp32")
    row("host syncs: one per coupling -> one per step", *pair(args, sync_per_coupling(args), step(args)), "img/s",
        "fp32")  # fmt: skip
    row("channels_last", *pair(args, step(args), step(args, channels_last=True)), "img/s", "fp32")
    row("bf16 autocast", *pair(args, step(args), step(args, amp="bf16")), "img/s", "contiguous")
    row("bf16 autocast + channels_last", *pair(args, step(args), step(args, amp="bf16", channels_last=True)), "img/s",
        "vs fp32 contiguous")  # fmt: skip
    row("weight-norm caching (not kept)", *pair(args, step(args), cached_weight_norm(args)), "img/s",
        "parametrize.cached() per step")  # fmt: skip
    small = argparse.Namespace(**{**vars(args), "size": args.compile_size})
    if args.compile_size != "none":
        row(f"torch.compile ({args.compile_size} size)", *pair(small, step(small), step(small, compile="default")),
            "img/s", "steady state, after a cold compile")  # fmt: skip
    before, after = data_path(args)
    row("data path: DataLoader -> device-resident batches", before, after, "img/s", "data only, batch 64")

    print(f"\n{args.size} size, batch {args.batch}, {machine(args.device)}, "
          f"{args.steps} timed steps after 2 warm-up ({time.perf_counter() - t0:.0f} s in all)\n")  # fmt: skip
    print("| optimisation | before (IQR) | after (IQR) | after/before | note |")
    print("|---|---:|---:|---:|---|")
    for name, b, a, unit, note in ROWS:
        print(f"| {name} | {b[0]:.1f} ({b[1]}) {unit} | {a[0]:.1f} ({a[1]}) {unit} | {a[0] / b[0]:.2f} | {note} |")


if __name__ == "__main__":
    main()
