"""The tracking store, through one door: :class:`Store` is the only code that talks to MLflow or
reads the store's files. It is made at the edge (the command line, a test, a worker process's entry)
from a tracking URI and passed down; nothing here reads or sets MLflow's process-wide tracking URI,
so two stores can be open in one process.

Every call waits out a locked SQLite store (study.storage.patiently) unless the store is the
``impatient`` twin, for writes that may be missed (a heartbeat). A Store pickles as its URI, so a
worker process gets the same store. Names of tags, metrics and artifacts come from study.schema.

MLflow's entities (a run's ``.info`` and ``.data``, an experiment) come back as MLflow makes them:
readers use their attributes, never mlflow itself. mlflow is imported on first use (it takes a second),
so a command that never opens a store starts without it.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from study import committed, schema
from study.storage import patiently
from study.tracking import EXPERIMENT_KIND, full_commit, git_commit, resolve_tracking_uri

# no "View run ..." lines and no artifact progress bars in the study's output
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

SEARCH_MAX = 50_000  # runs one search returns (MLflow's default page is 1,000)
SQLITE_CHUNK = 500  # run ids per query of the fast history read (SQLite's variable limit is 32,766)


class PatientClient:
    """An MlflowClient for an explicit URI whose every call waits out a locked store (:func:`patiently`);
    ``impatient`` is the plain client. Only study.store uses it."""

    def __init__(self, uri: str):
        self.uri = uri
        self._client = None

    @property
    def impatient(self):
        import mlflow

        if self._client is None:  # creating the store reads it too: a lock at start-up is waited out
            self._client = patiently(lambda: mlflow.MlflowClient(self.uri), "opening the tracking store")
        return self._client

    def __getattr__(self, name: str):
        method = getattr(self.impatient, name)
        if not callable(method):
            return method
        return lambda *args, **kwargs: patiently(lambda: method(*args, **kwargs), f"MLflow {name}")


class Store:
    """One MLflow tracking store (SQLite, a server database, or a tracking server), by its URI."""

    def __init__(self, uri: str | None = None, patient: bool = True):
        self.uri = resolve_tracking_uri(uri)
        if self.uri.startswith("file:") or "://" not in self.uri:
            raise ValueError(f"tracking URI {self.uri!r} is a file store, which MLflow deprecates: use sqlite:///PATH.db")
        committed.unpack_for(self.uri)  # a committed study's store: its working copy, from the .xz in git
        self.patient = patient
        self._client = PatientClient(self.uri) if patient else None
        self._plain = None

    def __reduce__(self):  # a worker process opens the same store by its URI
        return (Store, (self.uri, self.patient))

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    @property
    def client(self):
        """The MLflow client (patient, or plain for the impatient twin), for this module's use only."""
        if self._client is not None:
            return self._client
        if self._plain is None:
            import mlflow

            self._plain = mlflow.MlflowClient(self.uri)
        return self._plain

    @property
    def impatient(self) -> Store:
        """The same store, whose calls fail at once on a lock instead of waiting (a missed beat is fine)."""
        return Store(self.uri, patient=False)

    # --- experiments --------------------------------------------------------------------------------

    def experiment(self, name: str):
        """The experiment called ``name``, or None."""
        return self.client.get_experiment_by_name(name)

    def experiments(self, include_default: bool = False) -> list:
        """Every active experiment (but MLflow's Default one, unless asked)."""
        return [e for e in self.client.search_experiments() if include_default or e.name != "Default"]

    def set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        self.client.set_experiment_tag(experiment_id, key, value)

    def open_experiment(self, name: str) -> str:
        """The id of experiment ``name``, created if it does not exist (its artifacts beside a SQLite
        store, its kind set so the UI opens it in the model-training view). Creating a SQLite store
        takes seconds and concurrent creation races, so callers that start several workers call this
        once first."""
        exp = self.experiment(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise ValueError(f"experiment {name!r} is deleted in {self.uri}: restore it or pick another name")
            return exp.experiment_id
        root = self.artifact_store()
        location = f"{root.as_uri()}/{name}" if root is not None else None
        try:
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND: "custom_model_development"})  # fmt: skip
        except Exception:  # another process created it between our look and our create
            exp = self.experiment(name)
            if exp is None:
                raise
            return exp.experiment_id

    # --- runs ---------------------------------------------------------------------------------------

    def create_run(self, experiment_id: str, name: str, tags: dict[str, Any], params: dict[str, Any] | None = None,
                   parent_run_id: str | None = None, description: str = "", source: str = "") -> str:  # fmt: skip
        """The one way the study creates an MLflow run (training runs, study and search parents, bench):
        with its tags, the git commit (ours, and MLflow's own source tags, which the UI shows), a
        description, and its params. Returns the run id."""
        commit = git_commit()
        tags = {schema.GIT_COMMIT: commit, schema.SOURCE_TYPE: "LOCAL",
                schema.SOURCE_NAME: source or "run_study.py", **{k: str(v) for k, v in tags.items()}}  # fmt: skip
        if commit != "unknown":
            tags[schema.SOURCE_COMMIT] = full_commit()
        if description:
            tags[schema.NOTE] = description
        if parent_run_id:
            tags[schema.PARENT] = parent_run_id
        run_id = self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def get_run(self, run_id: str):
        return self.client.get_run(run_id)

    def is_live(self, run_id: str) -> bool:
        """Whether the run exists and is not deleted."""
        import mlflow

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except mlflow.exceptions.MlflowException:
            return False

    def search_runs(self, experiment_ids: list[str], where: str = "", order_by: list[str] | None = None,
                    max_results: int = SEARCH_MAX) -> list:  # fmt: skip
        """Runs of these experiments matching MLflow's filter ``where`` ("" for all)."""
        return list(self.client.search_runs(experiment_ids, filter_string=where, order_by=order_by,
                                            max_results=max_results))  # fmt: skip

    def find_run(self, experiment_id: str, run_key: str):
        """The newest run tagged with ``run_key``, or None."""
        runs = self.search_runs([experiment_id], f"tags.{schema.RUN_KEY} = '{run_key}'",
                                ["attributes.start_time DESC"], max_results=1)  # fmt: skip
        return runs[0] if runs else None

    def find_parent(self, experiment_id: str, tags: dict[str, str]) -> str | None:
        """The id of the oldest top-level run (a study's or a search's parent) carrying every one of
        ``tags``, or None."""
        where = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
        runs = self.search_runs([experiment_id], where, ["attributes.start_time ASC"])
        parents = [r for r in runs if schema.PARENT not in r.data.tags]
        return parents[0].info.run_id if parents else None

    def set_status(self, run_id: str, status: str) -> None:
        """RUNNING again (a resume), or an end: FINISHED, FAILED, KILLED (with its end time)."""
        if status == "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        else:
            self.client.set_terminated(run_id, status)

    def set_tag(self, run_id: str, key: str, value: Any) -> None:
        self.client.set_tag(run_id, key, str(value))

    def set_tags(self, run_id: str, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def log_params(self, run_id: str, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in values.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=params[start : start + 100])

    def log_metrics(self, run_id: str, values: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """One step's metrics in one write (``timestamp_ms`` now unless given)."""
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        self.log_metric_rows(run_id, [(k, float(v), now, step) for k, v in values.items()])

    def log_metric_rows(self, run_id: str, rows: Iterable[tuple[str, float, int, int]]) -> None:
        """Metrics as (key, value, timestamp_ms, step) rows, in batches of MLflow's maximum (1,000)."""
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), int(t), int(s)) for k, v, t, s in rows]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged point of one metric, in the order logged."""
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def histories(self, run_ids: list[str], keys: Iterable[str]) -> dict[str, dict[int, dict[str, float]]]:
        """run id -> epoch -> {key: value} for these metrics (every run id, {} for a run with none): by one
        read-only SQL query per 500 runs on a
        SQLite store (one get_metric_history call per run and key costs ~10 ms: seconds for a study),
        else through the API. Both answer the same (tests/test_store.py): a later point of a step wins,
        and a NaN reads NaN."""
        keys = list(keys)
        db = self.sqlite_file()
        if db is None:
            out: dict[str, dict[int, dict[str, float]]] = {}
            for run_id in run_ids:
                per_epoch = out.setdefault(run_id, {})
                for key in keys:
                    for step, value in self.metric_history(run_id, key):
                        per_epoch.setdefault(step, {})[key] = value
            return out
        import sqlite3

        out = {run_id: {} for run_id in run_ids}
        marks_k = ",".join("?" * len(keys))
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            for start in range(0, len(run_ids), SQLITE_CHUNK):
                chunk = run_ids[start : start + SQLITE_CHUNK]
                marks = ",".join("?" * len(chunk))
                # MLflow stores a NaN as value 0 with is_nan set: a diverged epoch must read NaN, not 0 bits/dim
                query = (f"SELECT run_uuid, step, key, value, is_nan FROM metrics WHERE run_uuid IN ({marks}) "
                         f"AND key IN ({marks_k}) ORDER BY timestamp")  # fmt: skip
                for run_id, step, key, value, is_nan in con.execute(query, [*chunk, *keys]):
                    out[run_id].setdefault(int(step), {})[key] = math.nan if is_nan else float(value)
        return out

    # --- artifacts ----------------------------------------------------------------------------------

    def sqlite_file(self) -> Path | None:
        """The database file of a SQLite store (``sqlite:///PATH``, with or without a driver or a query),
        else None."""
        return committed.sqlite_path(self.uri)

    def artifact_store(self) -> Path | None:
        """The artifact folder beside a SQLite store (mlartifacts/), where its proxied artifacts live;
        artifacts of a direct SQLite store go there, not under whatever the cwd is."""
        db = self.sqlite_file()
        return (db.parent / "mlartifacts").resolve() if db is not None else None

    def local_artifact_dir(self, artifact_uri: str) -> Path | None:
        """Where a run's artifacts lie on this disk: a file URI as it is; a proxied ``mlflow-artifacts:/X``
        of a SQLite store (how a committed study records them, so any clone finds them) under the
        store's mlartifacts/X. None when they are elsewhere (a server, or a folder no longer here)."""
        if artifact_uri.startswith("mlflow-artifacts:"):
            root = self.artifact_store()
            path = root / unquote(urlparse(artifact_uri).path).lstrip("/") if root is not None else None
        elif artifact_uri.startswith("file:"):
            path = Path(unquote(urlparse(artifact_uri).path))
        else:
            path = Path(artifact_uri) if "://" not in artifact_uri else None
        return path if path is not None and path.exists() else None

    def log_artifact(self, run_id: str, path: Path, folder: str) -> None:
        self.client.log_artifact(run_id, str(path), folder)

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str) -> None:
        """Add a folder to a run's artifacts, wherever they live (a committed study's proxied folder too)."""
        artifact_uri = self.get_run(run_id).info.artifact_uri
        root = self.artifact_store()
        if artifact_uri.startswith("mlflow-artifacts:") and root is not None:
            target = root / artifact_uri.split(":", 1)[1].lstrip("/") / artifact_path
            shutil.copytree(folder, target, dirs_exist_ok=True)
        else:
            self.client.log_artifacts(run_id, str(folder), artifact_path)

    def download_artifact(self, run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
        """A run's artifact as a local file: read where it lies when it is on this disk, else through
        MLflow (a tracking server's proxy). Raises FileNotFoundError when neither has it."""
        import mlflow

        local = self.local_artifact_dir(self.get_run(run_id).info.artifact_uri)
        if local is not None:
            found = local / artifact_path
            if found.exists():
                return found
            raise FileNotFoundError(f"run {run_id} has no artifact {artifact_path}")
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                            tracking_uri=self.uri,
                                                            dst_path=str(dst) if dst else None))  # fmt: skip
        except Exception as e:
            why = type(e).__name__
            raise FileNotFoundError(f"run {run_id}: artifact {artifact_path} is not reachable ({why})") from None

    def logger(self, run_id: str) -> RunLogger:
        return RunLogger(self, run_id)


