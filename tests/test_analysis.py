"""Statistics on hand-made frames with known answers, collection from a real MLflow store, the
accounting audit on a tiny model, and the report end to end."""

import math

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
from analysis.stats import across_seeds, bootstrap_ci, last_window, paired_effects, paired_t_pvalue, variant_table
from study.flows import FlowOptions, RealNVP
from study.run.step import evaluate

# --- statistics ----------------------------------------------------------------------------------


def _history(values_by_run):
    return pd.DataFrame(
        [{"run_id": r, "epoch": e + 1, "val_bpd": v} for r, vals in values_by_run.items() for e, v in enumerate(vals)]
    )


def test_last_window_mean_std_and_stated_window():
    h = _history({"a": [9, 9, 1, 2, 3], "b": [5, 7]})
    out = last_window(h, window=3).set_index("run_id")
    assert out.loc["a", "window_mean"] == 2.0 and out.loc["a", "window_used"] == 3
    assert math.isclose(out.loc["a", "window_std"], math.sqrt(2 / 3))
    assert out.loc["b", "window_mean"] == 6.0 and out.loc["b", "window_used"] == 2  # shorter run: stated
    assert out.loc["b", "last_epoch"] == 2


def test_across_seeds_and_bootstrap_bracket_the_estimate():
    stats = across_seeds([1.0, 2.0, 3.0, float("nan")])
    assert stats["n"] == 3 and stats["mean"] == 2.0 and stats["std"] == 1.0
    assert 1.0 <= stats["ci_lo"] < 2.0 < stats["ci_hi"] <= 3.0
    lo, hi = bootstrap_ci(np.arange(100.0))
    assert lo < 49.5 < hi and hi - lo < 15
    assert all(math.isnan(x) for x in bootstrap_ci([4.0]))
    assert bootstrap_ci([1.0, 2.0, 5.0]) == bootstrap_ci([1.0, 2.0, 5.0])  # seeded


def test_paired_t_pvalue_known_value():
    # diffs 1, 2, 3: t = 2 / (1 / sqrt 3) = 3.4641 with 2 df -> two-sided p = 0.07418
    assert math.isclose(paired_t_pvalue([1.0, 2.0, 3.0]), 0.0741799, rel_tol=1e-5)
    assert math.isnan(paired_t_pvalue([1.0])) and math.isnan(paired_t_pvalue([2.0, 2.0]))


def test_paired_effects_pairs_seeds_and_reports_divergence_separately():
    per_run = pd.DataFrame([
        {"variant": "seed-report", "seed": s, "outcome": "completed", "v": 3.0 + s} for s in range(3)
    ] + [
        {"variant": "worse", "seed": s, "outcome": "completed", "v": 3.5 + s + 0.1 * s} for s in range(3)
    ] + [
        {"variant": "fragile", "seed": 0, "outcome": "completed", "v": 3.0},
        {"variant": "fragile", "seed": 1, "outcome": "diverged", "v": float("nan")},
        {"variant": "fragile", "seed": 2, "outcome": "diverged", "v": float("nan")},
    ])  # fmt: skip
    eff = paired_effects(per_run, "v").set_index("variant")
    assert list(eff.index) == ["fragile", "worse"]
    assert eff.loc["worse", "n_pairs"] == 3 and math.isclose(eff.loc["worse", "mean_diff"], 0.6)
    assert eff.loc["worse", "ci_lo"] <= 0.6 <= eff.loc["worse", "ci_hi"] and eff.loc["worse", "ci_lo"] >= 0.5
    assert eff.loc["fragile", "n_pairs"] == 1 and eff.loc["fragile", "diverged"] == "2/3"
    assert eff.loc["fragile", "mean_diff"] == 0.0  # the finished pair only: divergence is not averaged in


