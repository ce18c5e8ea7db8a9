"""What needs a trained model, not only the logged numbers: why a variant's eval-mode figure is far
from its training figure (batch-norm running statistics against batch statistics), and the
accounting audit. Both load checkpoints through the run's records (its folder, else its artifact)."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd


def _model_and_splits(store, run_id: str, data: dict[str, str] | None):
    from study.data import load_splits
    from study.run.state import checkpoint_of_run, model_from_checkpoint

    model, cfg = model_from_checkpoint(checkpoint_of_run(store, run_id))
    return model, cfg, load_splits(dataclasses.replace(cfg.data, **(data or {})))


def diagnose(runs: pd.DataFrame, history: pd.DataFrame, store, data: dict[str, str] | None,
             variant: str = "paper-literal-exp", recalibrate: int = 20) -> tuple[pd.DataFrame | None, str]:  # fmt: skip
    """Each run of ``variant`` evaluated on its validation split in eval mode, in train mode, and in eval
    mode after re-estimating batch-norm statistics from ``recalibrate`` training batches, beside its
    last logged training bits/dim; (table, why none). A large eval - train gap that recalibration
    closes points at the running statistics; one it does not close points elsewhere."""
    from study.run.evaluation import evaluate_model

    pick = runs[runs["variant"] == variant].sort_values("seed")
    if pick.empty:
        return None, f"no run of `{variant}` in this study"
    rows = []
    for _, r in pick.iterrows():
        try:
            model, cfg, splits = _model_and_splits(store, r["run_id"], data)
        except ValueError as e:
            return None, f"skipped: {e}"
        last = history[history["run_id"] == r["run_id"]].sort_values("epoch")
        logged = float(last["train_bpd"].iloc[-1]) if len(last) else math.nan
        row = {"seed": int(r["seed"]), "outcome": r["outcome"], "epoch": int(last["epoch"].max()) if len(last) else 0,
               "train bpd (logged, train mode)": logged}  # fmt: skip
        for label, mode, recal in (("eval mode", "eval", 0), ("train mode", "train", 0),
                                   (f"eval, recalibrated ({recalibrate} batches)", "eval", recalibrate)):  # fmt: skip
            bpd, se, _, _ = evaluate_model(model, cfg, splits, "val", mode, recal)
            row[f"val {label}"] = bpd
            row[f"se {label}"] = se
        rows.append(row)
    return pd.DataFrame(rows), f"`{variant}`, every seed, validation split"


def audits(runs: pd.DataFrame, store, data: dict[str, str] | None,
           variants: tuple[str, ...] = ("seed-report", "paper")) -> list[tuple[str, pd.DataFrame | None]]:  # fmt: skip
    """The accounting audit (analysis.audit) on the lowest-seed finished run of each of ``variants``
    present (``paper`` has the batch-norm bijector); [(which run or why none, table or None)]."""
    from analysis.audit import audit

    out = []
    for variant in variants:
        pick = runs[(runs["variant"] == variant) & runs["outcome"].isin(["completed", "recovered"])]
        if pick.empty:
            continue
        run = pick.sort_values("seed").iloc[0]
        try:
            model, cfg, splits = _model_and_splits(store, run["run_id"], data)
        except ValueError as e:
            out.append((f"{variant}: skipped: {e}", None))
            continue
        table = audit(model, splits.val, splits.train, batch=cfg.train.eval_batch_size)
        out.append((f"run `{run['run_id']}` ({variant}, seed {run['seed']}, epoch {run['epochs']})", table))
    return out


DIAGNOSED = "paper-literal-exp"  # every seed: diagnose()
AUDITED = ("seed-report", "paper")  # the lowest finished seed of each: audits()


def checkpoint_runs(runs) -> set[str]:
    """Run ids (of MLflow Run objects) whose checkpoints the report loads: every run of DIAGNOSED and the
    lowest-seed finished run of each AUDITED variant. scripts/pack_study.py keeps exactly these."""
    keep = {r.info.run_id for r in runs if r.data.tags.get("variant") == DIAGNOSED}
    for variant in AUDITED:
        done = [r for r in runs if r.data.tags.get("variant") == variant
                and r.data.tags.get("outcome") in ("completed", "recovered")]  # fmt: skip
        if done:
            keep.add(min(done, key=lambda r: int(r.data.tags.get("seed", 0))).info.run_id)
    return keep