class RunLogger:
    """The few writes a training run makes, with the time they take counted (logging overhead); each
    waits out a locked store (study.storage)."""

    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.seconds = 0.0
        # epochs MLflow already holds: an epoch re-trained after a resume from an older checkpoint
        # is not logged a second time, so every epoch appears exactly once
        self.logged = {step for step, _ in store.metric_history(run_id, schema.VAL_BPD)}

    @contextlib.contextmanager
    def timed(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def metrics(self, values: dict[str, float], step: int) -> None:
        if schema.VAL_BPD in values:
            self.logged.add(step)
        with self.timed():
            self.store.log_metrics(self.run_id, values, step)

    def tags(self, values: dict[str, Any]) -> None:
        with self.timed():
            self.store.set_tags(self.run_id, values)

    def artifact(self, path: Path, folder: str) -> None:
        with self.timed():
            self.store.log_artifact(self.run_id, path, folder)

    def terminate(self, status: str) -> None:
        self.store.set_status(self.run_id, status)


class NullLogger(RunLogger):
    """What ranks other than 0 log under torchrun: nothing."""

    def __init__(self):
        self.store, self.run_id, self.seconds, self.logged = None, "", 0.0, set()

    def metrics(self, values, step):
        pass

    def tags(self, values):
        pass

    def artifact(self, path, folder):
        pass

    def terminate(self, status):
        pass


# --- a finished SQLite store, made committable (scripts/pack_study.py) --------------------------------


def relocate_artifacts(db: Path) -> int:
    """Make a SQLite store's artifact locations hold in any copy of it: every ``file://.../mlartifacts/X``
    location of its experiments and runs becomes ``mlflow-artifacts:/X``, which the ``ui`` command's
    server and :meth:`Store.local_artifact_dir` resolve against the store's own mlartifacts/ folder.
    Returns the rows changed. MLflow has no API to move a store's artifacts, so this edits its two
    location columns (experiments.artifact_location, runs.artifact_uri) directly; it is for committing
    a study, not for a store a process is writing to."""
    import sqlite3

    changed = 0
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        places = (("experiments", "artifact_location", "experiment_id"), ("runs", "artifact_uri", "run_uuid"))
        for table, column, key in places:
            rows = con.execute(f"SELECT {key}, {column} FROM {table}").fetchall()
            for row_id, location in rows:
                if location and "/mlartifacts/" in location and not location.startswith("mlflow-artifacts:"):
                    new = "mlflow-artifacts:/" + location.split("/mlartifacts/", 1)[1]
                    con.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (new, row_id))
                    changed += 1
    return changed


