"""Statistics on hand-made frames with known answers, collection from a real MLflow store, the
accounting audit on a tiny model, and the report end to end."""

import math
import shlex
import shutil
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from mlflow.entities import Metric, Param, RunTag

import run_study
from analysis.audit import _masked_logdet_extra, audit
from analysis.collect import NoRunsError, collect_runs
from study.flows import FlowOptions, RealNVP
from study.run.step import evaluate
from study.store import Store

# --- collection from a real store -------------------------------------------------------------------


def _fabricate(store, experiment="fab", n_epochs=3, variants=("seed-report", "no-l2"), seeds=(0, 1)):
    client = mlflow.MlflowClient(store)
    exp = client.create_experiment(experiment)
    parent = client.create_run(exp, tags={"kind": "study-parent", "study": "stabilizers", "preset": "demo",
                                          "git_commit": "abc"}).info.run_id  # fmt: skip
    for v in variants:
        for s in seeds:
            run = client.create_run(exp, tags={"variant": v, "seed": str(s), "outcome": "completed",
                                               "mlflow.parentRunId": parent, "device": "cpu", "git_commit": "abc",
                                               "preset": "demo"}).info.run_id  # fmt: skip
            offset = 0.1 if v == "no-l2" else 0.0
            metrics = [
                Metric(k, base - 0.1 * e + offset + 0.01 * s, 0, e)
                for e in range(1, n_epochs + 1)
                for k, base in (("val_bpd", 5.0), ("train_bpd", 5.2))
            ]
            metrics += [Metric("images_per_s", 100.0, 0, e) for e in range(1, n_epochs + 1)]
            l2 = 0.0 if v == "no-l2" else 5e-5  # the one switch the two variants differ in, and its activity
            metrics += [Metric("l2_penalty", 60 * l2, 0, e) for e in range(1, n_epochs + 1)]
            metrics += [Metric("test_bpd", 5.0 - 0.1 * n_epochs + offset + 0.01 * s, 0, n_epochs)]
            params = [Param("model.mid_channels", "8"), Param("stabilizers.weight_norm", "True"),
                      Param("data.source", "patches"), Param("stabilizers.l2", str(l2))]  # fmt: skip
            client.log_batch(run, metrics=metrics, params=params, tags=[RunTag("x", "y")])
            client.set_terminated(run, "FINISHED")
    return parent


def test_collect_runs_from_a_real_store(store):
    _fabricate(store)
    runs, history, parents = collect_runs(Store(store), "fab")
    assert len(runs) == 4 and len(history) == 12 and list(parents["run_id"].str.len()) == [32]
    row = runs[(runs.variant == "no-l2") & (runs.seed == 1)].iloc[0]
    assert math.isclose(row["val_bpd"], 5.0 - 0.3 + 0.1 + 0.01) and row["epochs"] == 3
    assert row["model.mid_channels"] == 8 and bool(row["stabilizers.weight_norm"]) is True  # typed params
    assert row["outcome"] == "completed" and row["images_per_s"] == 100.0
    assert sorted(history[history.run_id == row.run_id]["epoch"]) == [1, 2, 3]
    with pytest.raises(NoRunsError, match="run `python run_study.py ablation stabilizers`"):
        collect_runs(Store(store), "missing")




# --- the accounting audit ------------------------------------------------------------------------


def _tiny_model(batchnorm=True):
    torch.manual_seed(0)
    stab = FlowOptions(zero_init=False, st_batchnorm=batchnorm, bn_bijector=batchnorm)
    model = RealNVP(3, 2, 4, 1, stab, image_size=8)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    x = torch.rand(16, 3, 8, 8)
    for _ in range(3):  # a few steps so running statistics and weights are not at their init
        opt.zero_grad()
        (-model.log_prob(x).mean()).backward()
        opt.step()
    return model.eval()