def test_variant_table_counts_divergence_and_uses_finished_runs():
    runs = pd.DataFrame([
        {"run_id": "a", "variant": "x", "seed": 0, "outcome": "completed", "test_bpd": 4.0, "first_nonfinite_epoch": None, "images_per_s": 10.0},
        {"run_id": "b", "variant": "x", "seed": 1, "outcome": "diverged", "test_bpd": float("nan"), "first_nonfinite_epoch": "3", "images_per_s": 12.0},
    ])  # fmt: skip
    t = variant_table(runs, _history({"a": [5, 4, 3], "b": [6, 5]}), window=2).iloc[0]
    assert t["runs"] == 2 and t["diverged"] == 1 and t["first_nonfinite_epoch"] == 3
    assert t["val_mean"] == 3.5 and t["test_mean"] == 4.0 and t["window"] == "2"
    assert t["images_per_s"] == 11.0


def test_paired_effects_reports_scipys_paired_t_and_the_bootstrap_bounds():
    """Oracle: scipy's ttest_rel on the same fixed arrays. With 3 pairs a percentile bootstrap of the
    mean is [min, max] of the differences: a resample of three copies of the minimum has probability
    1/27 > 2.5%, so the 2.5% quantile is the minimum (likewise the maximum)."""
    from scipy import stats

    base = [4.10, 4.31, 4.05]
    variant = [4.22, 4.30, 4.33]
    per_run = pd.DataFrame(
        [{"variant": "seed-report", "seed": s, "outcome": "completed", "v": v} for s, v in enumerate(base)]
        + [{"variant": "x", "seed": s, "outcome": "completed", "v": v} for s, v in enumerate(variant)]
    )
    eff = paired_effects(per_run, "v").set_index("variant").loc["x"]
    diffs = np.subtract(variant, base)
    assert math.isclose(eff["p_value"], stats.ttest_rel(variant, base).pvalue, rel_tol=1e-9)
    assert not math.isclose(eff["p_value"], stats.ttest_ind(variant, base).pvalue, rel_tol=1e-3)  # not unpaired
    assert math.isclose(eff["mean_diff"], diffs.mean(), rel_tol=1e-12)
    assert (eff["ci_lo"], eff["ci_hi"]) == pytest.approx((diffs.min(), diffs.max()), abs=1e-12)


def test_variant_table_reports_the_seed_statistics_of_finished_runs():
    runs = pd.DataFrame([
        {"run_id": f"r{s}", "variant": "x", "seed": s, "outcome": "completed", "test_bpd": t,
         "first_nonfinite_epoch": None, "images_per_s": 1.0}
        for s, t in enumerate([4.0, 4.5, 3.8])
    ])  # fmt: skip
    hist = _history({"r0": [6, 5, 4], "r1": [7, 5, 5], "r2": [5, 4, 3]})
    t = variant_table(runs, hist, window=2).iloc[0]
    val = np.array([4.5, 5.0, 3.5])  # per-run mean of the last 2 epochs
    assert math.isclose(t["val_mean"], val.mean()) and math.isclose(t["val_std_seeds"], val.std(ddof=1))
    assert (t["val_ci_lo"], t["val_ci_hi"]) == pytest.approx((val.min(), val.max()))
    assert math.isclose(t["val_std_within"], np.mean([0.5, 0.0, 0.5]))
    assert math.isclose(t["test_mean"], 4.1) and math.isclose(t["test_std"], np.std([4.0, 4.5, 3.8], ddof=1))


def test_last_window_edges():
    h = _history({"a": [5.0, 4.0, 3.0, 2.0]})
    at = {w: last_window(h, window=w).iloc[0] for w in (1, 3, 4, 9)}
    assert at[1]["window_mean"] == 2.0 and at[1]["window_used"] == 1 and at[1]["window_std"] == 0.0
    assert at[3]["window_mean"] == 3.0 and at[3]["window_used"] == 3  # epochs 2-4, not 1-3
    assert at[4]["window_mean"] == 3.5 and at[4]["window_used"] == 4
    assert at[9]["window_mean"] == 3.5 and at[9]["window_used"] == 4  # never more than the run has
    shuffled = h.sample(frac=1.0, random_state=0)  # row order must not matter: the window is by epoch
    assert last_window(shuffled, window=3).iloc[0]["window_mean"] == 3.0


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
            metrics += [Metric("test_bpd", 5.0 - 0.1 * n_epochs + offset + 0.01 * s, 0, n_epochs)]
            params = [Param("model.mid_channels", "8"), Param("stabilizers.weight_norm", "True"),
                      Param("data.source", "patches")]  # fmt: skip
            client.log_batch(run, metrics=metrics, params=params, tags=[RunTag("x", "y")])
            client.set_terminated(run, "FINISHED")
    return parent


