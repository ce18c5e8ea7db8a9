"""Where one cell's time goes: a training run timed end to end in a fresh process, as a study runs it.

    .venv/bin/python -m bench.cell --preset cifar-study --data npz:../shared/data/cifar10-slices --epochs 2

The run is ``run_study.py train`` in a new interpreter with a throwaway store, so start-up (the
interpreter, imports, the store, the data, the model) is counted as a study pays it. Inside, the
functions each part runs through are wrapped with a clock (a few microseconds a call, against
milliseconds for the calls timed), which splits the wall time into:

- start-up: process start to the first training step;
- the training step, itself split into forward (the loss), backward, clip (the global norm) and
  optimizer (Adam), the rest of ``train_step`` counted with forward;
- data (shuffling, dequantization, flips: each batch's ``next``), validation, test, checkpoints,
  logging (the MLflow calls), samples (the sample grids);
- other: what is left (the loop, progress lines, the end of the process).

The wrappers time what runs under them, so nothing is counted twice: a checkpoint written inside
logging, say, would count in both; none is. ``--profile`` adds a torch.profiler table of the step's
operators (self CPU time) over a few steps, run after the cell in the same process; ``--cprofile N``
runs the cell under cProfile and prints the N Python functions of most own time, with the share of the
run spent inside built-in (C/C++) calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("start-up", "forward", "backward", "clip", "optimizer", "data", "validation", "test", "checkpoints",
         "logging", "samples", "other")  # fmt: skip
STEP_PARTS = ("forward", "backward", "clip", "optimizer")

# what the child runs: the clocks, then the command line as `python run_study.py train` would
_CHILD = r"""
import json, sys, time
T0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
spent, state = {}, {"first_step": None, "phase": "validation", "in_step": False}

def clock(name, fn):
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
    return timed

import torch
import study.run.loop as loop
import study.run.step as step
from study.run import checkpoint
from study.store import RunLogger

def first_step(fn):
    def call(*a, **k):
        if state["first_step"] is None:
            state["first_step"] = time.perf_counter()
        state["in_step"] = True
        try:
            return fn(*a, **k)
        finally:
            state["in_step"] = False
    return call

loop.train_step = first_step(clock("step", loop.train_step))
_backward = torch.autograd.backward
def backward(*a, **k):
    if not state["in_step"]:
        return _backward(*a, **k)
    return clock("backward", _backward)(*a, **k)
torch.autograd.backward = backward
_clip = torch.nn.utils.clip_grad_norm_
torch.nn.utils.clip_grad_norm_ = lambda *a, **k: clock("clip", _clip)(*a, **k) if state["in_step"] else _clip(*a, **k)
_adam = torch.optim.Adam.step
torch.optim.Adam.step = lambda self, *a, **k: clock("optimizer", _adam)(self, *a, **k)

_batches = loop.train_batches
def batches(*a, **k):
    it = _batches(*a, **k)
    while True:
        t = time.perf_counter()
        try:
            x = next(it)
        except StopIteration:
            spent["data"] = spent.get("data", 0.0) + time.perf_counter() - t
            return
        spent["data"] = spent.get("data", 0.0) + time.perf_counter() - t
        yield x
loop.train_batches = batches
_evaluate = loop.evaluate
loop.evaluate = lambda *a, **k: clock(state["phase"], _evaluate)(*a, **k)
_finish = loop.finish
def finish(*a, **k):
    state["phase"] = "test"
    return _finish(*a, **k)
loop.finish = finish
checkpoint.save = clock("checkpoints", checkpoint.save)
for name in ("metrics", "tags", "artifact", "terminate"):
    setattr(RunLogger, name, clock("logging", getattr(RunLogger, name)))
_samples = loop.log_samples
def samples(model, log, epoch):  # its artifact upload is logging's, not the grid's
    t, before = time.perf_counter(), spent.get("logging", 0.0)
    _samples(model, log, epoch)
    spent["samples"] = spent.get("samples", 0.0) + time.perf_counter() - t - (spent.get("logging", 0.0) - before)
loop.log_samples = samples

from study_cli.commands import cli
import os
profiler = None
if os.environ.get("BENCH_CELL_CPROFILE"):  # --cprofile: the run under cProfile, its stats to that file
    import cProfile
    profiler = cProfile.Profile()
    profiler.enable()
code = 0
try:
    cli(sys.argv[3:])
except SystemExit as e:
    code = e.code or 0
if profiler is not None:
    profiler.disable()
    profiler.dump_stats(os.environ["BENCH_CELL_CPROFILE"])
T1 = time.perf_counter()
json.dump({"spent": spent, "t0": T0, "first_step": state["first_step"], "t1": T1, "code": code},
          open(sys.argv[2], "w"))
