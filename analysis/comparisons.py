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
A mean over finished runs is conditioned on finishing: the divergence counts stand beside it. Failing
to train (any run that did not finish with a finite test value) is compared on its own, by Fisher's
exact test on the two arms' counts (two-sided), Holm-corrected within the family: the answer to the
sufficiency family's "which single addition makes it train?". At 3 seeds per arm its smallest
possible p is 0.1, so it can only say "not detectable"; the factorial study has the power for it.
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
                counts[f"{arm}_failed"] = counts[f"{arm}_runs"] - counts[f"{arm}_finished"]
                counts[f"{arm}_diverged"] = int((r["outcome"] == "diverged").sum())
            counts["fail_p"] = _fisher(counts)
            changed = switches(runs, name, against)
            block.append({"family": fam.name, "variant": name, "against": against,
                          "switches": ", ".join(f"{k.split('.', 1)[1]} {a}->{b}" for k, (a, b) in changed.items()),
                          "n_switches": len(changed), "acted": did, "why": why, **effect, **counts})  # fmt: skip
        adjusted = holm([r["p_value"] if r["acted"] and r["variant_finished"] else math.nan for r in block])
        fail_adjusted = holm([r["fail_p"] for r in block])
        for r, p, fp in zip(block, adjusted, fail_adjusted, strict=True):
            r["p_holm"], r["fail_p_holm"] = p, fp
            r["verdict"] = _verdict(r)
        rows += block
    return pd.DataFrame(rows)


def _fisher(c: dict) -> float:
    """Two-sided Fisher exact p for failing to train, variant against comparator; NaN when no run of
    either arm failed (nothing to test)."""
    from scipy.stats import fisher_exact

    vf, cf = c["variant_failed"], c["comparator_failed"]
    if vf + cf == 0:
        return math.nan
    return float(fisher_exact([[vf, c["variant_finished"]], [cf, c["comparator_finished"]]]).pvalue)


def failures(row: pd.Series) -> str:
    """Failing to train, variant against comparator, with its exact test; '' when no run failed."""
    if not math.isfinite(row["fail_p"]):
        return ""
    vf, cf = row["variant_failed"], row["comparator_failed"]
    holm_p = row["fail_p_holm"]
    detectable = "a detectable difference" if math.isfinite(holm_p) and holm_p <= ALPHA else "not detectable"
    return (f" Failed to train: {vf}/{row['variant_runs']} runs against {cf}/{row['comparator_runs']} for "
            f"`{row['against']}` (Fisher exact p = {_p(row['fail_p'])}, Holm {_p(holm_p)}: {detectable}).")


def sentence(row: pd.Series) -> str:
    """One finding in words, from one comparison row; nothing beyond what the row supports."""
    v, a = f"`{row['variant']}`", f"`{row['against']}`"
    fin = f"{row['variant_finished']}/{row['variant_runs']} runs finished"
    verdict = row["verdict"]
    fails = failures(row)
    if verdict == "fails to train":
        return (f"- {v} fails to train: {row['variant_diverged']} of {row['variant_runs']} runs diverged, none "
                f"finished.{fails}")
    if verdict == "did not act":
        return f"- {v} did not act against {a} ({row['why']}): these runs cannot say whether its switch matters."
    confounded = f" It differs from {a} in {row['n_switches']} switches, so no single one is credited." if row[
        "n_switches"] > 1 else ""  # fmt: skip
    interval = (f"{row['mean_diff']:+.3f} bits/dim [{row['ci_lo']:+.3f}, {row['ci_hi']:+.3f}] over "
                f"{row['n_pairs']} paired seeds, Holm p = {_p(row['p_holm'])}")  # fmt: skip
    if verdict == "too few pairs":
        return f"- {v} against {a}: too few finished pairs to compare bits/dim ({fin}).{fails}{confounded}"
    if verdict.startswith("detectable"):
        direction = "worse" if row["mean_diff"] > 0 else "better"
        return f"- {v} is {direction} than {a} on test bits/dim: {interval} ({fin}).{fails}{confounded}"
    mde = f"; it could have seen about ±{row['mde']:.3f}" if math.isfinite(row["mde"]) else ""
    return f"- {v} against {a}: no detectable effect at this scale ({interval}{mde}; {fin}).{fails}{confounded}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"
