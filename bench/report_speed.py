"""Time `report` on a fabricated study of RUNS runs x EPOCHS epochs in a temporary SQLite store.

    .venv/bin/python -m bench.report_speed [RUNS] [EPOCHS]

The runs are real MLflow runs with every per-epoch metric the training loop logs; the audit and
sample grids (which need checkpoints and artifacts) are left out, so this times collection,
statistics, figures and the Markdown.
"""

import sys
import tempfile
import time
from pathlib import Path

from analysis.report import generate_report
from study.schema import HISTORY_METRICS
from study.store import Store


def fabricate(store: Store, n_runs: int, n_epochs: int) -> None:
    exp = store.open_experiment("bench")
    parent = store.create_run(exp, "parent", {"kind": "study-parent", "study": "stabilizers", "preset": "demo"})
    variants = [f"v{i}" for i in range(n_runs // 10)] + ["seed-report"]
    for i in range(n_runs):
        variant, seed = variants[i % len(variants)], i // len(variants)
        run = store.create_run(exp, f"{variant}-s{seed}", {"variant": variant, "seed": seed, "outcome": "completed"},
                               parent_run_id=parent)  # fmt: skip
        rows = [(k, 5.0 - 0.01 * e + 0.001 * i, 0, e) for e in range(1, n_epochs + 1) for k in HISTORY_METRICS]
        store.log_metric_rows(run, rows)
        store.log_metrics(run, {"test_bpd": 4.0 + 0.001 * i}, n_epochs, timestamp_ms=0)
        store.set_status(run, "FINISHED")


if __name__ == "__main__":
    n_runs = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    n_epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/mlflow.db")
        fabricate(store, n_runs, n_epochs)
        start = time.perf_counter()
        generate_report(store, "bench", Path(tmp) / "report", run_audit=False)
        print(f"report on {n_runs} runs x {n_epochs} epochs: {time.perf_counter() - start:.1f} s")
