"""The study's questions answered family by family: each member against its comparator on paired
seeds, corrected for multiplicity within the family (Holm), with a verdict that only the corrected
test and the activity diagnostics can give.

Verdicts, in the order they are decided:
- "fails to train": no run of the variant finished with a finite test value;
- "did not act": its switch never acted in these runs (analysis.activity), or every paired result is
  bit-identical to the comparator's;
- "too few pairs": fewer than two seeds where both finished;
- "detectable effect": Holm-adjusted paired t p <= 0.05 (better or worse, by how much);
- "no detectable effect at this scale": otherwise, with the smallest effect it could have seen.
A mean over finished runs is conditioned on finishing: the divergence counts stand beside it.
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.activity import acted, switches
from analysis.stats import ALPHA, holm, paired_effect

VALUE = "test_bpd"


def _verdict(row: dict) -> str:
    if row["variant_finished"] == 0:
        return "fails to train"
    if not row["acted"]:
        return "did not act"
    if row["n_pairs"] < 2:
        return "too few pairs"
    p = row["p_holm"]
    if math.isfinite(p) and p <= ALPHA:
        return "detectable effect: " + ("worse" if row["mean_diff"] > 0 else "better")
    return "no detectable effect at this scale"


def family_comparisons(runs: pd.DataFrame, history: pd.DataFrame, families) -> pd.DataFrame:
    """One row per (family, member other than its first): family, variant, against, switches (the keys
    that differ), acted and why, n_pairs, mean_diff, sd_diff, ci_lo, ci_hi, p_value, p_holm (within
    the family), mde, variant/comparator runs, finished and diverged counts, and the verdict.

    runs: pooled runs (one per variant and seed) with outcome, test_bpd and every ``section.key``.
    history: their per-epoch metrics. families: experiments.ablation.Family objects.
    """
    present = set(runs["variant"])
    rows = []
    for fam in families:
        members = [m for m in fam.members if m in present]
        block = []
        for name in members:
            against = fam.comparator(name)
            if against is None or against not in present:
                continue
            effect = paired_effect(runs, VALUE, name, against)
            did, why = acted(runs, history, name, against, effect["identical"])
            counts = {}
            for arm, v in (("variant", name), ("comparator", against)):
                r = runs[runs["variant"] == v]
                counts[f"{arm}_runs"] = len(r)
                counts[f"{arm}_finished"] = int((r["outcome"].isin(["completed", "recovered"])
                                                 & r[VALUE].map(math.isfinite)).sum())  # fmt: skip
                counts[f"{arm}_diverged"] = int((r["outcome"] == "diverged").sum())
            changed = switches(runs, name, against)
            block.append({"family": fam.name, "variant": name, "against": against,
                          "switches": ", ".join(f"{k.split('.', 1)[1]} {a}->{b}" for k, (a, b) in changed.items()),
                          "n_switches": len(changed), "acted": did, "why": why, **effect, **counts})  # fmt: skip
        adjusted = holm([r["p_value"] if r["acted"] and r["variant_finished"] else math.nan for r in block])
        for r, p in zip(block, adjusted, strict=True):
            r["p_holm"] = p
            r["verdict"] = _verdict(r)
        rows += block
    return pd.DataFrame(rows)


def sentence(row: pd.Series) -> str:
    """One finding in words, from one comparison row; nothing beyond what the row supports."""
    v, a = f"`{row['variant']}`", f"`{row['against']}`"
    fin = f"{row['variant_finished']}/{row['variant_runs']} runs finished"
    verdict = row["verdict"]
    if verdict == "fails to train":
        return f"- {v} fails to train: {row['variant_diverged']} of {row['variant_runs']} runs diverged, none finished."
    if verdict == "did not act":
        return f"- {v} did not act against {a} ({row['why']}): these runs cannot say whether its switch matters."
    confounded = f" It differs from {a} in {row['n_switches']} switches, so no single one is credited." if row[
        "n_switches"] > 1 else ""  # fmt: skip
    interval = (f"{row['mean_diff']:+.3f} bits/dim [{row['ci_lo']:+.3f}, {row['ci_hi']:+.3f}] over "
                f"{row['n_pairs']} paired seeds, Holm p = {_p(row['p_holm'])}")  # fmt: skip
    if verdict == "too few pairs":
        return f"- {v} against {a}: too few finished pairs to compare ({fin}).{confounded}"
    if verdict.startswith("detectable"):
        direction = "worse" if row["mean_diff"] > 0 else "better"
        return f"- {v} is {direction} than {a} on test bits/dim: {interval} ({fin}).{confounded}"
    mde = f"; it could have seen about ±{row['mde']:.3f}" if math.isfinite(row["mde"]) else ""
    return f"- {v} against {a}: no detectable effect at this scale ({interval}{mde}; {fin}).{confounded}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