"""


def split(result: dict, wall: float) -> dict[str, float]:
    """Seconds per part (PARTS) from the child's clocks and the wall time measured around the process:
    start-up is everything before the first step (the interpreter's own start included), the step's
    forward is what the step spent outside backward, clip and the optimizer, and other is what no
    clock saw. result: the child's JSON (spent by clock name, t0, first_step, t1 on its clock)."""
    spent = result["spent"]
    before_t0 = wall - (result["t1"] - result["t0"])  # interpreter start-up, before the child's first line
    first = result["first_step"] if result["first_step"] is not None else result["t1"]
    parts = {"start-up": before_t0 + first - result["t0"]}
    parts.update({p: spent.get(p, 0.0) for p in ("backward", "clip", "optimizer")})
    parts["forward"] = spent.get("step", 0.0) - sum(parts[p] for p in ("backward", "clip", "optimizer"))
    for p in ("data", "validation", "test", "checkpoints", "logging", "samples"):
        parts[p] = spent.get(p, 0.0)
    parts["other"] = wall - sum(parts.values())
    return {p: parts[p] for p in PARTS}


def run_cell(args: list[str], threads: int = 1, env: dict | None = None) -> tuple[dict[str, float], float]:
    """Time ``run_study.py train ARGS`` in a fresh process with a throwaway store and checkpoints;
    returns (seconds per part, wall seconds). A failing run raises RuntimeError with its stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        cmd = [sys.executable, "-c", _CHILD, str(ROOT), str(out), "train", *args,
               "--tracking-uri", f"sqlite:///{Path(tmp) / 'mlflow.db'}", "--checkpoint-dir", str(Path(tmp) / "ckpt"),
               "--experiment", "cell-bench", "--set", f"train.threads={threads}"]  # fmt: skip
        child_env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
        t = time.perf_counter()
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=child_env)
        wall = time.perf_counter() - t
        result = json.loads(out.read_text()) if out.exists() else {"code": done.returncode}
        if done.returncode != 0 or result["code"] != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1].removeprefix("error: ")
            raise RuntimeError(f"the timed cell exited {result['code'] or done.returncode}: {last}")
    return split(result, wall), wall


def table(rows: list[tuple[str, dict[str, float], float]]) -> str:
    """Markdown: one column per measured configuration, seconds and share of the wall time per part."""
    head = "| part | " + " | ".join(name for name, _, _ in rows) + " |"
    lines = [head, "|---|" + "---:|" * len(rows)]
    for p in PARTS:
        cells = [f"{parts[p]:.1f} s ({100 * parts[p] / wall:.1f}%)" for _, parts, wall in rows]
        label = f"step: {p}" if p in STEP_PARTS else p
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **wall** | " + " | ".join(f"**{wall:.1f} s**" for _, _, wall in rows) + " |")
    return "\n".join(lines)


def op_profile(preset: str, batch: int, threads: int, steps: int = 3, rows: int = 12) -> str:
    """torch.profiler's operator table (self CPU time) over ``steps`` training steps of the preset's
    model at ``batch`` (bench.timing.prepare: the step exactly as the loop runs it)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.timing import prepare

    torch.set_num_threads(threads)
    p = prepare(preset, "cpu", "off", False, "off", batch)
    for _ in range(2):
        p.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            p.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def python_profile(stats_file: Path, rows: int) -> str:
    """cProfile's view of the whole run: the ``rows`` functions with the most own time (tottime), and the
    share of the profiled time spent inside built-in (C/C++) calls (torch's kernels, sqlite, the
    importer's): the rest is Python code's own time (the harness, MLflow, SQLAlchemy, imports)."""
    import io
    import pstats

    out = io.StringIO()
    st = pstats.Stats(str(stats_file), stream=out)
    total = st.total_tt
    builtin = sum(tt for (file, _, _), (_, _, tt, _, _) in st.stats.items() if file == "~")
    print(f"cProfile: {total:.1f} s profiled, {builtin / total:.0%} of it inside built-in (C/C++) calls", file=out)
    st.sort_stats("tottime").print_stats(rows)
    return out.getvalue().rstrip()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cifar-study", help="the cell's preset (data, batch, schedule)")
    ap.add_argument("--size", default=None,
                    help="a bench size whose model replaces the preset's (e.g. rung-32x4, the ladder's top rung)")
    ap.add_argument("--data", default=None, help="as train's --data (default: the preset's)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra config values, as train's --set")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of the cell (a study worker's)")
    ap.add_argument("--profile", action="store_true", help="also print the step's operator profile")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="run the cell under cProfile and print its N functions of most own time (the split's "
                         "clocks then include cProfile's overhead)")  # fmt: skip
    args = ap.parse_args(argv)
    from experiments.presets import PRESETS, model_sizes

    size = args.size or args.preset
    scales, maps, blocks = model_sizes()[size]
    train_args = ["--preset", args.preset, "--epochs", str(args.epochs), "--device", "cpu"]
    if args.data:  # the cell runs in a throwaway folder: a relative data path is made absolute here
        kind, sep, where = args.data.partition(":")
        train_args += ["--data", f"{kind}:{Path(where).resolve()}" if sep else args.data]
    model = {"model.num_scales": scales, "model.mid_channels": maps, "model.num_blocks": blocks}
    for o in [f"{k}={v}" for k, v in model.items()] + args.overrides:
        train_args += ["--set", o]
    with tempfile.TemporaryDirectory() as keep:
        stats = Path(keep) / "cell.prof"
        parts, wall = run_cell(train_args, args.threads, {"BENCH_CELL_CPROFILE": str(stats)} if args.cprofile else None)
        name = f"{args.preset}, {maps} maps x {blocks} blocks, {args.epochs} epochs, {args.threads} thread(s)"
        print(table([(name, parts, wall)]))
        if args.cprofile:
            print()
            print(python_profile(stats, args.cprofile))
    if args.profile:
        batch = int(PRESETS.get(args.preset, {}).get("train.batch_size", 64))
        print()
        print(op_profile(size, batch, args.threads))


if __name__ == "__main__":
    main()
