"""MLflow -> tidy pandas frames: one row per run, one row per run x epoch."""

from __future__ import annotations

import math

import pandas as pd

from study import schema
from study.schema import HISTORY_METRICS


class NoRunsError(ValueError):
    """The experiment holds no finished study runs; the message says which command makes them."""


def _param_value(text: str):
    """MLflow params are strings: back to bool, int or float where they are one."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _history_via_client(client, run_id: str) -> dict[int, dict[str, float]]:
    per_epoch: dict[int, dict] = {}
    for key in HISTORY_METRICS:
        for m in client.get_metric_history(run_id, key):
            per_epoch.setdefault(m.step, {})[key] = m.value
    return per_epoch


def _histories_from_sqlite(tracking_uri: str | None, run_ids: list[str]) -> dict[str, dict[int, dict]] | None:
    """All per-epoch metrics of ``run_ids`` in one read-only query of a SQLite store's metrics table
    (one get_metric_history call per run and key costs ~10 ms each: seconds for a study). None when
    the store is not a SQLite file, so the caller uses the client API."""
    import sqlite3

    from study.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if not uri.startswith("sqlite:///"):
        return None
    keys = ",".join("?" * len(HISTORY_METRICS))
    out: dict[str, dict[int, dict]] = {}
    with sqlite3.connect(f"file:{uri[len('sqlite:///') :]}?mode=ro", uri=True) as db:
        for start in range(0, len(run_ids), 500):
            chunk = run_ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            # MLflow stores a NaN as value 0 with is_nan set: a diverged epoch must read NaN, not 0 bits/dim
            query = (f"SELECT run_uuid, step, key, value, is_nan FROM metrics WHERE run_uuid IN ({marks}) "
                     f"AND key IN ({keys}) ORDER BY timestamp")  # fmt: skip
            for run_id, step, key, value, is_nan in db.execute(query, [*chunk, *HISTORY_METRICS]):
                out.setdefault(run_id, {}).setdefault(int(step), {})[key] = math.nan if is_nan else float(value)
    return out


def _client(tracking_uri: str | None):
    import mlflow

    from study.tracking import resolve_tracking_uri

    return mlflow.MlflowClient(resolve_tracking_uri(tracking_uri))


def find_experiment(tracking_uri: str | None, experiment: str):
    from study.tracking import resolve_tracking_uri

    exp = _client(tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        raise NoRunsError(
            f"no experiment {experiment!r} in {resolve_tracking_uri(tracking_uri)}: run "
            "`python run_study.py ablation stabilizers` (or pass --experiment/--tracking-uri) first"
        )
    return exp


def metric_histories(tracking_uri: str | None, run_ids: list[str]) -> dict[str, dict[int, dict[str, float]]]:
    """{run_id: {epoch: {metric: value}}} of HISTORY_METRICS: the one place histories are read. A SQLite
    store is read in one read-only query (one client call per run and key costs ~10 ms: seconds for a
    study); any other store through MLflow's public client. tests/test_analysis.py checks both agree."""
    fast = _histories_from_sqlite(tracking_uri, run_ids)
    if fast is not None:
        return {run_id: fast.get(run_id, {}) for run_id in run_ids}
    client = _client(tracking_uri)
    return {run_id: _history_via_client(client, run_id) for run_id in run_ids}


def _expected_identity(variant: str, seed: int, base_params: dict[str, str]) -> dict | None:
    """The identity a cell of ``variant`` and ``seed`` should have under the study's base config (its
    parent's params), or None when the variant is not a known one."""
    from experiments.studies import find_variant
    from study.config import Config, apply_values

    try:
        v = find_variant(variant)
    except KeyError:
        return None
    cfg = apply_values(apply_values(Config(), base_params), {**v.overrides, "train.seed": seed})
    return _comparable(cfg)


def _comparable(cfg) -> dict:
    from analysis.activity import IGNORED
    from study.config import identity

    return {k: v for k, v in identity(cfg).items() if k not in IGNORED}


