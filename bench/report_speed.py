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

import mlflow
from mlflow.entities import Metric

from analysis.report import generate_report
from study.schema import HISTORY_METRICS


def fabricate(uri: str, n_runs: int, n_epochs: int) -> None:
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("bench")
    parent = client.create_run(exp, tags={"kind": "study-parent", "study": "stabilizers", "preset": "demo"})
    variants = [f"v{i}" for i in range(n_runs // 10)] + ["seed-report"]
    for i in range(n_runs):
        variant, seed = variants[i % len(variants)], i // len(variants)
        run = client.create_run(exp, tags={"variant": variant, "seed": str(seed), "outcome": "completed",
                                           "mlflow.parentRunId": parent.info.run_id})  # fmt: skip
        metrics = [Metric(k, 5.0 - 0.01 * e + 0.001 * i, 0, e) for e in range(1, n_epochs + 1) for k in HISTORY_METRICS]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        client.log_batch(run.info.run_id, metrics=[Metric("test_bpd", 4.0 + 0.001 * i, 0, n_epochs)])
        client.set_terminated(run.info.run_id, "FINISHED")


if __name__ == "__main__":
    n_runs = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    n_epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        fabricate(uri, n_runs, n_epochs)
        start = time.perf_counter()
        generate_report(uri, "bench", Path(tmp) / "report", run_audit=False)
        print(f"report on {n_runs} runs x {n_epochs} epochs: {time.perf_counter() - start:.1f} s")
