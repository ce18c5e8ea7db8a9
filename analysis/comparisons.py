"""The study's questions answered family by family: each member against its comparator on paired
seeds, corrected for multiplicity within the family (Holm), with a typed verdict.

Holm's count is every comparison the family declares (experiments: fixed before the runs), whatever
the runs turn out to be: a member that did not act or lacks pairs counts as an untested p of 1.

Each contrast's bits/dim verdict is one of three types (``verdict_type``), decided in this order:
- *effect*: Holm-adjusted paired t p <= 0.05, better or worse by how much;
- *equivalent within +-m*: the paired differences' TOST against the family's margin m (declared
  with the family, with its reason: experiments.ablation.EQUIVALENCE_MARGIN), Holm-adjusted;
- *inconclusive*: otherwise, with why: it could only see +-d (d the smallest effect detectable with
  80% power at the level Holm tested it at, alpha / (m - i + 1), on its real n - 1 df), its switch
  did not act (analysis.activity, or bit-identical results), too few pairs trained, or the variant
  never trained.
Beside each t interval stands the exact sign-flip p (no normality; at n = 3 it cannot go below 0.25,
at n = 5 not below 0.0625, so an *effect* at this n rests on the t-test's normal model: said so).

Bits/dim are compared over the seeds where both runs *trained* (study.run.outcome). Failing to train
(any other result: fails at initialisation, diverges in training, fails in evaluation, trains badly)
is compared on its own by Fisher's exact test on the two arms' counts (two-sided, Holm within the
family); with no failure in either arm there is nothing to test and its p is NaN (analysis.stats).
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.activity import acted, switches
from analysis.markdown import fmt_p
from analysis.stats import (
    ALPHA,
    fisher_failures,
    holm,
    holm_alphas,
    min_detectable_effect,
    paired_effect,
    tost,
    with_result,
)
from experiments.ablation import label

VALUE = "test_bpd"


def _typed(row: dict) -> tuple[str, str]:
    """(verdict type, verdict in words) of one comparison row."""
    if row["variant_trained"] == 0:
        return "inconclusive", "inconclusive: the variant never trained"
    if not row["acted"]:
        return "inconclusive", "inconclusive: did not act"
    if row["n_pairs"] < 2:
        return "inconclusive", "inconclusive: too few pairs trained"
    p = row["p_holm"]
    if math.isfinite(p) and p <= ALPHA:
        return "effect", "effect: " + ("worse" if row["mean_diff"] > 0 else "better")
    if math.isfinite(row["tost_p_holm"]) and row["tost_p_holm"] <= ALPHA:
        return "equivalent", f"equivalent within ±{row['margin']:g}"
    return "inconclusive", f"inconclusive: could only see ±{row['mde_holm']:.3f}"


def family_comparisons(runs: pd.DataFrame, history: pd.DataFrame, families) -> pd.DataFrame:
    """One row per (family, declared member other than its first) whose runs exist: family, variant,
    against, switches (the keys that differ), acted and why, n_pairs, mean_diff, sd_diff, ci_lo, ci_hi,
    p_value (paired t), p_signflip, p_holm, tost_p and tost_p_holm (at the family's margin), margin,
    mde_holm (smallest effect detectable at the Holm level it was tested at), m (Holm's count: every
    declared comparison), variant/comparator runs, trained and failed counts, fail_p (Fisher) and
    fail_p_holm, verdict_type and verdict.

    runs: pooled runs (one per variant and seed) with outcome, result, test_bpd and every
    ``section.key``. history: their per-epoch metrics. families: experiments.ablation.Family objects.
    """
    runs = with_result(runs)
    runs = runs.assign(outcome=runs["result"].map(lambda r: "completed" if r == "trained" else "failed"))
    present = set(runs["variant"])
    rows = []
    for fam in families:
        declared = [(m, fam.comparator(m)) for m in fam.members if fam.comparator(m) is not None]
        block = []
        for name, against in declared:
            if name not in present or against not in present:
                continue
            effect = paired_effect(runs, VALUE, name, against)
            did, why = acted(runs, history, name, against, effect["identical"])
            counts = {}
            for arm, v in (("variant", name), ("comparator", against)):
                r = runs[runs["variant"] == v]
                counts[f"{arm}_runs"] = len(r)
                counts[f"{arm}_trained"] = int((r["outcome"] == "completed").sum())
                counts[f"{arm}_failed"] = counts[f"{arm}_runs"] - counts[f"{arm}_trained"]
            counts["fail_p"] = fisher_failures(counts["variant_failed"], counts["variant_trained"],
                                               counts["comparator_failed"], counts["comparator_trained"])  # fmt: skip
            diffs = effect.pop("diffs")
            eq = tost(diffs, 0.0, fam.margin) if effect["n_pairs"] >= 2 else {"p": math.nan}
            changed = switches(runs, name, against)
            block.append({"family": fam.name, "variant": name, "against": against,
                          "switches": ", ".join(f"{k.split('.', 1)[1]} {a}->{b}" for k, (a, b) in changed.items()),
                          "n_switches": len(changed), "acted": did, "why": why, **effect, **counts,
                          "tost_p": eq["p"], "margin": fam.margin, "m": len(declared)})  # fmt: skip
        tested = [r["p_value"] if r["acted"] and r["variant_trained"] and r["n_pairs"] >= 2 else math.nan
                  for r in block]  # fmt: skip
        # untested members and declared members without runs count as p = 1 in Holm's m
        pad = [1.0] * (len(declared) - len(block))
        adjusted = holm([p if math.isfinite(p) else 1.0 for p in tested] + pad)[: len(block)]
        levels = holm_alphas(tested + [math.nan] * len(pad))[: len(block)]
        tost_adjusted = holm([r["tost_p"] if math.isfinite(r["tost_p"]) else 1.0 for r in block] + pad)[: len(block)]
        fail_adjusted = holm([r["fail_p"] for r in block])
        for r, t, p, a, tp, fp in zip(block, tested, adjusted, levels, tost_adjusted, fail_adjusted, strict=True):
            r["p_holm"] = p if math.isfinite(t) else math.nan
            r["tost_p_holm"] = tp if math.isfinite(r["tost_p"]) else math.nan
            r["mde_holm"] = min_detectable_effect(r["n_pairs"], r["sd_diff"], alpha=a)
            r["fail_p_holm"] = fp
            r["verdict_type"], r["verdict"] = _typed(r)
        rows += block
    return pd.DataFrame(rows)


def failures(row: pd.Series) -> str:
    """Failing to train, variant against comparator, with its typed verdict; '' when no run failed."""
    if not math.isfinite(row["fail_p"]):
        return ""
    vf, cf = row["variant_failed"], row["comparator_failed"]
    holm_p = row["fail_p_holm"]
    typed = "effect" if math.isfinite(holm_p) and holm_p <= ALPHA else "inconclusive"
    return (f" Failing to train: {vf}/{row['variant_runs']} runs against {cf}/{row['comparator_runs']} for "
            f"{label(row['against'])} (Fisher exact p = {fmt_p(row['fail_p'])}, Holm {fmt_p(holm_p)}: {typed}).")


def sentence(row: pd.Series) -> str:
    """One finding in words, from one comparison row, naming its verdict type; nothing beyond what the
    row supports."""
    v, a = label(row["variant"]), label(row["against"])
    fin = f"{row['variant_trained']}/{row['variant_runs']} runs trained"
    fails = failures(row)
    confounded = f" It differs from {a} in {row['n_switches']} switches, so no single one is credited." if row[
        "n_switches"] > 1 else ""  # fmt: skip
    if row["variant_trained"] == 0:
        return f"- {v} against {a}: **inconclusive** on bits/dim, no run of it trained ({fin}).{fails}{confounded}"
    if not row["acted"]:
        return (f"- {v} against {a}: **inconclusive**, its switch did not act ({row['why']}): these runs cannot say "
                f"whether it matters.{fails}")  # fmt: skip
    if row["n_pairs"] < 2:
        return f"- {v} against {a}: **inconclusive**, too few pairs trained to compare bits/dim ({fin}).{fails}{confounded}"
    interval = (f"{row['mean_diff']:+.3f} bits/dim [{row['ci_lo']:+.3f}, {row['ci_hi']:+.3f}] over "
                f"{row['n_pairs']} paired seeds, Holm p = {fmt_p(row['p_holm'])} of {row['m']}, sign-flip p = "
                f"{fmt_p(row['p_signflip'])}")  # fmt: skip
    kind = row["verdict_type"]
    if kind == "effect":
        direction = "worse" if row["mean_diff"] > 0 else "better"
        floor = 2.0 / 2 ** row["n_pairs"]
        exact = (f" At {row['n_pairs']} pairs the exact sign-flip test cannot go below {floor:.4g}, so this rests on "
                 "the t-test's normal model.") if floor > ALPHA else ""  # fmt: skip
        return f"- {v} against {a}: **effect**, {direction} on test bits/dim ({interval}; {fin}).{exact}{fails}{confounded}"
    if kind == "equivalent":
        return (f"- {v} against {a}: **equivalent within ±{row['margin']:g}** bits/dim ({interval}; TOST Holm p = "
                f"{fmt_p(row['tost_p_holm'])}; {fin}).{fails}{confounded}")  # fmt: skip
    return (f"- {v} against {a}: **inconclusive**, it could only see ±{row['mde_holm']:.3f} bits/dim ({interval}; "
            f"{fin}).{fails}{confounded}")  # fmt: skip
