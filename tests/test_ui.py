"""The MLflow UI in a real browser: headless Chromium shows the experiment and a run's metric."""

import contextlib
import sys
from pathlib import Path

import pytest

from experiments.studies import plan_study
from study.run.engine import train
from tests.conftest import (
    BROWSER,
    CHROMIUM,
    COMMITTED_STUDIES,
    MLFLOW_SERVER,
    PLAYWRIGHT,
    ROOT,
    copy_committed_study,
    free_port,
    http_get,
    needs,
    serving,
)
from tests.test_training import spec

ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots land here (ignored by git)

pytestmark = needs(BROWSER, PLAYWRIGHT, MLFLOW_SERVER)


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextlib.contextmanager
def _ui_page(store: str, cwd: Path):
    """`run_study.py ui` on STORE and a headless Chromium page; yields (base URL, page, the command's
    first line). On leaving, Ctrl-C stops the command, which must say so and exit 130 (128 + SIGINT)."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    command = [sys.executable, str(ROOT / "run_study.py"), "ui", "--tracking-uri", store, "--port", str(port)]
    with serving(command, cwd) as ui:
        first = ui.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first
        http_get(f"http://127.0.0.1:{port}/health")
        ARTIFACTS.mkdir(exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            yield f"http://127.0.0.1:{port}", browser.new_page(viewport={"width": 1400, "height": 900})
            browser.close()
    assert ui.returncode == 130 and "MLflow UI stopped" in ui.out


@pytest.mark.slow(25)
def test_ui_shows_the_experiment_and_a_metric(store, tmp_path):
    import mlflow

    result = train(spec(store, tmp_path, experiment="ui-check", **{"train.epochs": 2}))
    exp_id = mlflow.MlflowClient(store).get_experiment_by_name("ui-check").experiment_id
    with _ui_page(store, tmp_path) as (base, page):
        # the link the command prints opens the model-training view, not MLflow 3's GenAI one
        page.goto(f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
        page.get_by_text("ui-check").first.wait_for(timeout=60_000)
        page.get_by_text("Model registry").first.wait_for(timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow-ui-experiments.png"))
        page.goto(f"{base}/#/experiments/{exp_id}/runs/{result.run_id}")
        metric = page.get_by_text("val_bpd").first
        metric.wait_for(timeout=60_000)
        metric.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "mlflow-ui-run-metrics.png"))
    assert (ARTIFACTS / "mlflow-ui-run-metrics.png").stat().st_size > 10_000


COMMITTED = COMMITTED_STUDIES


@pytest.mark.slow(30)
@pytest.mark.skipif(not COMMITTED, reason="no committed study in studies/")
@pytest.mark.parametrize("committed", COMMITTED, ids=[p.name for p in COMMITTED])
def test_ui_of_a_committed_study_copied_anywhere_shows_its_runs_charts_and_sample_grids(committed, tmp_path):
    """What a fresh clone sees of the committed study, copied to a new place: the study in the
    model-training view, its parent run expanding to the nested runs, one run's val_bpd chart, and
    that run's sample grid (artifact locations resolve against the store's own folder,
    scripts/pack_study.py)."""
    import mlflow

    from study import schema
    from study.store import Store

    study = tmp_path / "elsewhere" / committed.name
    store = f"sqlite:///{copy_committed_study(committed, study)}"
    client = mlflow.MlflowClient(store)
    (exp,) = [e for e in client.search_experiments() if e.name != "Default"]
    # the sample grids the packed study keeps, found on disk the way the report finds them
    grids = {}
    for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'"):
        if "mlflow.parentRunId" not in r.data.tags:  # the study's parent run holds no grid
            continue
        folder = Store(store).local_artifact_dir(r.info.artifact_uri)
        grids[r.info.run_id] = (r.info.run_name, sorted((folder / schema.SAMPLES_DIR).glob("*.png")) if folder else [])
    assert all(files for _, files in grids.values()), "a finished run of the committed study has no sample grid"
    run_id, (run_name, files) = next(iter(grids.items()))
    grid = f"{schema.SAMPLES_DIR}/{files[-1].name}"
    runs_page = f"#/experiments/{exp.experiment_id}/runs"
    with _ui_page(store, tmp_path) as (base, page):
        page.goto(f"{base}/{runs_page}?workflowType=machine_learning")
        page.get_by_text("Model registry").first.wait_for(timeout=60_000)  # the model-training view
        expand = page.locator("button[data-component-id*='runnamecellrenderer']").first  # the parent's [+]
        expand.wait_for(timeout=60_000)
        links = f"document.querySelectorAll(\"a[href*='{runs_page}/']\").length"
        assert page.evaluate(links) == 1  # the study's parent run alone, its cells folded in
        expand.click()
        page.wait_for_function(f"{links} > 2", timeout=60_000)  # the nested runs
        page.screenshot(path=str(ARTIFACTS / f"mlflow-ui-{committed.name}-runs.png"))
        page.goto(f"{base}/{runs_page}/{run_id}/model-metrics")
        search = page.get_by_placeholder("Search metric charts")  # charts render lazily, val_bpd is far down
        search.wait_for(timeout=60_000)
        search.fill("val_bpd")
        page.get_by_text(f"{run_name} (val_bpd)").first.wait_for(timeout=60_000)  # the chart's legend
        page.screenshot(path=str(ARTIFACTS / f"mlflow-ui-{committed.name}-val-bpd.png"))
        page.goto(f"{base}/{runs_page}/{run_id}/artifacts/{grid}")
        image = page.locator("img[src^='blob:']").first  # the grid, fetched through the server
        image.wait_for(timeout=60_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        page.screenshot(path=str(ARTIFACTS / f"mlflow-ui-{committed.name}-sample-grid.png"))
        assert page.get_by_text(grid).count() > 0 and page.get_by_text("No Artifacts Recorded").count() == 0


@pytest.mark.slow(40)
def test_runs_and_the_compare_page_open_in_the_model_training_view(tmp_path):
    """MLflow 3's UI remembers GenAI as its view unless told otherwise, and its own links drop the URL's
    workflowType: the first click on a run landed in GenAI's "Evaluations". The project's server makes
    model training the browser's default (study/ui_app.py): a fresh browser clicks from the printed
    experiment link into a child run, opens the compare page, and sees the parent's bits/dim first."""
    from experiments.presets import preset_config
    from study.config import apply_values
    from study.sweep import ablation as ab
    from tests.conftest import TINY_RUN

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base_cfg = apply_values(preset_config("demo"), {**TINY_RUN, "train.epochs": 1, "data.train_limit": 64})
    plan = plan_study("stabilizers", "demo", base_cfg, (0,), ("seed-report", "paper"), "cpu",
                        experiment="view-check", storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                        tracking_uri=store, checkpoint_root=tmp_path / "ckpt")  # fmt: skip
    ab.run(plan, workers=1, echo=lambda s: None)
    import mlflow

    client = mlflow.MlflowClient(store)
    exp = client.get_experiment_by_name("view-check")
    runs = client.search_runs([exp.experiment_id])
    children = [r.info.run_id for r in runs if "mlflow.parentRunId" in r.data.tags]
    (parent,) = [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(children) == 2
    runs_page = f"#/experiments/{exp.experiment_id}/runs"

    def in_model_training_view(page) -> bool:
        page.get_by_text("Model registry").first.wait_for(timeout=60_000)  # the model-training sidebar
        genai = ("Evaluation runs", "Evaluations", "Sessions", "Judges")  # GenAI's sidebar and breadcrumb
        return not any(page.get_by_text(word, exact=True).count() for word in genai)

    with _ui_page(store, tmp_path) as (base, page):
        page.goto(f"{base}/{runs_page}?workflowType=machine_learning")  # the link `ui` prints
        expand = page.locator("button[data-component-id*='runnamecellrenderer']").first  # the parent's [+]
        expand.wait_for(timeout=60_000)
        expand.click()
        child = page.locator(f"a[href$='{runs_page}/{children[0]}']").first
        child.wait_for(timeout=60_000)
        child.click()  # MLflow's own link, without the workflowType parameter
        page.wait_for_url(f"**/runs/{children[0]}**", timeout=60_000)
        page.get_by_text("Model metrics", exact=True).first.wait_for(timeout=60_000)  # the run's tabs
        assert in_model_training_view(page)
        page.screenshot(path=str(ARTIFACTS / "mlflow-ui-child-run-view.png"))
        page.goto(f"{base}/#/compare-runs?runs=[\"{children[0]}\",\"{children[1]}\"]"
                  f"&experiments=[\"{exp.experiment_id}\"]")  # fmt: skip
        page.get_by_text("Comparing 2 Runs").first.wait_for(timeout=60_000)
        assert in_model_training_view(page)
        page.screenshot(path=str(ARTIFACTS / "mlflow-ui-compare-view.png"))
        page.goto(f"{base}/{runs_page}/{parent}/model-metrics")
        page.get_by_text("val_bpd", exact=True).first.wait_for(timeout=60_000)  # a section of charts
        assert in_model_training_view(page)
        text = page.inner_text("body")
        # the first section of charts after the tab's own controls is bits/dim (prefixed metrics come
        # first, alphabetically; the cell counts, unprefixed, sit in the last section, "Model metrics")
        charts = text.split("Auto-refresh", 1)[1].split()
        assert charts[0] in ("test_bpd", "val_bpd"), charts[:20]
        page.screenshot(path=str(ARTIFACTS / "mlflow-ui-parent-metrics.png"))
