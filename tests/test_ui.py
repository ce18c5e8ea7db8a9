"""The MLflow UI in a real browser: headless Chromium shows the experiment and a run's metric."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from study.run import train
from tests.test_training import spec

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots land here (ignored by git)

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (.ci/run installs it)"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


def test_ui_shows_the_experiment_and_a_metric(store, tmp_path):
    from playwright.sync_api import sync_playwright

    result = train(spec(store, tmp_path, experiment="ui-check", **{"train.epochs": 2}))
    port = _free_port()
    ui = subprocess.Popen(
        [sys.executable, str(ROOT / "run_study.py"), "ui", "--tracking-uri", store, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert f"http://127.0.0.1:{port}" in ui.stdout.readline()
        _wait_for(f"http://127.0.0.1:{port}/health")
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/#/experiments")
            page.get_by_text("ui-check").first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow-ui-experiments.png"))
            exp_id = __import__("mlflow").MlflowClient(store).get_experiment_by_name("ui-check").experiment_id
            page.goto(f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs/{result.run_id}")
            metric = page.get_by_text("val_bpd").first
            metric.wait_for(timeout=60_000)
            metric.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "mlflow-ui-run-metrics.png"))
            browser.close()
    finally:
        ui.send_signal(signal.SIGINT)  # what Ctrl-C sends: the command stops the server cleanly
        try:
            out, _ = ui.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            raise
    assert ui.returncode == 130 and "MLflow UI stopped" in out  # Ctrl-C: 128 + SIGINT
    assert (ARTIFACTS / "mlflow-ui-run-metrics.png").stat().st_size > 10_000
