"""The typed verdicts' statistics against hand computations (TOST, the exact sign-flip p, Holm's
levels and count), and a factorial in which failures empty a corner and break the resolution."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.factorial import bpd_effects, failure_effects, sentences
from analysis.stats import fisher_failures, holm_alphas, sign_flip_pvalue, tost
from experiments.factorial import FACTORS, HALF


def test_sign_flip_p_by_hand():
    # n = 3, all positive: only the observed signs and their mirror reach |mean| = 2 of 8 assignments
    assert sign_flip_pvalue([1.0, 2.0, 3.0]) == 2 / 8
    # [0.5, -0.1, 0.3]: |sums| over the 8 sign assignments are 0.9, 0.3, 0.7, 0.1 and mirrors; >= 0.7: 4 of 8
    assert sign_flip_pvalue([0.5, -0.1, 0.3]) == 4 / 8
    # its floor at 5 pairs: 2 / 32, so it can never reach 0.05
    assert sign_flip_pvalue([0.1, 0.2, 0.3, 0.4, 0.5]) == 2 / 32
    assert sign_flip_pvalue([1.0, -1.0]) == 1.0
    assert math.isnan(sign_flip_pvalue([]))


def test_tost_by_hand():
    d = np.array([0.01, -0.02, 0.015, 0.0, 0.005])
    m, se, df = d.mean(), d.std(ddof=1) / math.sqrt(5), 4
    p_low = 1 - stats.t.cdf((m + 0.05) / se, df)  # H0: mean <= -0.05
    p_high = stats.t.cdf((m - 0.05) / se, df)  # H0: mean >= +0.05
    got = tost(d, 0.0, 0.05)
    assert got["p"] == pytest.approx(max(p_low, p_high), rel=1e-12)
    assert got["p"] < 0.05  # the 90% interval lies inside +-0.05
    lo = m - stats.t.ppf(0.95, df) * se
    assert got["ci90_lo"] == pytest.approx(lo, rel=1e-12) and -0.05 < got["ci90_lo"]
    # a spread too wide for the margin: not equivalent
    assert tost(np.array([0.1, -0.1, 0.2]), 0.0, 0.05)["p"] > 0.05


def test_holm_levels_count_every_declared_member():
    # three declared comparisons, one untested (NaN): the smallest p is tested at 0.05/3, not 0.05/2
    levels = holm_alphas([0.03, 0.001, math.nan])
    assert levels.tolist() == pytest.approx([0.05 / 2, 0.05 / 3, 0.05 / 1])


def test_fisher_with_no_failures_is_nan_not_one():
    assert math.isnan(fisher_failures(0, 5, 0, 5))
    assert fisher_failures(5, 0, 0, 5) == pytest.approx(2 / math.comb(10, 5))


def _runs(fail_corner: tuple[str, str] | None, seed_noise: float = 0.01) -> pd.DataFrame:
    """Two seed blocks of the half fraction with planted effects; runs with both factors of
    ``fail_corner`` off fail at initialisation."""
    rng = np.random.default_rng(0)
    rows = []
    for v, seed in itertools.product(HALF, (0, 1)):
        lv = {f.name: (1 if f.name in v.name.removeprefix("f-").split("+") else -1) for f in FACTORS}
        failed = fail_corner is not None and lv[fail_corner[0]] < 0 and lv[fail_corner[1]] < 0
        bpd = 5.0 - 0.3 * lv["clip"] + 0.1 * lv["softplus"] + rng.normal(0, seed_noise)
        rows.append({"variant": v.name, "seed": seed, "outcome": "diverged" if failed else "completed",
                     "result": "fails-at-init" if failed else "trained", "test_bpd": math.nan if failed else bpd,
                     "run_id": f"{v.name}-{seed}"})  # fmt: skip
    return pd.DataFrame(rows)


def test_a_factorial_with_every_run_estimates_every_main_effect_unaliased():
    fit = bpd_effects(_runs(None))
    assert not fit.aliased and not fit.dropped
    clip = fit.effects.set_index("term").loc["clip"]
    assert clip["effect"] == pytest.approx(-0.6, abs=0.03) and clip["p_holm"] < 0.05


def test_a_factorial_whose_corner_fails_flags_the_aliased_effects():
    runs = _runs(("softplus", "clamp"))
    fit = bpd_effects(runs)
    terms = set(fit.effects["term"])
    # with the 8 runs of softplus off x clamp off gone, the half fraction's wn-l2 x fp16 column equals
    # softplus x clip + clamp x clip - clip: clip is aliased with it and is not reported as an effect
    assert "clip" not in terms and any(a.startswith("`clip` is aliased with") and "wn-l2 x fp16" in a
                                       for a in fit.aliased)  # fmt: skip
    assert any(d.startswith("softplus x clamp (no run with") for d in fit.dropped)
    # softplus and clamp stay, measured given the other on
    given = fit.effects.set_index("term")["given"]
    assert given["softplus"] == "given `clamp` on" and given["clamp"] == "given `softplus` on"
    fails = failure_effects(runs)
    assert fails.attrs["kinds"] == {"fails-at-init": 8}
    text = "\n".join(sentences(fit, fails, 0.05))
    assert "`clip`: **inconclusive** on bits/dim: its main effect is aliased" in text
    assert "forced by construction" in text


def test_the_dirty_tree_check_catches_an_untracked_file(tmp_path):
    import subprocess

    from study.tracking import is_dirty

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("ignored/\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    assert not is_dirty(tmp_path)
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "store.db").write_text("")
    assert not is_dirty(tmp_path)  # what git ignores does not count
    (tmp_path / "new_module.py").write_text("y = 2\n")
    assert is_dirty(tmp_path)  # an untracked module imports as well as a changed one
    (tmp_path / "new_module.py").unlink()
    (tmp_path / "a.py").write_text("x = 2\n")
    assert is_dirty(tmp_path)
