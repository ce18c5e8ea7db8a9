"""Which tracking store, checked before anything is written, and which code: the tracking URI (resolved
and checked for a usable scheme, folder or server) and the git commit every run records. Nothing here
talks to MLflow: study.store is the one door to the store.

Default store: the MLFLOW_TRACKING_URI environment variable, else ``sqlite:///mlflow.db`` in the
working directory with artifacts in ``mlartifacts/`` beside it (never the deprecated file store).
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from study import committed

DEFAULT_DB = "mlflow.db"
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
        path = committed.sqlite_path(url)  # the one reading of a sqlite URI: a driver, a ?query dropped
        if path is None and ":///:memory:" in url:
            return  # the in-memory database: no file to check
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
    committed.unpack_for(uri)  # a committed study's store: its working copy, from the .xz in git
    check_database_url(uri, "tracking URI", must_exist)
    return uri


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
