"""MLflow plumbing, in one place: which store and experiment, the one way runs are created, what a
training run logs (timed, for the overhead figure), run lookup, and the UI.

Default store: the MLFLOW_TRACKING_URI environment variable, else ``sqlite:///mlflow.db`` in the
working directory with artifacts in ``mlartifacts/`` beside it (never the deprecated file store).
Names of tags, metrics and artifacts come from study.schema.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from study import schema
from study.storage import PatientClient, patiently

DEFAULT_DB = "mlflow.db"
# no "View run ..." lines and no artifact progress bars in the study's output
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
DEFAULT_EXPERIMENT = "realnvp"
UI_APP = "realnvp-ui"  # the mlflow.app entry point of pyproject.toml: study/ui_app.py
EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's UI picks the model-training or the GenAI view by it


def resolve_tracking_uri(uri: str | None) -> str:
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / DEFAULT_DB}"


DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy stores, with or without +driver
SERVER_SCHEMES = ("http", "https")
ANSWER_S = 3.0  # how long a tracking server or database may take to answer a check


def check_database_url(url: str, what: str, must_exist: bool = False) -> None:
    """A SQLAlchemy URL that can be used, or a ConfigError naming the problem and the fix: a known
    scheme; for SQLite an existing parent folder (and file, when ``must_exist``); for a server
    database an answer within ANSWER_S seconds. Nothing is created."""
    from study.config import ConfigError

    scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if scheme not in DB_SCHEMES:
        raise ConfigError(f"{what} {url!r}: use sqlite:///PATH.db or postgresql+psycopg2://USER:PASSWORD@HOST/DB")
    if scheme == "sqlite":
        path = Path(url.split(":///", 1)[1]) if ":///" in url else None
        if path is None or not path.name:
            raise ConfigError(f"{what} {url!r}: write sqlite:///PATH.db (three slashes, then a file path)")
        if not path.parent.exists():
            raise ConfigError(f"{what} {url!r}: folder {path.parent} does not exist; create it or choose another path")
        if must_exist and not path.exists():
            raise ConfigError(f"{what} {url!r}: no such store; check the path (nothing was created)")
        return
    try:
        import sqlalchemy

        timeout = {"connect_timeout": int(ANSWER_S)} if scheme == "postgresql" else {}
        engine = sqlalchemy.create_engine(url, connect_args=timeout)
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as e:
        fix = "pip install 'realnvp-study[postgres]'"
        raise ConfigError(f"{what} {url!r}: its driver {e.name} is missing: {fix}") from None
    except Exception as e:  # noqa: BLE001 - any failure to connect is the user's to fix
        why = type(e).__name__
        raise ConfigError(f"{what} {url!r}: the database does not answer ({why}); is it running?") from None


def check_tracking_uri(uri: str | None, must_exist: bool = False) -> str:
    """The resolved tracking URI, or a ConfigError before anything is written: a file store or plain path,
    an unknown scheme, a SQLite file in a missing folder (or missing, when ``must_exist``), or a server
    that does not answer within ANSWER_S seconds."""
    import urllib.request

    from study.config import ConfigError

    uri = resolve_tracking_uri(uri)
    if uri.startswith("file:") or "://" not in uri:
        raise ConfigError(f"tracking URI {uri!r} is a path or file store, which MLflow deprecates: use sqlite:///PATH.db")
    scheme = uri.split("://", 1)[0]
    if scheme in SERVER_SCHEMES:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=ANSWER_S) as r:
                if r.status == 200:
                    return uri
        except OSError:
            pass
        raise ConfigError(f"tracking URI {uri!r}: no MLflow server answers within {ANSWER_S:.0f} s; start it or "
                          "check the address")  # fmt: skip
    check_database_url(uri, "tracking URI", must_exist)
    return uri


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
    client = PatientClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        root = _artifact_root(uri)
        location = f"{root}/{experiment}" if root else None
        try:
            # the UI opens it in its model-training view, not the GenAI one
            kind = {EXPERIMENT_KIND: "custom_model_development"}
            exp_id = client.create_experiment(experiment, artifact_location=location, tags=kind)
        except Exception:  # another process created it between our look and our create
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        if exp.lifecycle_stage == "deleted":
            raise ValueError(f"experiment {experiment!r} is deleted in {uri}: restore it or pick another name")
        exp_id = exp.experiment_id
    patiently(lambda: mlflow.set_experiment(experiment_id=exp_id), "MLflow set_experiment")
    return uri, exp_id


def create_run(experiment_id: str, name: str, tags: dict[str, Any], params: dict[str, Any] | None = None,
               parent_run_id: str | None = None, description: str = "", source: str = "") -> str:  # fmt: skip
    """The one way the study creates an MLflow run (training runs, study and search parents, bench):
    with its tags, the git commit (ours, and MLflow's own source tags, which the UI shows), a
    description, and its params. Returns the run id."""
    from mlflow.entities import Param

    commit = git_commit()
    tags = {schema.GIT_COMMIT: commit, schema.SOURCE_TYPE: "LOCAL",
            schema.SOURCE_NAME: source or "run_study.py", **{k: str(v) for k, v in tags.items()}}  # fmt: skip
    if commit != "unknown":
        tags[schema.SOURCE_COMMIT] = full_commit()
    if description:
        tags[schema.NOTE] = description
    if parent_run_id:
        tags[schema.PARENT] = parent_run_id
    client = PatientClient()
    run_id = client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
    if params:
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run_id


def find_run(experiment_id: str, run_key: str):
    """The newest run tagged with ``run_key``, or None."""
    runs = PatientClient().search_runs(
        [experiment_id], filter_string=f"tags.{schema.RUN_KEY} = '{run_key}'", order_by=["attributes.start_time DESC"]
    )
    return runs[0] if runs else None


class RunLogger:
    """The few MLflow calls a training run makes, with the time they take counted (logging overhead);
    each waits out a locked store (study.storage)."""

    def __init__(self, run_id: str):
        self.client = PatientClient()
        self.run_id = run_id
        self.seconds = 0.0
        # epochs MLflow already holds: an epoch re-trained after a resume from an older checkpoint
        # is not logged a second time, so every epoch appears exactly once
        self.logged = {m.step for m in self.client.get_metric_history(run_id, schema.VAL_BPD)}

    @contextlib.contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if schema.VAL_BPD in values:
            self.logged.add(step)
        with self.timed():
            batch = [Metric(k, float(v), now, step) for k, v in values.items()]
            self.client.log_batch(self.run_id, metrics=batch)

    def tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        with self.timed():
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def artifact(self, path: Path, folder: str) -> None:
        with self.timed():
            self.client.log_artifact(self.run_id, str(path), folder)

    def terminate(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class NullLogger(RunLogger):
    """What ranks other than 0 log under torchrun: nothing."""

    def __init__(self):
        self.run_id, self.seconds, self.logged = "", 0.0, set()

    def metrics(self, values, step):
        pass

    def tags(self, values):
        pass

    def artifact(self, path, folder):
        pass

    def terminate(self, status):
        pass


def _git(*args: str, cwd: Path | None = None) -> str:
    out = subprocess.run(["git", *args], cwd=cwd or Path(__file__).resolve().parent, capture_output=True, text=True,
                         timeout=5)  # fmt: skip
    return out.stdout.strip()


def is_dirty(cwd: Path | None = None) -> bool:
    """True when the checkout holding ``cwd`` (default: this code's) has a modified tracked file or an
    untracked file that git does not ignore."""
    return bool(_git("status", "--porcelain", "--untracked-files=normal", cwd=cwd))


@functools.cache
def full_commit() -> str:
    """The full hash of HEAD (MLflow's source tag wants it; ours is short with -dirty)."""
    try:
        return _git("rev-parse", "HEAD") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def git_commit() -> str:
    """Short commit of this checkout, with -dirty when a tracked file is modified or a file git does not
    ignore is untracked (a new module imports just as well as a changed one), read once per process: a
    long-lived worker runs the code it imported, whatever the checkout becomes later. A study's own
    stores belong outside the checkout while it runs (README, "Committing a study")."""
    try:
        commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
        return commit + ("-dirty" if is_dirty() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def artifact_store(uri: str) -> Path | None:
    """The artifact folder beside a SQLite store (mlartifacts/), where its proxied artifacts live."""
    db = _sqlite_file(resolve_tracking_uri(uri))
    return (db.parent / "mlartifacts").resolve() if db is not None else None


def local_artifact_dir(artifact_uri: str, uri: str | None) -> Path | None:
    """Where a run's artifacts lie on this disk: a file URI as it is; a proxied ``mlflow-artifacts:/X``
    of a SQLite store (how a committed study records them, so any clone finds them) under the
    store's mlartifacts/X. None when they are elsewhere (a server, or a folder no longer here)."""
    from urllib.parse import unquote, urlparse

    if artifact_uri.startswith("mlflow-artifacts:"):
        root = artifact_store(uri)
        path = root / unquote(urlparse(artifact_uri).path).lstrip("/") if root is not None else None
    elif artifact_uri.startswith("file:"):
        path = Path(unquote(urlparse(artifact_uri).path))
    else:
        path = Path(artifact_uri) if "://" not in artifact_uri else None
    return path if path is not None and path.exists() else None


def download_artifact(run_id: str, artifact_path: str, uri: str | None, dst: Path | None = None) -> Path:
    """A run's artifact as a local file: read where it lies when it is on this disk, else through
    MLflow (a tracking server's proxy). Raises FileNotFoundError when neither has it."""
    import mlflow

    client = mlflow.MlflowClient(resolve_tracking_uri(uri))
    local = local_artifact_dir(client.get_run(run_id).info.artifact_uri, uri)
    if local is not None:
        found = local / artifact_path
        if found.exists():
            return found
        raise FileNotFoundError(f"run {run_id} has no artifact {artifact_path}")
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                        tracking_uri=resolve_tracking_uri(uri),
                                                        dst_path=str(dst) if dst else None))  # fmt: skip
    except Exception as e:
        why = type(e).__name__
        raise FileNotFoundError(f"run {run_id}: artifact {artifact_path} is not reachable ({why})") from None


def log_artifacts(run_id: str, folder: Path, artifact_path: str, uri: str | None) -> None:
    """Add a folder to a run's artifacts, wherever they live (a committed study's proxied folder too)."""
    import shutil

    import mlflow

    client = mlflow.MlflowClient(resolve_tracking_uri(uri))
    artifact_uri = client.get_run(run_id).info.artifact_uri
    if artifact_uri.startswith("mlflow-artifacts:") and artifact_store(uri) is not None:
        target = artifact_store(uri) / artifact_uri.split(":", 1)[1].lstrip("/") / artifact_path
        shutil.copytree(folder, target, dirs_exist_ok=True)
    else:
        client.log_artifacts(run_id, str(folder), artifact_path)


def ui_app_installed() -> bool:
    """Whether MLflow can find this project's UI app (the project pip-installed, as scripts/setup.sh does)."""
    import importlib.metadata

    return any(e.name == UI_APP for e in importlib.metadata.entry_points(group="mlflow.app"))


def ui_command(uri: str, port: int) -> list[str]:
    import sys

    # one worker: more add ~40 ms to every request (uvicorn); the UI binds to loopback only
    # --app-name: MLflow's own app, opening in the model-training view (study/ui_app.py)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]  # fmt: skip
    if ui_app_installed():
        command += ["--app-name", UI_APP]
    root = artifact_store(uri)
    if root is not None:  # proxied artifacts (a committed study's) resolve against the store's folder
        command += ["--artifacts-destination", str(root)]
    return command


def serve_ui(uri: str | None, port: int, echo=print) -> None:
    """Run the MLflow UI in the foreground until Ctrl-C, SIGTERM or SIGHUP, then stop the server and
    every process it started (its own process group), leaving nothing listening. Prints a direct link
    to each study's runs."""
    import importlib.metadata

    import mlflow

    from study.config import ConfigError

    uri = check_tracking_uri(uri, must_exist=True)
    try:  # mlflow-skinny (the GPU bundle's) has the client and the stores, not the server
        importlib.metadata.version("mlflow")
    except importlib.metadata.PackageNotFoundError:
        why = "the MLflow UI needs the full mlflow package (this environment has only mlflow-skinny)"
        raise ConfigError(f"{why}: pip install mlflow, or browse the store from another machine") from None
    experiments = [e for e in mlflow.MlflowClient(uri).search_experiments() if e.name != "Default"]
    command = ui_command(uri, port)
    proc = subprocess.Popen(command, start_new_session=True)
    echo(f"MLflow UI for {uri} at http://127.0.0.1:{port} (Ctrl-C to stop)")
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


def portable_paths(db: Path) -> int:
    """Make a finished SQLite store hold no absolute path of the machine that made it (for committing a
    study, with :func:`relocate_artifacts`). Two kinds are left once artifacts are relocated:

    - each run's ``checkpoint_dir`` tag, ``/machine/.../ROOT/EXPERIMENT/RUN_ID``, becomes the relative
      ``ROOT/EXPERIMENT/RUN_ID`` (the layout every checkpoint root has). Its folder is not committed, so
      readers fall back to the run's checkpoint artifact, as for any folder that is not on this machine;
    - the Default experiment's artifact root, the ``./mlruns`` that MLflow resolved on that machine when
      it created the store, becomes ``mlflow-artifacts:/0`` like every other experiment's.

    Returns the rows changed. MLflow has no API to change an experiment's artifact root, so like
    relocate_artifacts this edits the store's tables directly, the tags too (one transaction); it is for
    committing a study, not for a store a process is writing to."""
    import sqlite3

    changed = 0
    with sqlite3.connect(db) as con:
        tags = con.execute("SELECT run_uuid, value FROM tags WHERE key = ?", (schema.CHECKPOINT_DIR,)).fetchall()
        for run_id, value in tags:
            if value and Path(value).is_absolute():
                portable = "/".join(Path(value).parts[-3:])
                con.execute("UPDATE tags SET value = ? WHERE run_uuid = ? AND key = ?",
                            (portable, run_id, schema.CHECKPOINT_DIR))  # fmt: skip
                changed += 1
        rows = con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
        for exp_id, location in rows:
            if location and (location.startswith("file:") or Path(location).is_absolute()):
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                            (f"mlflow-artifacts:/{exp_id}", exp_id))  # fmt: skip
                changed += 1
    return changed


def relocate_artifacts(db: Path) -> int:
    """Make a SQLite store's artifact locations hold in any copy of it: every ``file://.../mlartifacts/X``
    location of its experiments and runs becomes ``mlflow-artifacts:/X``, which the ``ui`` command's
    server and :func:`local_artifact_dir` resolve against the store's own mlartifacts/ folder. Returns
    the rows changed. MLflow has no API to move a store's artifacts, so this edits its two location
    columns (experiments.artifact_location, runs.artifact_uri) directly; it is for committing a study
    (scripts/pack_study.py), not for a store a process is writing to."""
    import sqlite3

    changed = 0
    with sqlite3.connect(db) as con:
        places = (("experiments", "artifact_location", "experiment_id"), ("runs", "artifact_uri", "run_uuid"))
        for table, column, key in places:
            rows = con.execute(f"SELECT {key}, {column} FROM {table}").fetchall()
            for row_id, location in rows:
                if location and "/mlartifacts/" in location and not location.startswith("mlflow-artifacts:"):
                    new = "mlflow-artifacts:/" + location.split("/mlartifacts/", 1)[1]
                    con.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (new, row_id))
                    changed += 1
    return changed
