"""`run_study.py dashboard`: optuna-dashboard, Optuna's own viewer, on a study's Optuna storage.

The MLflow UI shows runs; this shows the other half of a sweep: each Optuna study's trials, their
states (a killed worker's FAIL and its retry), parameters and values, the learning-rate search's
history and importances. It runs ``optuna-dashboard STORAGE`` on 127.0.0.1 in its own process group,
like the ``ui`` command runs MLflow's server, and stops it whole on Ctrl-C, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from study.config import ConfigError


def dashboard_command(storage: str, port: int) -> list[str]:
    """The optuna-dashboard beside this Python (the venv's), else the one on PATH; a ConfigError naming
    the fix when neither is installed."""
    here = Path(sys.executable).parent / "optuna-dashboard"
    program = str(here) if here.exists() else shutil.which("optuna-dashboard")
    if program is None:
        raise ConfigError("optuna-dashboard is not installed: pip install optuna-dashboard (the set-up installs it)")
    return [program, storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"]


def check_storage_exists(storage: str) -> str:
    """A SQLite storage must exist already (optuna-dashboard would create an empty one and show nothing);
    a server's URL is checked by the caller like any other --storage."""
    if storage.startswith("sqlite:///"):
        path = Path(storage.removeprefix("sqlite:///"))
        if not path.is_file():
            raise ConfigError(f"no Optuna storage at {path}: run an ablation or lr-search first, or pass --storage")
    return storage


def study_lines(storage: str) -> list[str]:
    """One line per sweep in the storage: its name, trials by state; the parent-run claims (trial-less
    bookkeeping, study.sweep.driver) are counted, not listed."""
    import optuna

    from study.sweep.driver import is_claim

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    lines = []
    for s in sorted(summaries, key=lambda s: s.study_name):
        if is_claim(s.study_name):
            continue
        states: dict[str, int] = {}
        for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False):
            states[t.state.name] = states.get(t.state.name, 0) + 1
        counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(states.items())) or "no trials"
        lines.append(f"  {s.study_name}: {counts}")
    claims = sum(is_claim(s.study_name) for s in summaries)
    if claims:
        lines.append(f"  (and {claims} parent-run claim{'s' if claims > 1 else ''}: bookkeeping, no trials)")
    return lines


def serve_dashboard(storage: str, port: int, echo=print) -> None:
    """Run optuna-dashboard in the foreground until Ctrl-C, SIGTERM or SIGHUP, then stop it and every
    process it started, leaving nothing listening."""
    from study_cli.ui import stop_group

    command = dashboard_command(check_storage_exists(storage), port)
    lines = study_lines(storage)
    proc = subprocess.Popen(command, start_new_session=True)
    echo(f"Optuna dashboard for {storage} at http://127.0.0.1:{port}/dashboard (Ctrl-C to stop)")
    for line in lines:
        echo(line)
    try:
        proc.wait()
    except KeyboardInterrupt:
        stop_group(proc)
        echo("Optuna dashboard stopped")
        raise
