"""The MLflow UI, served for a store: MLflow's own server with this project's app (study/ui_app.py,
which opens in the model-training view), proxying a committed study's artifacts, and stopped with
every process it started."""

from __future__ import annotations

import os
import subprocess

from study.store import Store
from study.tracking import UI_APP


def ui_app_installed() -> bool:
    """Whether MLflow can find this project's UI app (the project pip-installed, as scripts/setup.sh does)."""
    import importlib.metadata

    return any(e.name == UI_APP for e in importlib.metadata.entry_points(group="mlflow.app"))


def ui_command(store: Store, port: int) -> list[str]:
    import sys

    # one worker: more add ~40 ms to every request (uvicorn); the UI binds to loopback only
    # --app-name: MLflow's own app, opening in the model-training view (study/ui_app.py)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store.uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]  # fmt: skip
    if ui_app_installed():
        command += ["--app-name", UI_APP]
    root = store.artifact_store()
    if root is not None:  # proxied artifacts (a committed study's) resolve against the store's folder
        command += ["--artifacts-destination", str(root)]
    return command


def serve_ui(store: Store, port: int, echo=print) -> None:
    """Run the MLflow UI in the foreground until Ctrl-C, SIGTERM or SIGHUP, then stop the server and
    every process it started (its own process group), leaving nothing listening. Prints a direct link
    to each study's runs."""
    import importlib.metadata

    from study.config import ConfigError

    try:  # mlflow-skinny (the GPU bundle's) has the client and the stores, not the server
        importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        why = "the MLflow UI needs the full mlflow package (this environment has only mlflow-skinny)"
        raise ConfigError(f"{why}: pip install mlflow, or browse the store from another machine") from None
    experiments = store.experiments()
    command = ui_command(store, port)
    proc = subprocess.Popen(command, start_new_session=True)
    echo(f"MLflow UI for {store.uri} at http://127.0.0.1:{port} (Ctrl-C to stop)")
    if "--app-name" not in command:  # ui_command found no realnvp-ui entry point
        echo("  note: the project is not pip-installed (pip install -e .), so MLflow's plain UI runs: a run or "
             "the compare page may open in its GenAI view; its sidebar switch says 'Model training'")
    for e in sorted(experiments, key=lambda e: e.name):  # straight into the model-training view, not GenAI's
        echo(f"  {e.name}: http://127.0.0.1:{port}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning")
    try:
        proc.wait()
    except KeyboardInterrupt:
        stop_group(proc)
        echo("MLflow UI stopped")
        raise


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM a process's whole group (a server and its workers), then SIGKILL what outlives ``timeout``."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever outlived the leader (a worker it left behind) goes too
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=5)
