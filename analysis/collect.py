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


def find_experiment(store, experiment: str):
    exp = store.experiment(experiment)
    if exp is None:
        raise NoRunsError(
            f"no experiment {experiment!r} in {store.uri}: run "
            "`python run_study.py ablation stabilizers` (or pass --experiment/--tracking-uri) first"
        )
    return exp


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


def only_study(store) -> str:
    """The name of the store's only experiment holding a study (a parent run), for commands whose
    --experiment is left out; a NoRunsError lists them when there are several or none."""
    names = []
    for exp in store.experiments():
        match = f"tags.{schema.KIND} = '{schema.KIND_STUDY_PARENT}'"
        parents = store.search_runs([exp.experiment_id], match, max_results=1)
        if parents:
            names.append(exp.name)
    if len(names) == 1:
        return names[0]
    if not names:
        raise NoRunsError("this store holds no study: run `run-study ablation stabilizers` first, or pass --experiment")
    raise NoRunsError(f"this store holds several studies ({', '.join(sorted(names))}): pass --experiment NAME")


def _result_of(store, run_id: str, row: dict) -> str:
    """The ``result`` of a run recorded before the tag existed, by the same rule (study.run.outcome),
    from its divergence events artifact; "" for a run that did not end."""
    import json

    from study.run.outcome import classify

    events = []
    if row["outcome"] == "diverged":
        try:
            path = f"{schema.EVENTS_DIR}/{schema.DIVERGENCE_EVENTS_FILE}"
            events = json.loads(store.download_artifact(run_id, path).read_text())
        except FileNotFoundError:  # no events recorded: classified by its outcome alone
            events = []
    final = row["test_bpd"] if math.isfinite(row["test_bpd"]) else row["val_bpd"]
    return classify(row["outcome"], events, final) or ""


def collect_runs(store, experiment: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(runs, history, parents) of an experiment's study in ``store`` (study.store.Store).

    runs: one row per child run (a cell): run_id, parent_run_id, variant, seed, outcome, result (what
        happened to it: study.run.outcome; derived from its events for runs recorded before the tag), status,
        test_bpd, val_bpd (last), epochs, images_per_s (mean over epochs), first_nonfinite_epoch,
        divergence_causes, git_commit, device, skip_reason, excluded (why the run must not be pooled
        with its variant's seeds, "" when it may: see pooling_check), and every ``section.key`` param
        (numbers as numbers).
    history: one row per (run_id, epoch) with the per-epoch metrics of HISTORY_METRICS, plus variant, seed.
    parents: one row per study parent run (run_id, study, preset, git_commit).
    """
    exp = find_experiment(store, experiment)
    all_runs = store.search_runs([exp.experiment_id])
    parents = [r for r in all_runs if r.data.tags.get("kind") == "study-parent"]
    # cells only: not the study's parent, nor learning-rate search runs that share an experiment
    cells = [r for r in all_runs if "variant" in r.data.tags and "kind" not in r.data.tags
             and "lr_search" not in r.data.tags]  # fmt: skip
    if not cells:
        raise NoRunsError(
            f"experiment {experiment!r} has no training runs: run `python run_study.py ablation stabilizers` first"
        )
    rows, hist = [], []
    histories = store.histories([r.info.run_id for r in cells], HISTORY_METRICS)
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
        row["result"] = tags.get("result") or _result_of(store, r.info.run_id, row)
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


def collect_lr_search(store, experiment: str) -> pd.DataFrame:
    """One row per learning-rate search trial run: search, variant, trial, lr, val_bpd (last epoch
    reported), epochs, outcome (completed / pruned / diverged), run_id. Empty when there is none."""
    exp = store.experiment(experiment)
    columns = ["search", "variant", "trial", "lr", "val_bpd", "epochs", "outcome", "run_id"]
    if exp is None:
        return pd.DataFrame(columns=columns)
    rows = []
    for r in store.search_runs([exp.experiment_id]):
        tags = r.data.tags
        if "lr_search" not in tags or tags.get("kind") == "lr-search":
            continue
        history = sorted(store.metric_history(r.info.run_id, "val_bpd"), key=lambda m: m[0])
        rows.append({
            "search": tags["lr_search"], "variant": tags.get("variant", ""), "trial": int(tags.get("trial", -1)),
            "lr": float(r.data.params["train.lr"]), "val_bpd": history[-1][1] if history else float("nan"),
            "epochs": history[-1][0] if history else 0, "outcome": tags.get("outcome", "unfinished"),
            "run_id": r.info.run_id,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=columns).sort_values(["variant", "trial"]).reset_index(drop=True)
