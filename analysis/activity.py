"""Did a variant's switch act? Decided from the runs alone, never from a list written by hand.

For a comparison (variant against its comparator) the switches are the config keys whose recorded
values differ. A switch with an activity metric (study.schema.SWITCH_ACTIVITY) acted when that metric
is above 0 in some epoch of some run of the arm where the switch is on (clipping that clips, a clamp
that moves values, an L2 term that is not 0, AMP that is on). A switch without one changes the
model's function wherever it differs (structural). Whatever the metrics say, a variant whose every
paired result is bit-identical to its comparator's did not act: a change that alters nothing cannot
be told from no change.
"""

from __future__ import annotations

import math

import pandas as pd

from study import schema

# keys that describe where or how fast a run went, not what it computed
IGNORED = ("train.seed", "train.threads", "train.compile", "train.channels_last", "data.path")


def switches(runs: pd.DataFrame, variant: str, against: str) -> dict[str, tuple[object, object]]:
    """{config key: (value in ``against``, value in ``variant``)} for every key whose recorded values
    differ. runs: one row per run with variant and every ``section.key`` param."""
    keys = [c for c in runs.columns if "." in c and c.split(".", 1)[0] in ("data", "model", "stabilizers", "train")
            and c not in IGNORED]  # fmt: skip
    a = runs[runs["variant"] == against]
    b = runs[runs["variant"] == variant]
    if a.empty or b.empty:
        return {}
    out = {}
    for key in keys:
        va, vb = a[key].iloc[0], b[key].iloc[0]
        if not (pd.isna(va) and pd.isna(vb)) and va != vb:
            out[key] = (va, vb)
    return out


def _on(key: str, value: object) -> bool:
    """Whether a switch is on at ``value`` (the arm where its activity metric can be above 0)."""
    if key == "stabilizers.amp":
        return value != "off"
    if key in ("stabilizers.s_clamp_kind", "stabilizers.logit_logdet"):
        return True  # either value is "on": the metric in either arm says whether the choice matters
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return bool(value)


def switch_activity(runs: pd.DataFrame, history: pd.DataFrame, variant: str, against: str) -> list[dict]:
    """One row per differing switch: key, values, metric, the arm where it is on, the largest value of
    its activity metric there (None when the switch has no metric: structural), and ``acted``."""
    rows = []
    for key, (va, vb) in switches(runs, variant, against).items():
        metric = schema.SWITCH_ACTIVITY.get(key)
        if metric is None:
            rows.append({"switch": key, "from": va, "to": vb, "metric": None, "arm": None, "level": None,
                         "acted": True})  # fmt: skip
            continue
        arm = variant if _on(key, vb) else against if _on(key, va) else None
        ids = set(runs.loc[runs["variant"] == arm, "run_id"]) if arm else set()
        values = history.loc[history["run_id"].isin(ids), metric] if metric in history else pd.Series(dtype=float)
        level = float(values.max()) if len(values.dropna()) else 0.0
        rows.append({"switch": key, "from": va, "to": vb, "metric": metric, "arm": arm, "level": level,
                     "acted": level > schema.SWITCH_THRESHOLD.get(metric, 0.0)})  # fmt: skip
    return rows


def acted(runs: pd.DataFrame, history: pd.DataFrame, variant: str, against: str, identical: bool) -> tuple[bool, str]:
    """(did the change act, why in words) for ``variant`` against ``against``; ``identical``: every paired
    result of the two was bit-identical."""
    rows = switch_activity(runs, history, variant, against)
    if identical:
        return False, "results bit-identical to " + against
    if not rows:
        return False, "no recorded switch differs"
    if any(r["acted"] and r["metric"] is None for r in rows):
        return True, "structural: " + ", ".join(r["switch"].split(".", 1)[1] for r in rows if r["metric"] is None)
    measured = [r for r in rows if r["metric"] is not None]
    if any(r["acted"] for r in measured):
        # two switches read by one metric (s_clamp and its kind) say it once
        return True, "; ".join(dict.fromkeys(f"{r['metric']} up to {_fmt(r['level'])}" for r in measured if r["acted"]))
    return False, "; ".join(dict.fromkeys(f"{r['metric']} at most {_fmt(r['level'])} in every epoch"
                            + (f" (rounding: below {schema.SWITCH_THRESHOLD[r['metric']]:g})"
                               if r["metric"] in schema.SWITCH_THRESHOLD else "") for r in measured))  # fmt: skip


def _fmt(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3g}"