def _images(n, seed):
    return torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_audit_correct_row_equals_the_models_bits_per_dim_and_shifts_are_known():
    model = _tiny_model()
    val, train = _images(20, 1), _images(20, 2)
    table = audit(model, val, train, batch=8).set_index("accounting")
    assert math.isclose(table.loc["correct", "bits/dim"], evaluate(model, val, 8), rel_tol=1e-9)
    assert math.isclose(table.loc["logit alpha mismatch", "shift"], -math.log2(0.95 / 0.9), rel_tol=1e-9)
    assert math.isclose(table.loc["no -D log 256 term", "shift"], -8.0, rel_tol=1e-12)
    # train mode by hand: batch statistics of each evaluation batch, written out here
    import copy

    from study.data import eval_batches

    twin, per_image = copy.deepcopy(model).train(), []
    with torch.no_grad():
        for x in eval_batches(val, 8):
            per_image += (-twin.log_prob(x).double() / (model.num_dims * math.log(2)) + 8).tolist()
    assert math.isclose(table.loc["train-mode batch norm", "bits/dim"], sum(per_image) / len(per_image), rel_tol=1e-9)
    assert abs(table.loc["train-mode batch norm", "shift"]) > 1e-3
    # masked half: the shift is exactly minus the extra log-det, computed here from the s-networks
    from study.data import eval_batches

    extra = torch.cat([_masked_logdet_extra(model, x) for x in eval_batches(val, 8)])
    expected = -(extra.mean().item()) / (model.num_dims * math.log(2))
    assert math.isclose(table.loc["log-det over masked half", "shift"], expected, rel_tol=1e-6)
    assert abs(expected) > 1e-4
    assert not model.training  # the audit leaves the model in eval mode


def test_audit_without_batch_norm_has_no_train_mode_shift():
    table = audit(_tiny_model(batchnorm=False), _images(12, 1), _images(12, 2), batch=5).set_index("accounting")
    assert abs(table.loc["train-mode batch norm", "shift"]) < 1e-9
    assert table.loc["unweighted batch means", "what it does"].endswith("[11, 1]")


# --- the report end to end ---------------------------------------------------------------------------


def test_report_end_to_end_is_idempotent(store, tmp_path):
    from analysis.report import generate_report

    _fabricate(store, n_epochs=4, seeds=(0, 1, 2))
    client = mlflow.MlflowClient(store)
    lr_exp = client.create_experiment("lr-search-demo")
    for trial, (lr, outcome, val) in enumerate(
        [(1e-3, "completed", 4.2), (3e-3, "completed", 4.1), (1e-4, "pruned", 5.0)]
    ):
        run = client.create_run(lr_exp, tags={"lr_search": "lr-x", "variant": "seed-report", "trial": str(trial),
                                              "outcome": outcome}).info.run_id  # fmt: skip
        client.log_batch(run, metrics=[Metric("val_bpd", val, 0, 1)], params=[Param("train.lr", str(lr))])
    out = tmp_path / "report"
    readme = generate_report(Store(store), "fab", out, window=40, run_audit=False, command="python run_study.py report")
    text = readme.read_text()
    for needle in (
        "seed-report",
        "no-l2",
        "last 4 of 4 epochs",
        "| paper (Dinh et al. 2017, Table 1) | 3.49",
        "| seed report (KTH ID2223) | 3.47 | 0.137",
        "chrischute/real-nvp README | 3.7",
        "figures/learning_curves.png",
        "Reduced scale",
        "95% Student-t interval",
        "## Every run counted",
    ):
        assert needle in text, needle
    assert "bootstrap" not in text and "95% CI" not in text
    # no-l2 is worse by exactly 0.1 on every seed: a zero-spread difference, detectable, in the necessity family
    row = next(line for line in text.splitlines() if line.startswith("| `no-l2` | `seed-report` (bf16 for its fp16"))
    assert "+0.100 [+0.100, +0.100]" in row and "effect: worse" in row
    assert "| seed-report | 3 | 1 | 0 | 0.003 | 4.100 | 1 | `lr-x` |" in text  # best completed lr, pruned counted
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {
        "README.md",
        "learning_curves.png",
        "gradient_norms.png",
        "effects.png",
        "lr_search.png",
    }
    assert "<!-- findings:start -->" in text and "- `no-l2` against `seed-report` (bf16 for its fp16 + GradScaler): **effect**, worse" in text
    before = {p: p.read_bytes() for p in files}
    generate_report(Store(store), "fab", out, window=40, run_audit=False, command="python run_study.py report")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    parent = mlflow.MlflowClient(store).search_runs(
        [mlflow.MlflowClient(store).get_experiment_by_name("fab").experiment_id],
        filter_string="tags.kind = 'study-parent'")[0]  # fmt: skip
    assert "report/README.md" in {
        a.path for a in mlflow.MlflowClient(store).list_artifacts(parent.info.run_id, "report")
    }


