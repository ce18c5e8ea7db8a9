"""A factorial stabilizer study read as a designed experiment.

- Failing to train is an outcome of its own: for each factor, a two-sided Fisher exact test of the
  2x2 table (level x failed), over every run, Holm-corrected over the factors. A run fails when it
  diverged or ended without a finite test value.
- Bits/dim among the runs that trained: ordinary least squares (statsmodels) of test bits/dim on the
  factors coded -1/+1, all their two-factor interactions, and seed as a block. An effect is the change
  from the low to the high level (2x the coefficient), with its 95% t interval; p-values are
  Holm-corrected over the main effects and interactions together. This is conditioned on training:
  a factor that makes runs fail shifts which runs are left, so read it beside the failure table.

Frames: ``runs`` has one row per run with variant (a cell name of experiments.factorial), seed,
outcome, test_bpd.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.stats import ALPHA, holm
from experiments.factorial import FACTORS, levels_of


def coded(runs: pd.DataFrame, factors=FACTORS) -> pd.DataFrame:
    """``runs`` with one -1/+1 column per factor (named by factor, '-' as '_') and ``failed``."""
    out = runs.copy()
    for name in [f.name for f in factors]:
        out[_col(name)] = [levels_of(v, factors)[name] for v in runs["variant"]]
    out["failed"] = ~(out["outcome"].isin(["completed", "recovered"]) & np.isfinite(out["test_bpd"].astype(float)))
    return out


def _col(name: str) -> str:
    return name.replace("-", "_")


def failure_effects(runs: pd.DataFrame, factors=FACTORS) -> pd.DataFrame:
    """Per factor: failed/runs at the low and high level, the difference in failure rate, the Fisher
    exact p-value and its Holm adjustment over the factors."""
    from scipy.stats import fisher_exact

    data = coded(runs, factors)
    rows = []
    for f in factors:
        col = data[_col(f.name)]
        lo, hi = data[col < 0], data[col > 0]
        table = [[int(hi["failed"].sum()), int((~hi["failed"]).sum())], [int(lo["failed"].sum()), int((~lo["failed"]).sum())]]
        p = fisher_exact(table).pvalue if data["failed"].any() and not data["failed"].all() else 1.0
        rows.append({"factor": f.name, "failed high": f"{table[0][0]}/{len(hi)}", "failed low": f"{table[1][0]}/{len(lo)}",
                     "rate difference": hi["failed"].mean() - lo["failed"].mean(), "p": float(p)})  # fmt: skip
    out = pd.DataFrame(rows)
    out["p_holm"] = holm(out["p"])
    out.attrs["corners"] = failure_corners(runs, factors)  # the pattern behind the per-factor counts
    return out


@dataclass
class EffectsFit:
    effects: pd.DataFrame  # term, effect, ci_lo, ci_hi, p, p_holm, kind (main/interaction), given
    n: int  # runs that trained and entered the model
    df_resid: int
    estimable: bool
    why: str = ""
    dropped: tuple[str, ...] = ()  # terms the runs that trained cannot estimate, with the reason


def _empty_corner(data: pd.DataFrame, a: str, b: str) -> tuple[int, int] | None:
    """The one (level of a, level of b) combination with no run in ``data``, if exactly one."""
    present = set(zip(data[a], data[b], strict=True))
    missing = [c for c in itertools.product((-1, 1), repeat=2) if c not in present]
    return missing[0] if len(missing) == 1 else None


def _level(v: int) -> str:
    return "on" if v > 0 else "off"


def bpd_effects(runs: pd.DataFrame, factors=FACTORS, value: str = "test_bpd") -> EffectsFit:
    """OLS of ``value`` on main effects, two-factor interactions and seed among runs that trained.

    When failures empty a corner of the design (e.g. every run with two factors off failed), some terms
    cannot be estimated from the runs that trained. Columns are then kept greedily in the order
    intercept, seed block, main effects, interactions, each only if it adds to the rank; a dropped
    term is reported as not estimable, and a main effect of a factor in a dropped interaction a x b
    whose corner is empty is the effect *given* the other factor at the level where runs trained (its
    ``given`` column says so): never a number the data cannot determine."""
    import statsmodels.formula.api as smf

    data = coded(runs, factors)
    data = data[~data["failed"]].copy()
    names = [_col(f.name) for f in factors]
    terms = names + [f"{a}:{b}" for a, b in itertools.combinations(names, 2)]
    seeds = sorted(data["seed"].unique())
    columns = [np.ones(len(data))] + [(data["seed"] == s).to_numpy(float) for s in seeds[1:]]
    kept, dropped, given = [], [], {}
    for t in terms:
        a, _, b = t.partition(":")
        col = data[a].to_numpy(float) * (data[b].to_numpy(float) if b else 1.0)
        if np.linalg.matrix_rank(np.column_stack([*columns, col])) > len(columns):
            columns.append(col)
            kept.append(t)
            continue
        label = t.replace("_", "-").replace(":", " x ")
        corner = _empty_corner(data, a, b) if b else None
        if corner is not None:
            dropped.append(f"{label} (no run with `{a.replace('_', '-')}` {_level(corner[0])} and "
                           f"`{b.replace('_', '-')}` {_level(corner[1])} trained)")  # fmt: skip
            given[a] = f"given `{b.replace('_', '-')}` {_level(-corner[1])}"
            given[b] = f"given `{a.replace('_', '-')}` {_level(-corner[0])}"
        else:
            cells = data["variant"].nunique()
            dropped.append(f"{label} (the {cells} cells that trained cannot separate it from the terms before it)")
    n_params = len(columns)
    if len(data) <= n_params:
        return EffectsFit(pd.DataFrame(), len(data), 0, False,
                          f"{len(data)} runs trained, fewer than the model's {n_params + 1} needed")  # fmt: skip
    formula = f"{value} ~ " + " + ".join(kept) + (" + C(seed)" if len(seeds) > 1 else "")
    fit = smf.ols(formula, data=data.assign(**{value: data[value].astype(float)})).fit()
    ci = fit.conf_int(alpha=ALPHA)
    rows = [{"term": t.replace("_", "-").replace(":", " x "), "kind": "interaction" if ":" in t else "main",
             "effect": 2 * fit.params[t], "ci_lo": 2 * ci.loc[t, 0], "ci_hi": 2 * ci.loc[t, 1],
             "p": float(fit.pvalues[t]), "given": given.get(t, "") if ":" not in t else ""} for t in kept]  # fmt: skip
    out = pd.DataFrame(rows)
    out["p_holm"] = holm(out["p"])
    return EffectsFit(out, len(data), int(fit.df_resid), True, dropped=tuple(dropped))


def failure_corners(runs: pd.DataFrame, factors=FACTORS) -> list[str]:
    """Pairs of factors whose failures are exactly one corner: every run there failed, none elsewhere."""
    data = coded(runs, factors)
    if not data["failed"].any():
        return []
    out = []
    for fa, fb in itertools.combinations(factors, 2):
        a, b = _col(fa.name), _col(fb.name)
        for la, lb in itertools.product((-1, 1), repeat=2):
            here = (data[a] == la) & (data[b] == lb)
            if data.loc[here, "failed"].all() and not data.loc[~here, "failed"].any():
                out.append(f"runs failed exactly when `{fa.name}` was {_level(la)} and `{fb.name}` {_level(lb)}: "
                           f"{int(here.sum())}/{int(here.sum())} there, 0/{int((~here).sum())} elsewhere")  # fmt: skip
    return out


def verdicts(fit: EffectsFit, fails: pd.DataFrame) -> dict[str, list[str]]:
    """Which factors matter alone (a Holm-significant main effect), which only together (in a
    significant interaction without a significant main effect), which change failing to train, and
    which do nothing detectable at this scale (none of these)."""
    sig = fit.effects[fit.effects["p_holm"] <= ALPHA] if fit.estimable else fit.effects
    main = {t for t in sig.loc[sig["kind"] == "main", "term"]} if fit.estimable else set()
    inter = [t for t in sig.loc[sig["kind"] == "interaction", "term"]] if fit.estimable else []
    together = sorted({f for t in inter for f in t.split(" x ")} - main)
    failing = sorted(fails.loc[fails["p_holm"] <= ALPHA, "factor"])
    factors = [f.name for f in FACTORS]
    nothing = [f for f in factors if f not in main and f not in together and f not in failing]
    return {"matter": sorted(main), "together": together, "interactions": inter, "failing": failing,
            "nothing": nothing}  # fmt: skip


def sentences(fit: EffectsFit, fails: pd.DataFrame) -> list[str]:
    """The factorial's findings in words, each from a corrected test."""
    if not fit.estimable:
        return [f"- The bits/dim model could not be fitted: {fit.why}."]
    v = verdicts(fit, fails)
    eff = fit.effects.set_index("term")
    lines = []
    for term in v["matter"]:
        e = eff.loc[term]
        where = (f"among runs that trained, {e['given']} (the other corner failed)" if e.get("given")
                 else "averaged over the other factors")  # fmt: skip
        lines.append(f"- `{term}` matters: switching it on changes test bits/dim by {e['effect']:+.3f} "
                     f"[{e['ci_lo']:+.3f}, {e['ci_hi']:+.3f}] (Holm p = {_p(e['p_holm'])}), {where}.")  # fmt: skip
    for term in v["interactions"]:
        e = eff.loc[term]
        lines.append(f"- `{term}` interact: {e['effect']:+.3f} [{e['ci_lo']:+.3f}, {e['ci_hi']:+.3f}] (Holm p = {_p(e['p_holm'])})"
                     + (f"; {', '.join(f'`{f}`' for f in v['together'] if f in term.split(' x '))} matter only together with another factor."
                        if any(f in term.split(" x ") for f in v["together"]) else "."))  # fmt: skip
    for factor in v["failing"]:
        f = fails.set_index("factor").loc[factor]
        lines.append(f"- `{factor}` changes whether runs train: failed {f['failed high']} on, {f['failed low']} off "
                     f"(Fisher exact, Holm p = {_p(f['p_holm'])}).")  # fmt: skip
    lines += [f"- {c[0].upper()}{c[1:]}." for c in fails.attrs.get("corners", [])]
    lines += [f"- Not estimable from the runs that trained: {d}." for d in fit.dropped]
    if v["nothing"]:
        which = "the two-factor interactions the runs that trained could estimate" if fit.dropped else "a two-factor interaction"
        lines.append(f"- No detectable effect at this scale, alone or in {which}, on bits/dim or on "
                     "failing to train: " + ", ".join(f"`{f}`" for f in v["nothing"]) + ".")  # fmt: skip
    return lines


def _p(p: float) -> str:
    return "–" if not math.isfinite(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")