def pooling_check(runs: pd.DataFrame, parent_params: dict[str, dict[str, str]]) -> pd.Series:
    """Per run, why it must not be pooled with its variant's other seeds ("" when it may be): its
    config disagrees with what its variant and seed give under its study's base config (a mislabelled
    or drifted run), its variant is unknown, or another run holds the same cell (a duplicate: the
    newest finished one is kept)."""
    from study.config import Config, apply_values

    reasons = []
    for _, r in runs.iterrows():
        base = parent_params.get(r["parent_run_id"])
        if not base:
            reasons.append("")  # no study base to check against (a run trained on its own)
            continue
        expected = _expected_identity(r["variant"], int(r["seed"]), base)
        params = {k: str(r[k]) for k in r.index if isinstance(k, str) and "." in k and not pd.isna(r[k])}
        try:
            actual = _comparable(apply_values(Config(), params))
        except ValueError:
            actual = None
        if expected is None:
            reasons.append(f"variant {r['variant']!r} is not a known variant")
        elif actual != expected:
            diff = sorted(k for k in expected if actual is None or actual.get(k) != expected[k])
            reasons.append("config disagrees with its variant: " + ", ".join(diff[:3]))
        else:
            reasons.append("")
    out = pd.Series(reasons, index=runs.index)
    ok = out == ""
    rank = runs["outcome"].isin(["completed", "recovered", "diverged", "skipped"]).astype(int)
    order = runs.assign(_rank=rank).sort_values(["_rank", "end_time"], ascending=False)
    seen = set()
    for idx, r in order.iterrows():
        if not ok[idx]:
            continue
        cell = (r["variant"], int(r["seed"]))
        if cell in seen:
            out[idx] = "duplicate of another run of the same variant and seed"
        seen.add(cell)
    return out


def only_study(tracking_uri: str | None) -> str:
    """The name of the store's only experiment holding a study (a parent run), for commands whose
    --experiment is left out; a NoRunsError lists them when there are several or none."""
    client = _client(tracking_uri)
    names = []
    for exp in client.search_experiments():
        match = f"tags.{schema.KIND} = '{schema.KIND_STUDY_PARENT}'"
        parents = client.search_runs([exp.experiment_id], filter_string=match, max_results=1)
        if parents:
            names.append(exp.name)
    if len(names) == 1:
        return names[0]
    if not names:
        raise NoRunsError("this store holds no study: run `run-study ablation stabilizers` first, or pass --experiment")
    raise NoRunsError(f"this store holds several studies ({', '.join(sorted(names))}): pass --experiment NAME")


def _result_of(run_id: str, row: dict, tracking_uri: str | None) -> str:
    """The ``result`` of a run recorded before the tag existed, by the same rule (study.run.outcome),
    from its divergence events artifact; "" for a run that did not end."""
    import json
    import math

    from study.run.outcome import classify
    from study.tracking import download_artifact

    events = []
    if row["outcome"] == "diverged":
        try:
            path = f"{schema.EVENTS_DIR}/{schema.DIVERGENCE_EVENTS_FILE}"
            events = json.loads(download_artifact(run_id, path, tracking_uri).read_text())
        except FileNotFoundError:  # no events recorded: classified by its outcome alone
            events = []
    final = row["test_bpd"] if math.isfinite(row["test_bpd"]) else row["val_bpd"]
    return classify(row["outcome"], events, final) or ""


