"""`run_study.py dashboard`: optuna-dashboard serves a study's Optuna storage, and stops whole on Ctrl-C."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import ROOT, free_port, http_get, serving

COMMITTED = ROOT / "studies" / "headline" / "optuna.db"


@pytest.mark.slow(15)
def test_dashboard_serves_the_storage_and_stops_on_ctrl_c(tmp_path):
    db = tmp_path / "optuna.db"
    shutil.copy(COMMITTED, db)
    port = free_port()
    command = [sys.executable, str(ROOT / "run_study.py"), "dashboard", "--storage", f"sqlite:///{db}",
               "--port", str(port)]  # fmt: skip
    with serving(command, tmp_path) as proc:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/dashboard" in first, first + proc.stderr.read()
        listed = proc.stdout.readline()
        assert "headline" in listed and "complete" in listed, listed  # the sweep, with its trials by state
        assert b"<html" in http_get(f"http://127.0.0.1:{port}/dashboard").lower()
        studies = json.loads(http_get(f"http://127.0.0.1:{port}/api/studies"))["study_summaries"]
        assert any("headline" in s["study_name"] for s in studies)
    assert proc.returncode == 130 and "Optuna dashboard stopped" in proc.out
    with pytest.raises(OSError):  # nothing is left listening
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2)


def test_dashboard_on_a_missing_storage_is_one_line_and_exit_2(tmp_path):
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    out = subprocess.run([sys.executable, str(ROOT / "run_study.py"), "dashboard", "--storage", missing],
                         cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no Optuna storage" in out.stderr and "--storage" in out.stderr
    assert not (tmp_path / "none.db").exists()  # nothing created
