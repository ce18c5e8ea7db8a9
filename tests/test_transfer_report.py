"""The ladder's report from a real (tiny) ladder study, and the GPU check's paper-size step rehearsed on
the CPU: the step's table is the one the report reads beside its prediction."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from analysis import transfer
from tests.conftest import ROOT, SHARED_CIFAR, run_study

RUNGS, RECIPES, LRS = ("8x2", "16x2", "32x2"), ("seed-report-fp32", "no-gradclip-fp32"), ("0.001", "0.03")
CELLS = [f"{r}/{c}/lr{lr}" for r in RUNGS for c in RECIPES for lr in LRS]


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """12 of the ladder's cells x 2 seeds, one epoch of 256 embedded patches each (the rungs' real sizes): at
    lr 1e-3 they train, at 3e-2 most end worse than uniform, so both kinds of cell are in the report."""
    where = tmp_path_factory.mktemp("ladder")
    only = [a for c in CELLS for a in ("--only", c)]
    out = run_study("ablation", "transfer", "--preset", "demo", "--data", "patches", "--seeds", "2", "--epochs", "1",
                    "--set", "data.train_limit=256", "--device", "cpu", *only,
                    cwd=where, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return where


def _report(where, out: str):
    return run_study("report", "--experiment", "transfer-demo", "--tracking-uri", "sqlite:///mlflow.db", "--out", out,
                     "--no-log", cwd=where, timeout=600)  # fmt: skip


@pytest.mark.slow(150)
def test_the_ladder_report_shows_every_cell_the_trend_and_a_labelled_prediction(ladder):
    out = _report(ladder, "report")
    assert out.returncode == 0, out.stderr[-3000:]
    text = (ladder / "report" / "README.md").read_text()
    for section in ("## Learning rate against bits/dim", "## Largest stable learning rate", "## LR sensitivity",
                    "## Each recipe against the seed report's, as the model grows",
                    "## Prediction for the paper's size", "### At the paper's size, on a GPU"):  # fmt: skip
        assert section in text, section
    grid = text[text.index("| rung | recipe | lr 0.001 | lr 0.03 |"):].split("\n\n")[0].splitlines()
    assert len(grid) == 2 + len(RUNGS) * len(RECIPES)  # header, rule, one row per (rung, recipe)
    assert "**An extrapolation from 3 rungs** (94 k to 1.23 M weights) to the paper's 18.52 M" in text
    assert text.count("| no-gradclip-fp32 | ") >= 3 + 3  # the trend and the prediction, one row per measure
    assert "No GPU check is committed" in text
    for figure in ("ladder_curves.png", "ladder_sensitivity.png"):
        assert (ladder / "report" / "figures" / figure).stat().st_size > 10_000
    findings = text[text.index("<!-- findings:start -->"):text.index("<!-- findings:end -->")]
    assert "`no-gradclip-fp32` minus `seed-report-fp32`" in findings and "(extrapolated)" in findings
    (ladder / "report").rename(ladder / "first")  # the same command again: the README names it
    again = _report(ladder, "report")
    assert again.returncode == 0, again.stderr[-3000:]
    files = ["README.md", "figures/ladder_curves.png", "figures/ladder_sensitivity.png"]
    _, mismatch, errors = filecmp.cmpfiles(ladder / "first", ladder / "report", files, shallow=False)
    assert not mismatch and not errors, mismatch + errors


@pytest.mark.slow(180)
def test_the_paper_size_check_rehearses_on_the_cpu_and_its_table_reaches_the_report(ladder, tmp_path):
    """scripts/gpu/check.sh's two paper-stability steps at the rehearsal size (a 4-map model, 2 steps a cell),
    CUDA treated as absent, with this interpreter (mlflow and optuna importable: no bundle), on the real
    CIFAR-10 slices where they lie beside the checkout, else on an npz of the same layout."""
    data = SHARED_CIFAR
    if not data.exists():
        from tests.test_data import _write_npz

        data = tmp_path / "slices"
        data.mkdir()
        _write_npz(data, n_train=160, n_test=20)
    env = {**os.environ, "CHECK_ONLY": "paper-stability,paper-stability-table", "CHECK_SCALE": "rehearsal",
           "CHECK_CUDA": "0", "PY": sys.executable, "OUT": str(tmp_path / "out"), "CHECK_WORK": str(tmp_path / "work"),
           "CHECK_TIME_FACTOR": "5", "DATA": f"npz:{data}"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu" / "check.sh")], env=env, capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert "| paper-stability | pass |" in done.stdout and "| paper-stability-table | pass |" in done.stdout
    table = transfer.read_paper_check(tmp_path / "out" / "paper-stability.csv")
    assert len(table) == 12 and set(table["lr_multiple"]) == {1.0, 3.0, 10.0}
    assert set(table["recipe"]) == {"seed-report-fp32", "no-gradclip-fp32", "paper", "exp+zero-init"}
    assert (table["steps"] == 2).all()  # 1 epoch of the 128 training images // batch 64
    # beside the ladder's store, the report shows it with the consistency line per recipe
    shutil.copy(tmp_path / "out" / "paper-stability.csv", ladder / "paper-stability.csv")
    try:
        out = _report(ladder, "with-check")
        assert out.returncode == 0, out.stderr[-3000:]
        text = (ladder / "with-check" / "README.md").read_text()
        assert "`paper-stability.csv`" not in text or "No GPU check" not in text
        section = text[text.index("### At the paper's size, on a GPU"):text.index("## What these runs support")]
        assert "cpu, " in section and "Each recipe at 4x1 maps x blocks for 2 steps" in section
        assert "| exp+zero-init | 0.01 | 10.0 | 4 | 1 |" in section
        assert "- `no-gradclip-fp32`: unstable at" in section
        # a table that is not one: one line naming the file and the fix, nothing written
        (ladder / "paper-stability.csv").write_text("recipe,lr\npaper,0.001\n")
        bad = _report(ladder, "with-bad-check")
        assert bad.returncode != 0 and "Traceback" not in bad.stderr
        assert "paper-stability.csv: not a paper-stability table (missing lr_multiple" in bad.stderr
        assert not (ladder / "with-bad-check" / "README.md").exists()
    finally:
        (ladder / "paper-stability.csv").unlink()
    assert pd.read_csv(tmp_path / "out" / "paper-stability.csv")["date"].nunique() == 1
