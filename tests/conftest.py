"""Shared test helpers: float64 Jacobians and tiny models."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from study import committed
from study.flows import FlowOptions

# One intra-op thread in the test process: the tiny models here gain nothing from two, and when
# subprocesses (CLI runs, workers) share the 2 cores, OpenMP's spinning threads make every small
# convolution 50-100x slower (measured: 1.5 s against 20 ms for one step of a 4-map model).
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]  # the repository: the one definition the tests share
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-slices"


# --- tools some tests drive for real ----------------------------------------------------------------
# Each is (what is missing and how to get it, present?). Where one is absent the tests that need it
# are skipped, loudly; in CI (.ci/run installs them all and sets CI=1) an absence is an error instead,
# so a skip can never hide there. The GPU rehearsal's interpreter (scripts/gpu/rehearse.sh), like the
# device image, has none of them: no mlflow server, browser driver or PostgreSQL driver travel.


def has_dist(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
MLFLOW_SERVER = ("the MLflow server (the full mlflow package, not mlflow-skinny): pip install mlflow",
                 has_dist("mlflow"))  # fmt: skip
PLAYWRIGHT = ("playwright: pip install -e '.[dev]'", importlib.util.find_spec("playwright") is not None)
BROWSER = ("Debian chromium: apt-get install chromium (.ci/run installs it)", Path(CHROMIUM).exists())
PSYCOPG2 = ("the psycopg2 driver: pip install -e '.[postgres]'", importlib.util.find_spec("psycopg2") is not None)


def needs(*tools: tuple[str, bool]) -> pytest.MarkDecorator:
    """A skip marker for tests that need TOOLS; in CI a missing tool fails the collection instead."""
    missing = "; ".join(what for what, present in tools if not present)
    if missing and os.environ.get("CI"):
        raise RuntimeError(f"CI must run every test; missing: {missing}")
    if missing:
        warnings.warn(f"tests SKIPPED here, missing: {missing}", stacklevel=2)
    return pytest.mark.skipif(bool(missing), reason=f"missing: {missing}")


# --- order: the longest tests first --------------------------------------------------------------
# pytest-xdist hands tests to its workers in collection order; a long test collected last runs alone
# at the end while the other worker idles. @pytest.mark.slow(seconds) (measured alone, on 2 cores)
# puts a test first, the longest first; `-m "not slow"` leaves them out for a quick pass.


def pytest_configure(config):
    # pytest-xdist's load scheduling hands each worker a block of consecutive tests first (a quarter
    # of its share): with the slow tests first, one worker got all of them. One test at a time, taken
    # by whichever worker is free, runs the longest first on both.
    if hasattr(config.option, "maxschedchunk") and config.option.maxschedchunk is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
    def seconds(item) -> float:
        mark = item.get_closest_marker("slow")
        return float(mark.args[0]) if mark and mark.args else 0.0

    items.sort(key=seconds, reverse=True)  # stable: the rest keep their order


def jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at one example x (1, ...), by autograd in the dtype of x."""
    shape = x.shape

    def flat(v):
        out = fn(v.reshape(shape))
        return out.reshape(-1)

    jac = torch.autograd.functional.jacobian(flat, x.reshape(-1))
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    return logabsdet


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter and batch-norm statistic a random, non-trivial value (zero-init couplings
    are the identity, which would make Jacobian tests vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
        for name, buf in module.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=gen, dtype=buf.dtype) * 0.2)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=gen, dtype=buf.dtype) + 0.5)
    return module


SCALE_FNS = ["exp", "tanh", "softplus"]


@pytest.fixture(params=SCALE_FNS)
def scale_fn(request):
    return request.param


def stab(**kw) -> FlowOptions:
    return FlowOptions(**kw)


# --- servers a test starts (the MLflow UI, optuna-dashboard) ----------------------------------------


COMMITTED_STUDIES = sorted(p.parent for p in (ROOT / "studies").glob("*/mlflow.db.xz"))  # what git holds
WORKING_COPY = ("mlflow.db", "mlflow.db" + committed.FROM)  # beside it, git-ignored: unpacked by every command


def copy_committed_study(study: Path, dest: Path) -> Path:
    """A committed study's folder copied to ``dest`` as a fresh clone has it (its MLflow store only as
    mlflow.db.xz), then its store unpacked there as every command does (study.committed); the store's
    path."""
    shutil.copytree(study, dest, ignore=shutil.ignore_patterns(*WORKING_COPY))
    committed.unpack(dest / "mlflow.db")
    return dest / "mlflow.db"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def study_cmd(*args, faults=()) -> list[str]:
    """The argv of ``python run_study.py ARGS``, or of tests/faults.py injecting ``faults`` before it runs
    the same command line (see tests/faults.py for the faults it knows)."""
    entry = [str(ROOT / "tests" / "faults.py"), *faults, "--"] if faults else [str(ROOT / "run_study.py")]
    return [sys.executable, *entry, *map(str, args)]


def run_study(*args, cwd, faults=(), timeout: float = 300, env: dict | None = None):
    """The command line run to its end in a subprocess in ``cwd``; its output captured as text (the
    test suite's one way to run it in another process, with :func:`start_study`)."""
    import subprocess

    return subprocess.run(study_cmd(*args, faults=faults), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)  # fmt: skip


def start_study(*args, cwd, faults=(), env: dict | None = None, merged: bool = False, own_group: bool = False):
    """The command line started in a subprocess in ``cwd``, its output streamed as text, unbuffered (a
    test reads it line by line to act mid-run). ``merged``: stderr into stdout; ``own_group``: its own
    process group, so a test can kill it with every worker it spawned."""
    import subprocess

    return subprocess.Popen(study_cmd(*args, faults=faults), cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            start_new_session=own_group)  # fmt: skip


@contextlib.contextmanager
def serving(args: list[str], cwd):
    """A serving command (``ui``, ``dashboard``) in its own process group; on leaving, Ctrl-C, as a user
    stops it. Its stdout so far is ``proc.out`` afterwards (all of its group killed if it outlives 30 s)."""
    import signal
    import subprocess

    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends: the command stops its server cleanly
        try:
            proc.out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def http_get(url: str, seconds: float = 90) -> bytes:
    """The body of ``url`` once it answers 200, waiting up to ``seconds`` for a server to come up."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return r.read()
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


# --- MLflow stores --------------------------------------------------------------------------------
# Creating a SQLite MLflow store takes seconds; one template per session is copied for each test.


@pytest.fixture(scope="session")
def _store_template(tmp_path_factory):
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, _store_template):
    """A fresh SQLite tracking URI in tmp_path (mlflow.db), from the session's template."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copy(_store_template, db)
    return f"sqlite:///{db}"


TINY_RUN = {
    "data.source": "patches",
    "data.train_limit": 96,
    "data.val_fraction": 0.05,
    "model.num_scales": 2,
    "model.mid_channels": 4,
    "model.num_blocks": 1,
    "train.epochs": 3,
    "train.batch_size": 32,
    "train.eval_batch_size": 100,
    "train.sample_every": 2,
    "train.threads": 1,
}


def flip_middle(path, n: int = 64) -> None:
    """Invert ``n`` bytes in the middle of a file: a torn sector, a bad disk, a bad copy."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def tiny_overrides(**extra) -> list[str]:
    """TINY_RUN (plus extra) as --set arguments."""
    values = {**TINY_RUN, **extra}
    return [x for k, v in values.items() for x in ("--set", f"{k}={v}")]