def portable_paths(db: Path, root: Path | None = None) -> int:
    """Make a finished SQLite store hold no absolute path of the machine that made it (for committing a
    study, with :func:`relocate_artifacts`). Three kinds are left once artifacts are relocated:

    - each run's ``checkpoint_dir`` tag, ``/machine/.../ROOT/EXPERIMENT/RUN_ID``, becomes the relative
      ``ROOT/EXPERIMENT/RUN_ID`` (the layout every checkpoint root has). Its folder is not committed, so
      readers fall back to the run's checkpoint artifact, as for any folder that is not on this machine;
    - the Default experiment's artifact root, the ``./mlruns`` that MLflow resolved on that machine when
      it created the store, becomes ``mlflow-artifacts:/0`` like every other experiment's;
    - a ``data.path`` param given as an absolute path (``--data npz:/work/shared/...``) becomes relative to
      ``root`` (default: the working directory; the repository root, where every command runs), as a
      relative ``--data`` would have recorded it (``../shared/...``). The run's ``run_key`` tag keeps the
      key it was trained under, which only a resume of the same store on that machine reads.

    Returns the rows changed. MLflow has no API to change an experiment's artifact root, so like
    relocate_artifacts this edits the store's tables directly, the tags too (one transaction)."""
    import sqlite3

    changed = 0
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        tags = con.execute("SELECT run_uuid, value FROM tags WHERE key = ?", (schema.CHECKPOINT_DIR,)).fetchall()
        for run_id, value in tags:
            if value and Path(value).is_absolute():
                portable = "/".join(Path(value).parts[-3:])
                con.execute("UPDATE tags SET value = ? WHERE run_uuid = ? AND key = ?",
                            (portable, run_id, schema.CHECKPOINT_DIR))  # fmt: skip
                changed += 1
        base = (root or Path.cwd()).resolve()
        params = con.execute("SELECT run_uuid, value FROM params WHERE key = 'data.path'").fetchall()
        for run_id, value in params:
            if value and Path(value).is_absolute():
                con.execute("UPDATE params SET value = ? WHERE run_uuid = ? AND key = 'data.path'",
                            (os.path.relpath(value, base), run_id))  # fmt: skip
                changed += 1
        rows = con.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
        for exp_id, location in rows:
            if location and (location.startswith("file:") or Path(location).is_absolute()):
                con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                            (f"mlflow-artifacts:/{exp_id}", exp_id))  # fmt: skip
                changed += 1
    return changed
