"""`run_study.py dashboard`: optuna-dashboard serves a study's Optuna storage, and stops whole on Ctrl-C."""

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

import pytest

from tests.conftest import ROOT

COMMITTED = ROOT / "studies" / "headline" / "optuna.db"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, seconds: float = 60) -> bytes:
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read()
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow(15)
def test_dashboard_serves_the_storage_and_stops_on_ctrl_c(tmp_path):
    db = tmp_path / "optuna.db"
    shutil.copy(COMMITTED, db)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_study.py"), "dashboard", "--storage", f"sqlite:///{db}",
                             "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/dashboard" in first, first + proc.stderr.read()
        listed = proc.stdout.readline()
        assert "headline" in listed and "complete" in listed, listed  # the sweep, with its trials by state
        assert b"<html" in _get(f"http://127.0.0.1:{port}/dashboard").lower()
        studies = json.loads(_get(f"http://127.0.0.1:{port}/api/studies"))["study_summaries"]
        assert any("headline" in s["study_name"] for s in studies)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 130 and "Optuna dashboard stopped" in out
    with pytest.raises(OSError):  # nothing is left listening
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2)


def test_dashboard_on_a_missing_storage_is_one_line_and_exit_2(tmp_path):
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    out = subprocess.run([sys.executable, str(ROOT / "run_study.py"), "dashboard", "--storage", missing],
                         cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no Optuna storage" in out.stderr and "--storage" in out.stderr
    assert not (tmp_path / "none.db").exists()  # nothing created
