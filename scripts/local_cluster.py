#!/usr/bin/env python
"""The multi-machine layout on one machine: a PostgreSQL database (Optuna's storage, MLflow's backend)
and an MLflow tracking server that serves artifacts itself, so several processes can stand for several
machines. Stops cleanly and leaves nothing running.

    .venv/bin/python scripts/local_cluster.py up FOLDER     # prints the --storage and --tracking-uri to use
    .venv/bin/python scripts/local_cluster.py down FOLDER

FOLDER holds the database cluster (pg/; as root, a temporary folder the postgres user can reach),
the server's artifacts (mlartifacts/), logs and a state file (cluster.json). Needs PostgreSQL's server
programs (Debian: apt-get install postgresql) and the project's postgres extra (pip install
'.[postgres]'). As root, the database runs as the postgres user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

USER, PASSWORD = "study", "study"
# two databases: MLflow and Optuna each keep their schema's version in an alembic_version table, so
# one database cannot hold both (Optuna then refuses MLflow's version as its own)
OPTUNA_DB, MLFLOW_DB = "realnvp_optuna", "realnvp_mlflow"


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or in Debian's versioned folder."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((str(v / name) for v in versions if (v / name).exists()), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_db_user(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:  # PostgreSQL refuses root: run its programs as the postgres user
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def up(folder: Path) -> dict:
    """Start the database and the tracking server; return (and save) their addresses."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise SystemExit("local_cluster: no PostgreSQL server programs (initdb, pg_ctl): apt-get install postgresql")
    if os.geteuid() == 0:  # the postgres user may not reach FOLDER (a root-only temp folder): a folder of its own
        import tempfile

        pg = Path(tempfile.mkdtemp(prefix="realnvp-pg-"))
        shutil.chown(pg, "postgres", "postgres")
    else:
        pg = folder / "pg"
        pg.mkdir(exist_ok=True)
    pg_port, mlflow_port = _free_port(), _free_port()
    _as_db_user([initdb, "-D", str(pg / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    _as_db_user([pg_ctl, "-D", str(pg / "data"), "-l", str(pg / "log"), "-w", "-o",
                 f"-p {pg_port} -h 127.0.0.1 -k {pg}", "start"])  # fmt: skip
    psql = shutil.which("psql") or pg_bin("psql")
    for sql in (f"CREATE USER {USER} PASSWORD '{PASSWORD}'", f"CREATE DATABASE {OPTUNA_DB} OWNER {USER}",
                f"CREATE DATABASE {MLFLOW_DB} OWNER {USER}"):  # fmt: skip
        _as_db_user([psql, "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "-c", sql])
    server_url = f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{pg_port}"
    storage, database = f"{server_url}/{OPTUNA_DB}", f"{server_url}/{MLFLOW_DB}"
    artifacts = folder / "mlartifacts"
    artifacts.mkdir(exist_ok=True)
    log = open(folder / "mlflow-server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", database,
                               "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port",
                               str(mlflow_port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    state = {"storage": storage, "tracking_uri": f"http://127.0.0.1:{mlflow_port}", "pg_data": str(pg / "data"),
             "pg_dir": str(pg),
             "server_pid": server.pid, "pg_port": pg_port, "mlflow_port": mlflow_port}  # fmt: skip
    (folder / "cluster.json").write_text(json.dumps(state, indent=1))
    deadline = time.time() + 120  # the first start migrates MLflow's schema into the database
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(state["tracking_uri"] + "/health", timeout=2):
                return state
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(1)
    down(folder)
    raise SystemExit(f"local_cluster: the MLflow server did not start; see {folder / 'mlflow-server.log'}")


def down(folder: Path) -> None:
    """Stop the tracking server (its whole process group) and the database."""
    folder = folder.resolve()
    state_file = folder / "cluster.json"
    if not state_file.exists():
        return
    state = json.loads(state_file.read_text())
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(state["server_pid"], sig)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(state["server_pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    pg_ctl = pg_bin("pg_ctl")
    if pg_ctl and Path(state["pg_data"]).exists():
        _as_db_user([pg_ctl, "-D", state["pg_data"], "-w", "-m", "fast", "stop"])
    if Path(state["pg_dir"]).parent != folder:  # its own temporary folder (as root): nothing left behind
        shutil.rmtree(state["pg_dir"], ignore_errors=True)
    state_file.unlink()


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        raise SystemExit(__doc__.split("\n\n")[1])
    folder = Path(argv[1])
    if argv[0] == "up":
        state = up(folder)
        print(f"--storage {state['storage']}")
        print(f"--tracking-uri {state['tracking_uri']}")
    else:
        down(folder)
        print("stopped")


if __name__ == "__main__":
    main(sys.argv[1:])
