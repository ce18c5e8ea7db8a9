"""The training step's fast paths side by side, in one process: eager, channels_last, torch.compile, both.

    .venv/bin/python -m bench.fast_paths --preset cifar-study --threads 1 --batch 64 --steps 12

One step of each option per round, in turn, so that drift in the machine's speed hits them alike;
each option's rate is the median over rounds and its ratio to eager the median of the per-round
ratios. The fraction of peak is the step's GFLOP/s (3x the forward's FLOPs) over the machine's best
square fp32 matmul with the same threads (bench.timing.matmul_peak): what is left to win in fp32.
A compiled option compiles in its warm-up (a minute cold, seconds with inductor's disk cache warm).
Prints a Markdown table for the README.
"""

import argparse
import statistics
import time

import torch

from bench.timing import SIZES, machine, matmul_peak, prepare, quartiles, time_calls

OPTIONS = {  # name -> (channels_last, torch.compile mode)
    "eager": (False, "off"),
    "channels_last": (True, "off"),
    "compile": (False, "default"),
    "channels_last+compile": (True, "default"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", dest="size", default="cifar-study", choices=list(SIZES), help="model size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a study worker gets cores/workers)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="timed rounds, after 2 warm-up steps of each")
    parser.add_argument("--options", default=",".join(OPTIONS),
                        help=f"comma-separated, eager first: {', '.join(OPTIONS)}")  # fmt: skip
    args = parser.parse_args(argv)
    names = args.options.split(",")
    unknown = [n for n in names if n not in OPTIONS]
    if unknown or names[0] != "eager":
        bad = ", ".join(unknown) or "the first"
        parser.error(f"--options: {bad} must be one of {', '.join(OPTIONS)}, eager first")
    if args.steps < 1 or args.threads < 1 or args.batch < 2:
        parser.error("--steps and --threads must be >= 1, --batch >= 2 (batch norm needs a batch)")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    prepared = {}
    for name in names:
        channels_last, mode = OPTIONS[name]
        prepared[name] = p = prepare(args.size, "cpu", "off", channels_last, mode, args.batch)
        t0 = time.perf_counter()
        time_calls(p.step, device, 2, warmup=0)
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    times = {name: [] for name in names}
    for _ in range(args.steps):
        for name, p in prepared.items():
            times[name] += time_calls(p.step, device, 1, warmup=0)
    peak = matmul_peak("cpu", "off", args.threads)
    print(f"\n{args.size} size, batch {args.batch}, {args.steps} rounds, {machine(device)}, "
          f"fp32 matmul peak {peak:.1f} GFLOP/s\n")  # fmt: skip
    print("| option | step ms, median (IQR) | images/s | x eager | train GFLOP/s | of matmul peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, p in prepared.items():
        ts = times[name]
        lo, mid, hi = quartiles(ts)
        ratio = statistics.median(e / t for e, t in zip(times["eager"], ts, strict=True))
        gflops = 3 * p.flops * args.batch / mid / 1e9
        print(f"| {name} | {mid * 1e3:.0f} ({lo * 1e3:.0f}-{hi * 1e3:.0f}) | {args.batch / mid:.1f} | {ratio:.2f} | "
              f"{gflops:.1f} | {gflops / peak:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
