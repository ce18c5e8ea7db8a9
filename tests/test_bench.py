import math

import pytest
import torch
from click.testing import CliRunner

import run_study
from bench.timing import bench, machine
from tests.conftest import ROOT


def test_bench_demo_reports_finite_numbers():
    r = bench("demo", "cpu", "off", False, batch=4, steps=2, warmup=1)
    for value in (r.train_ips, r.train_ips_lo, r.train_ips_hi, r.eval_ips, r.train_gflops, r.peak_memory_mb,
                  r.peak_gflops):  # fmt: skip
        assert math.isfinite(value) and value > 0
    assert r.row()["of matmul peak"] == f"{r.train_gflops / r.peak_gflops:.0%}"
    assert r.train_ips_lo <= r.train_ips <= r.train_ips_hi
    assert 0.05 < r.params_m < 0.07


def test_bench_cli_prints_a_table_and_rejects_fp16_on_cpu():
    out = CliRunner().invoke(
        run_study.cli,
        [
            "bench",
            "--preset",
            "demo",
            "--device",
            "cpu",
            "--amp",
            "bf16",
            "--channels-last",
            "--batch",
            "4",
            "--steps",
            "1",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "train img/s" in out.stdout and "bf16" in out.stdout and "of matmul peak" in out.stdout
    bad = CliRunner().invoke(run_study.cli, ["bench", "--device", "cpu", "--batch", "1"])
    assert bad.exit_code == 2 and "Invalid value for '--batch'" in bad.stderr


def test_bench_log_records_an_mlflow_run(store):
    import mlflow

    out = CliRunner().invoke(run_study.cli, ["bench", "--preset", "demo", "--device", "cpu", "--batch", "4",
                                             "--steps", "1", "--log", "--tracking-uri", store])  # fmt: skip
    assert out.exit_code == 0, out.output
    run_id = out.stdout.strip().split()[-1]
    run = mlflow.MlflowClient(store).get_run(run_id)
    assert run.data.tags["kind"] == "bench" and run.data.tags["size"] == "demo"
    assert run.data.tags["machine"] == machine("cpu") and "threads" in run.data.tags["machine"]
    assert run.data.metrics["ours.off.train_ips"] > 0 and run.data.params["batch"] == "4"


def test_usual_repro_stand_in_has_the_published_size():
    """The baseline of the speed targets has the usual reproduction's 19.6 M parameters and 12.9 GFLOP
    per forward image (../shared/design/REFERENCE.md), against our 18.52 M / 12.19 GFLOP."""
    from bench.usual_repro import reference_shaped
    from study.config import Config
    from study.flows import forward_flops_per_image, num_parameters
    from study.model import build_model

    ours = build_model(Config())
    assert round(num_parameters(ours) / 1e6, 2) == 18.52
    ref = reference_shaped(build_model(Config()))
    assert round(num_parameters(ref) / 1e6, 1) == 19.6
    assert round(forward_flops_per_image(ref, batch=1) / 1e9, 1) == 12.9


def test_bench_matrix_puts_the_baseline_first_with_ratios():
    out = CliRunner().invoke(run_study.cli, ["bench", "--preset", "demo", "--device", "cpu", "--batch", "4",
                                             "--steps", "1", "--matrix"])  # fmt: skip
    assert out.exit_code == 0, out.output
    lines = out.stdout.strip().splitlines()
    assert "x usual-repro" in lines[0] and lines[1].split()[0] == "usual-repro" and lines[1].split()[-1] == "1.00"
    assert [line.split()[0] for line in lines[2:-1]] == ["ours"] * 4
    assert lines[-1].startswith("machine: ") and f"threads, torch {torch.__version__}" in lines[-1]


def test_peak_memory_resets_between_rows():
    import os

    import pytest
    import torch

    from study.memory import peak_memory_mb, reset_peak_memory

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no writable /proc/self/clear_refs (not Linux): the peak covers the whole process there")
    cpu = torch.device("cpu")
    big = torch.ones(2**27)  # 512 MiB, touched
    del big
    before = peak_memory_mb(cpu)
    reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < before - 256


@pytest.mark.slow(33)
def test_bench_optimisations_script_prints_a_before_after_table():
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "bench.optimisations", "--preset", "demo", "--steps", "1", "--compile-size", "none"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ") and "optimisation" not in line]
    assert len(rows) == 7 and "data path" in rows[-1][1]
    assert all(math.isfinite(float(r[4])) and float(r[4]) > 0 for r in rows)


def test_machine_names_the_cpu_model_and_its_bf16_instructions(monkeypatch, tmp_path):
    from bench import timing as b

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n\n"
                       "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")  # fmt: skip
    monkeypatch.setattr(b, "CPUINFO", str(cpuinfo))
    threads = torch.get_num_threads()
    assert machine("cpu") == f"Test CPU 9000 (amx_bf16, avx512_bf16), {threads} threads, torch {torch.__version__}"
    cpuinfo.write_text("model name\t: Old CPU\nflags\t\t: fpu sse2\n")
    assert machine("cpu").startswith("Old CPU (no bf16 instructions), ")


def test_cell_split_accounts_for_the_wall_time_exactly():
    """bench.cell.split on clocks whose answer is known: start-up includes the interpreter's own start
    (the wall time outside the child's clock), forward is the step less its other parts, and other is
    whatever no clock saw, so the parts add up to the wall time."""
    from bench.cell import PARTS, split

    spent = {"step": 30.0, "backward": 14.0, "clip": 1.0, "optimizer": 2.0, "data": 0.5, "validation": 4.0,
             "test": 1.0, "checkpoints": 0.25, "logging": 0.75, "samples": 0.5}  # fmt: skip
    child = {"t0": 100.0, "first_step": 103.0, "t1": 150.0, "spent": spent}
    parts = split(child, wall=52.0)
    assert list(parts) == list(PARTS)
    assert parts["start-up"] == pytest.approx(2.0 + 3.0)  # 52 - 50 before the child's first line, + 3
    assert parts["forward"] == pytest.approx(13.0) and parts["backward"] == 14.0
    assert parts["other"] == pytest.approx(52.0 - 5.0 - 30.0 - 7.0)
    assert sum(parts.values()) == pytest.approx(52.0)


@pytest.mark.slow(15)
def test_a_cell_is_timed_end_to_end_in_its_own_process():
    """A real (tiny) cell: every part that runs is seen by its clock, none is negative, they add up to
    the wall time, and a failing cell is an error naming its cause, not a table of zeros."""
    from bench.cell import STEP_PARTS, run_cell
    from tests.conftest import tiny_overrides

    parts, wall = run_cell(["--preset", "demo", "--device", "cpu", *tiny_overrides(**{"train.epochs": 2})])
    for p in (*STEP_PARTS, "start-up", "data", "validation", "test", "checkpoints", "logging"):
        assert parts[p] > 0, (p, parts)
    assert min(parts.values()) >= -0.05 * wall  # "other" is a difference of clocks
    assert sum(parts.values()) == pytest.approx(wall)
    assert parts["start-up"] > parts["checkpoints"]  # imports alone take seconds
    with pytest.raises(RuntimeError, match="model.width"):
        run_cell(["--preset", "demo", "--set", "model.width=3"])


@pytest.mark.slow(20)
def test_a_cell_under_cprofile_names_where_python_spends_its_time(tmp_path):
    """--cprofile: the cell's run is profiled in its own process (stats written there, read here) and
    the table names real functions of the run (the training step's backward) with the share of the
    time inside built-in calls, a fraction of the profiled total."""
    import pstats
    import re

    from bench.cell import python_profile, run_cell
    from tests.conftest import tiny_overrides

    stats = tmp_path / "cell.prof"
    run_cell(["--preset", "demo", "--device", "cpu", *tiny_overrides()], env={"BENCH_CELL_CPROFILE": str(stats)})
    names = {func for (_, _, func) in pstats.Stats(str(stats)).stats}
    assert "train_step" in names and "<method 'run_backward' of 'torch._C._EngineBase' objects>" in names
    text = python_profile(stats, 5)
    share = int(re.search(r"profiled, (\d+)% of it inside built-in", text).group(1))
    assert 0 < share < 100 and "tottime" in text


@pytest.mark.parametrize("argv", [["--options", "compile"], ["--options", "eager,fast"], ["--steps", "0"],
                                  ["--batch", "1"]])  # fmt: skip
def test_fast_paths_refuses_bad_input_in_one_line(argv, capsys):
    from bench.fast_paths import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and ": error: --" in last and ("must be one of" in last or "must be >= 1" in last)


def test_matmul_peak_is_the_rate_of_a_timed_product():
    """The peak a step is read against: 2 n^3 FLOPs over the best time, so a slower product (patched
    to sleep) gives a proportionally lower peak; cached per (device, precision, threads)."""
    import time

    from bench import timing

    fast = timing.matmul_peak.__wrapped__("cpu", "off", 1)
    slow_mm = torch.mm

    def slow(a, b):
        time.sleep(0.05)
        return slow_mm(a, b)

    original = timing.torch.mm
    timing.torch.mm = slow
    try:
        slowed = timing.matmul_peak.__wrapped__("cpu", "off", 1)
    finally:
        timing.torch.mm = original
    assert 0 < slowed < fast and slowed <= 2 * 1024**3 / 0.05 / 1e9
