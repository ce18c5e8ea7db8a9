"""The MLflow server app that `run_study.py ui` runs: MLflow's own, with the model-training view as the
browser's default.

MLflow 3's UI has two views, GenAI and model training, and picks one per page: the URL's
``workflowType`` parameter if there is one, else the browser's remembered choice (localStorage
``mlflow.workflowType_v1``), else GenAI. The experiment's ``mlflow.experimentKind`` tag only names the
experiment's kind. So a link with the parameter opens the right view, but the first click on a run or
on Compare drops it and lands in GenAI's "Evaluations" (seen in a browser, MLflow 3.17). Here the page
the server hands out remembers "model training" for a browser that has not chosen yet; the UI's own
GenAI / Model training switch still changes it, and a browser that chose keeps its choice.

Served through MLflow's plugin door: the ``mlflow.app`` entry point ``realnvp-ui`` (pyproject.toml),
run as ``mlflow server --app-name realnvp-ui`` by study.ui.ui_command.
"""

from __future__ import annotations

import os

from flask import Response
from mlflow.server import app as flask_app
from mlflow.server.fastapi_app import app  # noqa: F401  (the ASGI app uvicorn runs; it mounts flask_app)

WORKFLOW_KEY = "mlflow.workflowType_v1"  # the UI's useLocalStorage key: f"{key}_v{version}"
_SET_IF_UNSET = "try{if(!localStorage.getItem(K))localStorage.setItem(K,JSON.stringify('machine_learning'))}catch(e){}"
DEFAULT_VIEW = "<script>" + _SET_IF_UNSET.replace("K", repr(WORKFLOW_KEY)) + "</script>"


def index_html(page: str) -> str:
    """MLflow's index.html with the default view set before its scripts run (first thing in <head>)."""
    return page.replace("<head>", "<head>" + DEFAULT_VIEW, 1) if DEFAULT_VIEW not in page else page


def _serve_index():
    path = os.path.join(flask_app.static_folder, "index.html")
    if not os.path.exists(path):  # a source checkout of MLflow without its built UI: MLflow's own answer
        return _mlflow_serve()
    with open(path, encoding="utf-8") as f:
        return Response(index_html(f.read()), mimetype="text/html")


_mlflow_serve = flask_app.view_functions["serve"]  # "/" and every client-side route
flask_app.view_functions["serve"] = _serve_index  # looked up per request, so the mounted app sees it