def collect_runs(tracking_uri: str | None, experiment: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(runs, history, parents) of an experiment's study.

    runs: one row per child run (a cell): run_id, parent_run_id, variant, seed, outcome, result (what
        happened to it: study.run.outcome; derived from its events for runs recorded before the tag), status,
        test_bpd, val_bpd (last), epochs, images_per_s (mean over epochs), first_nonfinite_epoch,
        divergence_causes, git_commit, device, skip_reason, excluded (why the run must not be pooled
        with its variant's seeds, "" when it may: see pooling_check), and every ``section.key`` param
        (numbers as numbers).
    history: one row per (run_id, epoch) with the per-epoch metrics of HISTORY_METRICS, plus variant, seed.
    parents: one row per study parent run (run_id, study, preset, git_commit).
    """
    client = _client(tracking_uri)
    exp = find_experiment(tracking_uri, experiment)
    all_runs = client.search_runs([exp.experiment_id], max_results=50_000)
    parents = [r for r in all_runs if r.data.tags.get("kind") == "study-parent"]
    # cells only: not the study's parent, nor learning-rate search runs that share an experiment
    cells = [r for r in all_runs if "variant" in r.data.tags and "kind" not in r.data.tags
             and "lr_search" not in r.data.tags]  # fmt: skip
    if not cells:
        raise NoRunsError(
            f"experiment {experiment!r} has no training runs: run `python run_study.py ablation stabilizers` first"
        )
    rows, hist = [], []
    histories = metric_histories(tracking_uri, [r.info.run_id for r in cells])
    for r in cells:
        tags, metrics = r.data.tags, r.data.metrics
        row = {
            "run_id": r.info.run_id,
            "parent_run_id": tags.get("mlflow.parentRunId"),
            "variant": tags["variant"],
            "seed": int(tags.get("seed", -1)),
            "outcome": tags.get("outcome", "unfinished"),
            "status": r.info.status,
            "test_bpd": metrics.get("test_bpd", float("nan")),
            "first_nonfinite_epoch": tags.get("first_nonfinite_epoch"),
            "divergence_causes": tags.get("divergence_causes", ""),
            "git_commit": tags.get("git_commit", ""),
            "device": tags.get("device", ""),
            "preset": tags.get("preset", ""),
            "skip_reason": tags.get("skip_reason", ""),
            "end_time": r.info.end_time or 0,
        }
        for key, value in r.data.params.items():
            row[key] = _param_value(value)
        per_epoch = histories[r.info.run_id]
        for epoch, values in sorted(per_epoch.items()):
            if "val_bpd" not in values:  # a divergence's own epoch: recorded in the run's tags, not a result
                continue
            hist.append({"run_id": r.info.run_id, "variant": row["variant"], "seed": row["seed"], "epoch": epoch,
                         **values})  # fmt: skip
        epochs = [e for e, v in per_epoch.items() if "val_bpd" in v]
        row["epochs"] = max(epochs) if epochs else 0
        row["val_bpd"] = per_epoch[row["epochs"]]["val_bpd"] if epochs else float("nan")
        speeds = [v["images_per_s"] for v in per_epoch.values() if "images_per_s" in v]
        row["images_per_s"] = sum(speeds) / len(speeds) if speeds else float("nan")
        row["result"] = tags.get("result") or _result_of(r.info.run_id, row, tracking_uri)
        rows.append(row)
    runs = pd.DataFrame(rows).sort_values(["variant", "seed", "run_id"]).reset_index(drop=True)
    runs["excluded"] = pooling_check(runs, {p.info.run_id: dict(p.data.params) for p in parents})
    history = pd.DataFrame(hist, columns=["run_id", "variant", "seed", "epoch", *HISTORY_METRICS])
    for col in HISTORY_METRICS:
        if col not in history:
            history[col] = float("nan")
    history = history.sort_values(["variant", "seed", "epoch"]).reset_index(drop=True)
    parent_rows = [
        {"run_id": p.info.run_id, "study": p.data.tags.get("study"), "preset": p.data.tags.get("preset"),
         "git_commit": p.data.tags.get("git_commit"), "status": p.info.status,
         "cells_planned": int(p.data.tags[schema.CELLS_PLANNED]) if schema.CELLS_PLANNED in p.data.tags else None}
        for p in parents
    ]  # fmt: skip
    columns = ["run_id", "study", "preset", "git_commit", "status", "cells_planned"]
    return runs, history, pd.DataFrame(parent_rows, columns=columns)


def collect_lr_search(tracking_uri: str | None, experiment: str) -> pd.DataFrame:
    """One row per learning-rate search trial run: search, variant, trial, lr, val_bpd (last epoch
    reported), epochs, outcome (completed / pruned / diverged), run_id. Empty when there is none."""
    client = _client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    columns = ["search", "variant", "trial", "lr", "val_bpd", "epochs", "outcome", "run_id"]
    if exp is None:
        return pd.DataFrame(columns=columns)
    rows = []
    for r in client.search_runs([exp.experiment_id], max_results=50_000):
        tags = r.data.tags
        if "lr_search" not in tags or tags.get("kind") == "lr-search":
            continue
        history = sorted(client.get_metric_history(r.info.run_id, "val_bpd"), key=lambda m: m.step)
        rows.append({
            "search": tags["lr_search"], "variant": tags.get("variant", ""), "trial": int(tags.get("trial", -1)),
            "lr": float(r.data.params["train.lr"]), "val_bpd": history[-1].value if history else float("nan"),
            "epochs": history[-1].step if history else 0, "outcome": tags.get("outcome", "unfinished"),
            "run_id": r.info.run_id,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=columns).sort_values(["variant", "trial"]).reset_index(drop=True)
