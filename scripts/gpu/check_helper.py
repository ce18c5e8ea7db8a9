"""The GPU check's Python side (scripts/gpu/check.sh calls it; standard library only, except ``env``).

    check_helper.py env WHEEL_DIR SITE            versions, CUDA, imports of the project's modules,
                                                  and the bundle's requirements met (bundle_deps verify)
    check_helper.py evaluate URI DATA             `run_study.py evaluate` on a checkpoint the check made,
                                                  or exit 99 (skipped) where the command does not exist
    check_helper.py summary RESULTS DB LOGS MD TOTAL_S
                                                  the one summary table, key numbers read from the MLflow
                                                  store (SQLite, read directly) and the step logs

A line ``KEY: ...`` in a step's log is that step's key number where the store has none.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SKIP = 99  # check.sh records a step that exits with this as skipped
TARGET_TRAIN_IPS = 5000.0  # paper size, bf16, on an H200 (README, Benchmarks)
TARGET_EVAL_RATIO = 3.0


# --- env ----------------------------------------------------------------------------------------------
def env(wheel_dir: str, site: str) -> int:
    import importlib
    import platform
    from importlib import metadata

    problems = 0
    print(f"python {platform.python_version()} at {sys.executable}")
    print(f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    versions = {}
    for dist in (
        "torch",
        "torchvision",
        "numpy",
        "mlflow-skinny",
        "mlflow",
        "optuna",
        "sqlalchemy",
        "alembic",
        "pandas",
        "seaborn",
        "matplotlib",
        "scipy",
        "scikit-image",
        "click",
        "protobuf",
        "pydantic",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "-"
        print(f"  {dist:<14} {versions[dist]}")
    import torch

    gpu = "no CUDA"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, cuda {torch.version.cuda}"
        print(f"  bf16 supported: {torch.cuda.is_bf16_supported()}")
    print(f"torch {torch.__version__}: {gpu}; {torch.get_num_threads()} CPU threads")
    # every module the check's commands reach, imported once here so a missing wheel or an
    # incompatibility names itself in this step rather than in the middle of a later one
    for mod in (
        "mlflow",
        "optuna",
        "sqlalchemy",
        "alembic",
        "study.run.engine",
        "study.sweep.ablation",
        "study.sweep.lrsearch",
        "study.store",
        "study_cli.commands",
        "bench.timing",
        "bench.optimisations",
        "analysis.collect",
        "analysis.report",
        "experiments.ablation",
    ):
        sys.path.insert(0, str(ROOT))
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - reported, the check goes on
            problems += 1
            print(f"PROBLEM: import {mod}: {type(e).__name__}: {e}")
    wheels = Path(wheel_dir)
    if Path(site).is_dir() and any(wheels.glob("*.whl")):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bundle_deps

        problems += bundle_deps.verify(wheels)
    mlflow_v = versions["mlflow"] if versions["mlflow"] != "-" else versions["mlflow-skinny"]
    print(
        f"KEY: python {platform.python_version()}, torch {torch.__version__}, {gpu.split(',')[0]}; "
        f"mlflow {mlflow_v}, optuna {versions['optuna']}" + (f"; {problems} problem(s)" if problems else "")
    )
    return 1 if problems else 0


# --- the MLflow store, read directly -----------------------------------------------------------------
class Store:
    """Read-only view of an MLflow SQLite store (tables experiments, runs, tags, params, metrics)."""

    def __init__(self, path: str | Path):
        self.ok = Path(path).is_file()
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True) if self.ok else None

    def runs(self, experiment: str, **tags: str) -> list[str]:
        """Run ids of an experiment carrying every tag given, newest first."""
        if not self.ok:
            return []
        try:
            rows = self.db.execute(
                "SELECT r.run_uuid FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                "WHERE e.name = ? AND r.lifecycle_stage = 'active' ORDER BY r.start_time DESC",
                (experiment,),
            ).fetchall()
        except sqlite3.Error:
            return []
        return [r for (r,) in rows if all(self.tag(r, k) == v for k, v in tags.items())]

    def tag(self, run: str, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM tags WHERE run_uuid = ? AND key = ?", (run, key)).fetchone()
        return row[0] if row else None

    def param(self, run: str, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM params WHERE run_uuid = ? AND key = ?", (run, key)).fetchone()
        return row[0] if row else None

    def history(self, run: str, key: str) -> list[float]:
        rows = self.db.execute(
            "SELECT value, is_nan FROM metrics WHERE run_uuid = ? AND key = ? ORDER BY step, timestamp", (run, key)
        ).fetchall()
        return [math.nan if is_nan else float(v) for v, is_nan in rows]

    def last(self, run: str, key: str) -> float | None:
        h = self.history(run, key)
        return h[-1] if h else None

    def metric_run(self, experiment: str, key: str) -> str | None:
        """The newest run of ``experiment`` that logged metric ``key``."""
        for run in self.runs(experiment):
            if self.history(run, key):
                return run
        return None


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "n/a" if v is None else format(v, spec)


# --- evaluate -----------------------------------------------------------------------------------------
def evaluate(uri: str, data: str) -> int:
    cmd = [sys.executable, str(ROOT / "run_study.py")]
    probe = subprocess.run([*cmd, "evaluate", "--help"], cwd=ROOT, capture_output=True, text=True)
    if probe.returncode != 0:
        print(probe.stderr.strip()[-400:])
        print("skipped: command not available (run_study.py evaluate --help fails)")
        return SKIP
    store = Store(uri[len("sqlite:///") :])
    # a checkpoint the check made: the fp16 recipe's, else the ablation's, else a demo run's
    run = None
    for experiment, variant in (
        ("gpu-check-ablation", "seed-report-fp16"),
        ("gpu-check-ablation", "seed-report"),
        ("gpu-check-ablation", "paper"),
        ("gpu-check-bf16", "default"),
        ("gpu-check-fp16", "default"),
    ):
        found = [r for r in store.runs(experiment, variant=variant) if store.tag(r, "checkpoint_dir")]
        if found:
            run = found[0]
            break
    if run is None:
        print("skipped: no run of this check left a checkpoint to evaluate")
        return SKIP
    args = [*cmd, "evaluate", "--run", run, "--split", "test", "--tracking-uri", uri]
    if data and store.param(run, "data.source") == "npz":
        args += ["--data", data]
    print("$ " + " ".join(args), flush=True)
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout + done.stderr, flush=True)
    if done.returncode != 0:
        return done.returncode
    logged = store.last(run, "test_bpd")
    # "...: 7.7672 +- 0.0071 bits/dim (standard error ...)": the figure is the number before "+-"
    figure = re.search(r"(\d+\.\d+)\s*(?:\+-\s*(\d+\.\d+)\s*)?bits/dim", done.stdout)
    if figure:
        got = f"test {figure[1]}" + (f" +- {figure[2]}" if figure[2] else "") + " bits/dim"
    else:
        got = (done.stdout.strip().splitlines() or ["no output"])[-1][:80]
    print(f"KEY: {store.tag(run, 'variant')} {run[:8]}: {got}; the run logged test {fmt(logged, '.4f')}")
    return 0


# --- summary ------------------------------------------------------------------------------------------
def bench_key(store: Store, suffix: str = "", rehearsal: bool = False) -> str:
    run = store.metric_run("bench", f"ours.bf16_cl{suffix}.train_ips")
    if run is None:
        return ""
    train = store.last(run, f"ours.bf16_cl{suffix}.train_ips")
    evals = store.last(run, f"ours.bf16_cl{suffix}.eval_ips")
    ratio = evals / train if train and evals else None
    key = f"bf16+cl train {fmt(train)} img/s, eval {fmt(evals)} ({fmt(ratio, '.1f')}x)"
    if not rehearsal and train is not None and ratio is not None:
        key += (
            f"; 5,000 img/s target {'met' if train >= TARGET_TRAIN_IPS else 'NOT met'}, "
            f"eval >= 3x {'met' if ratio >= TARGET_EVAL_RATIO else 'NOT met'}"
        )
    if not suffix:
        others = []
        for label, name in (("fp32", "ours.off"), ("fp16+cl", "ours.fp16_cl"), ("usual-repro fp32", "usual-repro.off")):
            v = store.last(run, f"{name}.train_ips")
            if v is not None:
                others.append(f"{label} {v:.0f}")
        if others:
            key += "; " + ", ".join(others)
    return key


def run_key(store: Store, experiment: str, variant: str) -> str:
    runs = store.runs(experiment, variant=variant)
    if not runs:
        return ""
    r = runs[0]
    val, test, ips = store.last(r, "val_bpd"), store.last(r, "test_bpd"), store.last(r, "images_per_s")
    key = f"{variant}: val {fmt(val, '.3f')}"
    if test is not None:
        key += f", test {test:.3f}"
    key += f" bits/dim, {fmt(ips)} img/s, {store.tag(r, 'outcome') or 'unfinished'}"
    skipped = store.history(r, "skipped_steps")
    if store.history(r, "grad_scale"):
        key += f", {sum(skipped):.0f} skipped steps, scale {store.last(r, 'grad_scale'):g}"
    events = sum(store.history(r, "nonfinite_events"))
    if events or store.tag(r, "divergence_causes"):
        key += f", {events:.0f} non-finite events ({store.tag(r, 'divergence_causes') or ''}; final amp "
        key += f"{store.tag(r, 'final_amp')})"
    return key


def optimisations_key(log: Path) -> str:
    if not log.is_file():
        return ""
    rows = re.findall(r"^(.+?): ([\d.]+) -> ([\d.]+) img/s \(x([\d.]+)\)", log.read_text(), re.M)
    short = {
        "model": "usual->ours",
        "host syncs": "one sync",
        "channels_last": "cl",
        "bf16 autocast + channels_last": "bf16+cl",
        "torch.compile": "compile",
        "data path": "data path",
    }
    out = []
    for name, _, _, ratio in rows:
        for prefix, label in short.items():
            if name.startswith(prefix):
                out.append(f"{label} x{ratio}")
                break
    return ", ".join(out)


def setup_key(manifest: Path) -> str:
    if not manifest.is_file():
        return ""
    rows = [line.split() for line in manifest.read_text().splitlines()[1:] if line.strip()]
    size = sum(int(r[1]) for r in rows if len(r) == 3 and r[1].isdigit())
    return f"{len(rows)} wheels ({size / 2**20:.1f} MiB) installed --no-index --target"


def log_key(log: Path) -> str:
    if not log.is_file():
        return ""
    keys = [line[5:].strip() for line in log.read_text(errors="replace").splitlines() if line.startswith("KEY: ")]
    return keys[-1] if keys else ""


def summary(results: str, db: str, logs: str, out: str, total: str) -> int:
    store = Store(db)
    logs_dir = Path(logs)
    rehearsal = os.environ.get("CHECK_SCALE", "full") == "rehearsal"
    keys = {
        "train-fp16-demo": lambda: run_key(store, "gpu-check-fp16", "default"),
        "train-bf16-demo": lambda: run_key(store, "gpu-check-bf16", "default"),
        "bench-matrix-paper": lambda: bench_key(store, "", rehearsal),
        "ablation-paper": lambda: "; ".join(
            k for k in (run_key(store, "gpu-check-ablation", v) for v in ("seed-report", "paper")) if k
        ),
        "fp16-recipe-paper": lambda: run_key(store, "gpu-check-ablation", "seed-report-fp16"),
        "compile-default": lambda: bench_key(store, "_default", rehearsal),
        "compile-reduce-overhead": lambda: bench_key(store, "_reduce-overhead", rehearsal),
        "train-compiled-demo": lambda: run_key(store, "gpu-check-compiled", "default"),
        "bench-optimisations": lambda: optimisations_key(logs_dir / "bench-optimisations.log"),
        "setup": lambda: setup_key(logs_dir / "manifest.log"),
    }
    lines = []
    counts: dict[str, int] = {}
    for row in Path(results).read_text().splitlines():
        name, status, seconds, limit, note = (row.split("\t") + [""] * 5)[:5]
        counts[status] = counts.get(status, 0) + 1
        key = ""
        if status != "skip":
            try:
                key = keys.get(name, lambda: "")() or log_key(logs_dir / f"{name}.log")
            except Exception as e:  # noqa: BLE001 - a key number is never worth a lost table
                key = f"(key number unreadable: {type(e).__name__}: {e})"
        cell = "; ".join(x for x in (key, note) if x).replace("|", "/")
        lines.append(f"| {name} | {status} | {seconds} | {cell} |")
    scale = "rehearsal scale (tiny sizes; targets not applicable)" if rehearsal else "full scale"
    head = [
        f"# GPU check: {counts.get('pass', 0)} passed, {counts.get('fail', 0)} failed, {counts.get('skip', 0)} skipped",
        "",
        f"{scale}; {total} s in all. Targets (paper size, bf16, H200): {TARGET_TRAIN_IPS:,.0f} training img/s, "
        f"evaluation >= {TARGET_EVAL_RATIO:g}x the training rate. Logs and the MLflow/Optuna stores: check.tar.gz.",
        "",
        "| step | status | seconds | key number / note |",
        "|---|---|---:|---|",
    ]
    Path(out).write_text("\n".join(head + lines) + "\n")
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] == "env" and len(argv) == 3:
        return env(argv[1], argv[2])
    if argv and argv[0] == "evaluate" and len(argv) == 3:
        return evaluate(argv[1], argv[2])
    if argv and argv[0] == "summary" and len(argv) == 6:
        return summary(*argv[1:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