def test_a_report_on_an_unfinished_study_says_so_in_its_first_lines(store, tmp_path):
    from analysis.report import generate_report

    parent = _fabricate(store, seeds=(0, 1))  # 4 cells finished
    client = mlflow.MlflowClient(store)
    client.set_tag(parent, "cells_planned", "6")  # as the ablation records it
    exp = client.get_experiment_by_name("fab").experiment_id
    for seed in (2, 3):  # one cell training (no epoch yet), one interrupted
        run = client.create_run(exp, tags={"variant": "seed-report", "seed": str(seed), "mlflow.parentRunId": parent,
                                           "device": "cpu", "git_commit": "abc", "preset": "demo"}).info.run_id  # fmt: skip
    client.set_tag(run, "outcome", "interrupted")
    client.set_terminated(run, "KILLED")
    text = generate_report(Store(store), "fab", tmp_path / "r", window=40, run_audit=False, command="x").read_text()
    head = "\n".join(text.splitlines()[:3])
    assert "**Unfinished study: 4 of 6 planned cells have finished** (1 running)" in head, head
    assert "last 0 of 0" not in text


def test_unfinished_cells_counts_what_ended_against_the_plan():
    from analysis.report import unfinished_cells

    runs = pd.DataFrame({"status": ["FINISHED", "FAILED", "KILLED", "KILLED"],
                         "outcome": ["completed", "diverged", "skipped", "interrupted"]})  # fmt: skip
    parents = pd.DataFrame({"cells_planned": [4]})
    assert unfinished_cells(runs, parents) == {"finished": 3, "running": 0, "planned": 4}
    assert unfinished_cells(runs.iloc[:3], pd.DataFrame({"cells_planned": [3]})) is None
    legacy = pd.DataFrame({"cells_planned": [None]})  # a parent from before the count: the recorded runs
    assert unfinished_cells(runs.iloc[:3], legacy) is None
    assert unfinished_cells(runs, legacy) == {"finished": 3, "running": 0, "planned": None}


def test_report_without_runs_is_a_one_line_error(store, tmp_path):
    result = CliRunner().invoke(run_study.cli, ["report", "--experiment", "nothing", "--tracking-uri", store,
                                                "--out", str(tmp_path / "r")])  # fmt: skip
    assert result.exit_code == 2
    assert "run `python run_study.py ablation stabilizers`" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_histogram_baseline_known_values():
    from analysis.baselines import histogram_bpd

    rng = np.random.default_rng(0)
    uniform = rng.integers(0, 256, (2000, 3, 8, 8), dtype=np.uint8)
    assert abs(histogram_bpd(uniform, uniform[:500]) - 8.0) < 0.02
    constant = np.zeros((10, 1, 4, 4), dtype=np.uint8)
    # add-one smoothing: p(0) = (160 + 1) / (160 + 256)
    assert math.isclose(histogram_bpd(constant, constant), -math.log2(161 / 416))


def test_a_reports_header_names_the_exact_command_whichever_entry_point_ran_it(store, tmp_path, monkeypatch):
    """Re-running the header's command must write the same report to the same place: through the
    run-study console script (argv[0] is not run_study.py) and from Python (CliRunner) alike."""
    _fabricate(store)
    out = tmp_path / "my report"
    args = ["report", "--experiment", "fab", "--tracking-uri", store, "--out", str(out), "--no-audit", "--no-log"]
    expected = f"`python run_study.py {shlex.join(args)}`"
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/run-study", *args])  # the console script
    result = CliRunner().invoke(run_study.cli, args)
    assert result.exit_code == 0
    assert expected in (out / "README.md").read_text()
    # a report takes a minute: each stage is announced on stderr, in order, with the time so far
    stages = [line.split(" (")[0] for line in result.stderr.splitlines() if line.startswith("report: ")]
    assert stages[0].startswith("report: read 4 runs of fab") and stages[-2:] == ["report: figures",
                                                                                  "report: tables and text"]
    monkeypatch.setattr(sys, "argv", ["pytest"])  # from Python: rebuilt from the options given
    shutil.rmtree(out)
    assert CliRunner().invoke(run_study.cli, args).exit_code == 0
    assert expected in (out / "README.md").read_text()