def test_collect_runs_from_a_real_store(store):
    _fabricate(store)
    runs, history, parents = collect_runs(store, "fab")
    assert len(runs) == 4 and len(history) == 12 and list(parents["run_id"].str.len()) == [32]
    row = runs[(runs.variant == "no-l2") & (runs.seed == 1)].iloc[0]
    assert math.isclose(row["val_bpd"], 5.0 - 0.3 + 0.1 + 0.01) and row["epochs"] == 3
    assert row["model.mid_channels"] == 8 and bool(row["stabilizers.weight_norm"]) is True  # typed params
    assert row["outcome"] == "completed" and row["images_per_s"] == 100.0
    assert sorted(history[history.run_id == row.run_id]["epoch"]) == [1, 2, 3]
    with pytest.raises(NoRunsError, match="run `python run_study.py ablation stabilizers`"):
        collect_runs(store, "missing")


def test_sqlite_fast_path_reads_nan_metrics_as_nan_like_the_client(store):
    """MLflow's SQLite store keeps a NaN as value 0 with is_nan set; a non-finite validation epoch
    must not become 0 bits/dim in the report."""
    import mlflow
    from mlflow.entities import Metric

    from analysis.collect import _histories_from_sqlite, _history_via_client

    client = mlflow.MlflowClient(store)
    run = client.create_run(client.create_experiment("nan")).info.run_id
    client.log_batch(run, metrics=[Metric("val_bpd", 5.5, 0, 1), Metric("val_bpd", math.nan, 0, 2)])
    fast = _histories_from_sqlite(store, [run])[run]
    slow = _history_via_client(client, run)
    assert fast[1]["val_bpd"] == slow[1]["val_bpd"] == 5.5
    assert math.isnan(fast[2]["val_bpd"]) and math.isnan(slow[2]["val_bpd"])


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
    readme = generate_report(store, "fab", out, window=40, run_audit=False, command="python run_study.py report")
    text = readme.read_text()
    for needle in (
        "seed-report",
        "no-l2",
        "Window actually used: 4 epoch(s) (the runs are shorter than the window)",
        "| paper (Dinh et al. 2017, Table 1) | 3.49",
        "| seed report (KTH ID2223) | 3.47 | 0.137",
        "chrischute/real-nvp README | 3.7",
        "figures/learning_curves.png",
        "Reduced scale",
    ):
        assert needle in text, needle
    # no-l2 is worse by exactly 0.1 on every seed
    assert "| no-l2 | 3 | +0.100 |" in text
    assert "| seed-report | 3 | 1 | 0 | 0.003 | 4.100 | 1 | `lr-x` |" in text  # best completed lr, pruned counted
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {
        "README.md",
        "learning_curves.png",
        "gradient_norms.png",
        "effects.png",
        "lr_search.png",
    }
    before = {p: p.read_bytes() for p in files}
    generate_report(store, "fab", out, window=40, run_audit=False, command="python run_study.py report")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    parent = mlflow.MlflowClient(store).search_runs(
        [mlflow.MlflowClient(store).get_experiment_by_name("fab").experiment_id],
        filter_string="tags.kind = 'study-parent'")[0]  # fmt: skip
    assert "report/README.md" in {
        a.path for a in mlflow.MlflowClient(store).list_artifacts(parent.info.run_id, "report")
    }


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
