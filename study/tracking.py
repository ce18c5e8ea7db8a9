"""MLflow plumbing: which store, which experiment, which run has a given identity.

Default store: the MLFLOW_TRACKING_URI environment variable, else ``sqlite:///mlflow.db`` in the
working directory with artifacts in ``mlartifacts/`` beside it (never the deprecated file store).
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

DEFAULT_DB = "mlflow.db"
# no "View run ..." lines and no artifact progress bars in the study's output
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
DEFAULT_EXPERIMENT = "realnvp"


def resolve_tracking_uri(uri: str | None) -> str:
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a direct SQLite store go beside the database, not under whatever the cwd is."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def setup(uri: str | None, experiment: str) -> tuple[str, str]:
    """Point MLflow at the store, create the experiment if needed; return (uri, experiment_id).

    Creating a SQLite store takes seconds and concurrent creation races, so callers that start
    several workers call this once first.
    """
    import mlflow

    uri = resolve_tracking_uri(uri)
    if uri.startswith("file:") or "://" not in uri:
        raise ValueError(f"tracking URI {uri!r} is a file store, which MLflow deprecates: use sqlite:///PATH.db")
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        root = _artifact_root(uri)
        location = f"{root}/{experiment}" if root else None
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except Exception:  # another process created it between our look and our create
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        if exp.lifecycle_stage == "deleted":
            raise ValueError(f"experiment {experiment!r} is deleted in {uri}: restore it or pick another name")
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return uri, exp_id


def find_run(experiment_id: str, run_key: str):
    """The newest run tagged with ``run_key``, or None."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.run_key = '{run_key}'", order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
    return out.stdout.strip()


@functools.cache
def git_commit() -> str:
    """Short commit of this checkout, with -dirty when tracked files are modified, read once per
    process: a long-lived worker runs the code it imported, whatever the checkout becomes later."""
    try:
        commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
        return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def checkpoint_of_run(run_id: str, uri: str | None) -> dict:
    """The last checkpoint of a run: from its local checkpoint folder, else its logged artifact."""
    import mlflow

    from study import checkpoint

    mlflow.set_tracking_uri(resolve_tracking_uri(uri))
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except Exception:
        raise ValueError(
            f"no run {run_id!r} in {resolve_tracking_uri(uri)}: see `run_study.py ui` for run ids"
        ) from None
    found = checkpoint.load(Path(run.data.tags.get("checkpoint_dir", "/nonexistent")))
    if found is not None:
        return found[0]
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoint/{checkpoint.LAST}")
    except Exception:
        raise ValueError(f"run {run_id} has no checkpoint (neither its folder nor an artifact)") from None
    import torch

    return torch.load(local, map_location="cpu", weights_only=True)


def sample_from_run(run_id: str, uri: str | None, temperature: float, n: int, out: str | None) -> Path:
    from study.sampling import sample_grid, save_grid
    from study.training import model_from_checkpoint

    if temperature <= 0 or n < 1:
        raise ValueError("--temperature must be > 0 and -n at least 1")
    model, _ = model_from_checkpoint(checkpoint_of_run(run_id, uri))
    path = Path(out or f"samples-{run_id[:8]}-t{temperature:g}.png")
    return save_grid(sample_grid(model, n, temperature), path)


def ui_command(uri: str, port: int) -> list[str]:
    import sys

    # one worker: more add ~40 ms to every request (uvicorn); the UI binds to loopback only
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def serve_ui(uri: str | None, port: int, echo=print) -> None:
    """Run the MLflow UI in the foreground until Ctrl-C, then stop it cleanly."""
    import signal

    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        raise ValueError(f"no MLflow store at {uri}: run `python run_study.py train` first")
    proc = subprocess.Popen(ui_command(uri, port))
    echo(f"MLflow UI for {uri} at http://127.0.0.1:{port} (Ctrl-C to stop)")
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        echo("MLflow UI stopped")
