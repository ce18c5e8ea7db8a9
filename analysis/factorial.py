"""A factorial stabilizer study read as a designed experiment.

- Failing to train is an outcome of its own: a run fails unless its result (study.run.outcome) is
  *trained*, and the failures are counted by kind (at initialisation, in training, in evaluation,
  training badly). For each factor, a two-sided Fisher exact test of the 2x2 table (level x failed),
  over every run, Holm-corrected over the factors. Failures at initialisation happen before any update,
  so the training-time factors (clipping, L2, precision) cannot change them by construction: said so.
- Bits/dim among the runs that trained: ordinary least squares (statsmodels) of test bits/dim on the
  factors coded -1/+1, all their two-factor interactions, and seed as a block, with HC3
  heteroscedasticity-robust standard errors (a cell group with a much larger spread must not lend its
  noise to, or borrow precision from, the others) and t intervals on the residual df. An effect is the
  change from the low to the high level (2x the coefficient); Holm over the terms reported.
- Failures break the design: a resolution-V fraction keeps main effects and two-factor interactions
  apart only while every run enters. The alias structure of the runs that remain is computed: a term
  whose column the kept ones reproduce exactly is dropped, and every kept term that enters that
  reproduction is aliased with it and is not reported as an effect (named instead). The one exception
  is an empty corner of a pair a x b: the main effects of a and b are then reported *given* the other
  factor at the level where runs trained.

Frames: ``runs`` has one row per run with variant (a cell name of experiments.factorial), seed,
outcome, result, test_bpd.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.markdown import fmt_p
from analysis.stats import ALPHA, holm, with_result
from experiments.factorial import FACTORS, levels_of


def coded(runs: pd.DataFrame, factors=FACTORS) -> pd.DataFrame:
    """``runs`` with one -1/+1 column per factor (named by factor, '-' as '_') and ``failed``."""
    out = with_result(runs.copy())
    for name in [f.name for f in factors]:
        out[_col(name)] = [levels_of(v, factors)[name] for v in runs["variant"]]
    out["failed"] = out["result"] != "trained"
    return out


def _col(name: str) -> str:
    return name.replace("-", "_")


def failure_effects(runs: pd.DataFrame, factors=FACTORS) -> pd.DataFrame:
    """Per factor: failed/runs at the low and high level, the difference in failure rate, the Fisher
    exact p-value (NaN when no run or every run failed: nothing to test) and its Holm adjustment over
    the factors. ``attrs``: corners (the pattern behind the counts) and kinds (failures by result)."""
    from analysis.stats import fisher_failures

    data = coded(runs, factors)
    rows = []
    for f in factors:
        col = data[_col(f.name)]
        lo, hi = data[col < 0], data[col > 0]
        hf, lf = int(hi["failed"].sum()), int(lo["failed"].sum())
        p = fisher_failures(hf, len(hi) - hf, lf, len(lo) - lf)
        rows.append({"factor": f.name, "failed high": f"{hf}/{len(hi)}", "failed low": f"{lf}/{len(lo)}",
                     "rate difference": hi["failed"].mean() - lo["failed"].mean(), "p": p})  # fmt: skip
    out = pd.DataFrame(rows)
    out["p_holm"] = holm(out["p"])
    out.attrs["corners"] = failure_corners(runs, factors)
    out.attrs["kinds"] = data.loc[data["failed"], "result"].value_counts().sort_index().to_dict()
    return out


@dataclass
class EffectsFit:
    effects: pd.DataFrame  # term, effect, ci_lo, ci_hi, p, p_holm, kind (main/interaction), given
    n: int  # runs that trained and entered the model
    df_resid: int
    estimable: bool
    why: str = ""
    dropped: tuple[str, ...] = ()  # terms the runs that trained cannot estimate, with the reason
    aliased: tuple[str, ...] = ()  # kept terms whose estimate carries a dropped term: not reported as effects


def _empty_corner(data: pd.DataFrame, a: str, b: str) -> tuple[int, int] | None:
    """The one (level of a, level of b) combination with no run in ``data``, if exactly one."""
    present = set(zip(data[a], data[b], strict=True))
    missing = [c for c in itertools.product((-1, 1), repeat=2) if c not in present]
    return missing[0] if len(missing) == 1 else None


def _level(v: int) -> str:
    return "on" if v > 0 else "off"


def bpd_effects(runs: pd.DataFrame, factors=FACTORS, value: str = "test_bpd") -> EffectsFit:
    """OLS (HC3 errors) of ``value`` on main effects, two-factor interactions and seed among runs that
    trained, over only the terms the remaining runs can still estimate apart (see the module's
    docstring): columns are kept greedily in the order intercept, seed block, main effects,
    interactions, each only if it adds to the rank; a dropped term's exact reproduction by the kept
    columns names the terms aliased with it."""
    import statsmodels.formula.api as smf

    data = coded(runs, factors)
    data = data[~data["failed"]].copy()
    names = [_col(f.name) for f in factors]
    terms = names + [f"{a}:{b}" for a, b in itertools.combinations(names, 2)]
    seeds = sorted(data["seed"].unique())
    columns = [np.ones(len(data))] + [(data["seed"] == s).to_numpy(float) for s in seeds[1:]]
    fixed = len(columns)  # intercept and seed blocks: aliasing with them is not an effect's
    kept, dropped, given, aliased = [], [], {}, {}
    for t in terms:
        a, _, b = t.partition(":")
        col = data[a].to_numpy(float) * (data[b].to_numpy(float) if b else 1.0)
        if len(data) and np.linalg.matrix_rank(np.column_stack([*columns, col])) > len(columns):
            columns.append(col)
            kept.append(t)
            continue
        label = _label(t)
        corner = _empty_corner(data, a, b) if b else None
        if corner is not None:
            dropped.append(f"{label} (no run with `{_label(a)}` {_level(corner[0])} and "
                           f"`{_label(b)}` {_level(corner[1])} trained)")  # fmt: skip
            given[a] = f"given `{_label(b)}` {_level(-corner[1])}"
            given[b] = f"given `{_label(a)}` {_level(-corner[0])}"
            continue
        coef = np.linalg.lstsq(np.column_stack(columns), col, rcond=None)[0] if len(data) else np.zeros(len(columns))
        partners = [kept[j - fixed] for j in range(fixed, len(columns)) if abs(coef[j]) > 1e-8]
        for k in partners:
            aliased.setdefault(k, []).append(label)
        dropped.append(f"{label} (the runs that trained reproduce its column from "
                       f"{', '.join(f'`{_label(k)}`' for k in partners) or 'the intercept and seed blocks'})")  # fmt: skip
    alias_notes = tuple(f"`{_label(k)}` is aliased with {', '.join(f'`{d}`' for d in v)}" for k, v in aliased.items())
    n_params = len(columns)
    if len(data) <= n_params:
        return EffectsFit(pd.DataFrame(), len(data), 0, False,
                          f"{len(data)} runs trained, fewer than the model's {n_params + 1} needed",
                          tuple(dropped), alias_notes)  # fmt: skip
    formula = f"{value} ~ " + " + ".join(kept) + (" + C(seed)" if len(seeds) > 1 else "")
    fit = smf.ols(formula, data=data.assign(**{value: data[value].astype(float)})).fit(cov_type="HC3", use_t=True)
    ci = fit.conf_int(alpha=ALPHA)
    rows = [{"term": _label(t), "kind": "interaction" if ":" in t else "main",
             "effect": 2 * fit.params[t], "ci_lo": 2 * ci.loc[t, 0], "ci_hi": 2 * ci.loc[t, 1],
             "p": float(fit.pvalues[t]), "given": given.get(t, "") if ":" not in t else ""}
            for t in kept if t not in aliased]  # fmt: skip
    out = pd.DataFrame(rows, columns=["term", "kind", "effect", "ci_lo", "ci_hi", "p", "given"])
    out["p_holm"] = holm(out["p"])
    return EffectsFit(out, len(data), int(fit.df_resid), True, dropped=tuple(dropped), aliased=alias_notes)


def _label(term: str) -> str:
    return term.replace("_", "-").replace(":", " x ")


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


def main_effect_equivalence(fit: EffectsFit, margin: float) -> pd.DataFrame:
    """Per reported main effect: TOST of the effect against +-``margin`` on the fit's t (HC3 standard
    errors, residual df), Holm over the main effects. Columns term, tost_p, tost_p_holm, half (the
    95% interval's half-width: what it could see)."""
    from scipy import stats

    e = fit.effects[fit.effects["kind"] == "main"] if fit.estimable else pd.DataFrame()
    if e.empty:
        return pd.DataFrame(columns=["term", "tost_p", "tost_p_holm", "half"])
    t975 = stats.t.ppf(1 - ALPHA / 2, fit.df_resid)
    se = (e["ci_hi"] - e["ci_lo"]) / (2 * t975)
    lower = stats.t.sf((e["effect"] + margin) / se, fit.df_resid)  # H0: effect <= -margin
    upper = stats.t.cdf((e["effect"] - margin) / se, fit.df_resid)  # H0: effect >= +margin
    tost_p = np.maximum(np.asarray(lower, float), np.asarray(upper, float))
    return pd.DataFrame({"term": e["term"].to_numpy(), "tost_p": tost_p, "tost_p_holm": holm(tost_p),
                         "half": ((e["ci_hi"] - e["ci_lo"]) / 2).to_numpy(float)})  # fmt: skip


def sentences(fit: EffectsFit, fails: pd.DataFrame, margin: float = 0.05) -> list[str]:
    """The factorial's findings in words, each from a corrected test and naming its verdict type
    (effect, equivalent within +-margin, inconclusive)."""
    if not fit.estimable:
        return [f"- The bits/dim model could not be fitted: {fit.why}: every factor is **inconclusive** on bits/dim."]
    v = verdicts(fit, fails)
    eff = fit.effects.set_index("term")
    lines = []
    for term in v["matter"]:
        e = eff.loc[term]
        where = (f"among runs that trained, {e['given']} (the other corner failed)" if e.get("given")
                 else "averaged over the other factors")  # fmt: skip
        lines.append(f"- `{term}`: **effect**, switching it on changes test bits/dim by {e['effect']:+.3f} "
                     f"[{e['ci_lo']:+.3f}, {e['ci_hi']:+.3f}] (HC3 t, Holm p = {fmt_p(e['p_holm'])}), {where}.")  # fmt: skip
    for term in v["interactions"]:
        e = eff.loc[term]
        lines.append(f"- `{term}`: **effect** (interaction) {e['effect']:+.3f} [{e['ci_lo']:+.3f}, {e['ci_hi']:+.3f}] "
                     f"(HC3 t, Holm p = {fmt_p(e['p_holm'])})"
                     + (f"; {', '.join(f'`{f}`' for f in v['together'] if f in term.split(' x '))} matter only together with another factor."
                        if any(f in term.split(" x ") for f in v["together"]) else "."))  # fmt: skip
    for factor in v["failing"]:
        f = fails.set_index("factor").loc[factor]
        lines.append(f"- `{factor}`: **effect** on failing to train: failed {f['failed high']} on, {f['failed low']} off "
                     f"(Fisher exact, Holm p = {fmt_p(f['p_holm'])}).")  # fmt: skip
    lines += [f"- {c[0].upper()}{c[1:]}." for c in fails.attrs.get("corners", [])]
    lines += _failure_kinds(fails.attrs.get("kinds", {}))
    lines += [f"- Not estimable from the runs that trained: {d}." for d in fit.dropped]
    lines += [f"- Not reported as an effect: {a} among the runs that trained." for a in fit.aliased]
    eq = main_effect_equivalence(fit, margin).set_index("term")
    for factor in v["nothing"]:
        if factor not in eq.index:
            lines.append(f"- `{factor}`: **inconclusive** on bits/dim: its main effect is aliased among the runs that "
                         "trained.")  # fmt: skip
            continue
        r, e = eq.loc[factor], eff.loc[factor]
        shown = f"{e['effect']:+.3f} [{e['ci_lo']:+.3f}, {e['ci_hi']:+.3f}], HC3 t, Holm p = {fmt_p(e['p_holm'])}"
        if math.isfinite(r["tost_p_holm"]) and r["tost_p_holm"] <= ALPHA:
            lines.append(f"- `{factor}`: **equivalent within ±{margin:g}** bits/dim ({shown}; TOST Holm p = "
                         f"{fmt_p(r['tost_p_holm'])}).")  # fmt: skip
        else:
            lines.append(f"- `{factor}`: **inconclusive** on bits/dim, it could only see about ±{r['half']:.3f} "
                         f"({shown}).")  # fmt: skip
    if any(f not in v["failing"] for f in v["nothing"]) and fails["p"].notna().any():
        lines.append("- On failing to train, " + ", ".join(f"`{f}`" for f in v["nothing"]) + ": **inconclusive** "
                     "(no Holm-corrected Fisher test below 0.05).")  # fmt: skip
    return lines


def _failure_kinds(kinds: dict[str, int]) -> list[str]:
    """What the failures were; the consequence when every one was at initialisation."""
    if not kinds:
        return []
    from study.run.outcome import LABELS

    total = sum(kinds.values())
    said = ", ".join(f"{n} {LABELS.get(k, k or 'unfinished')}" for k, n in kinds.items())
    line = f"- The {total} failed runs: {said}."
    if set(kinds) == {"fails-at-init"}:
        line += (" Every one was non-finite before any update, so they measure the initialisation, not training "
                 "stability: clipping, L2 and the precision's GradScaler cannot act before the first step, and their "
                 "null effects on failing are forced by construction.")  # fmt: skip
    return [line]
