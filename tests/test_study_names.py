"""Optuna study names say what a sweep holds, stay unique, and a store made under the old hashed names
is resumed under them rather than begun again."""

from __future__ import annotations

import optuna

from experiments.presets import preset_config
from experiments.studies import plan_search, plan_study
from study.sweep import driver


def _plan(tmp_path, only=("seed-report", "paper"), seeds=(0, 1)):
    return plan_study("stabilizers", "demo", preset_config("demo"), seeds, only, "cpu", experiment="names",
                        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                        tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")  # fmt: skip


def _search(tmp_path, low=1e-4):
    return plan_search(preset_config("demo"), "demo", "seed-report", 4, low, 1e-2, "tpe", "none",
                                storage=f"sqlite:///{tmp_path / 'optuna.db'}", tracking_uri=None)  # fmt: skip


def test_names_are_readable_and_unique(tmp_path):
    plan = _plan(tmp_path)
    assert plan.optuna_name.startswith("stabilizers demo: 2 variants x 2 seeds (")
    assert _plan(tmp_path, seeds=(0,)).optuna_name.startswith("stabilizers demo: 2 variants x 1 seed (")
    assert plan.optuna_name != _plan(tmp_path, only=("seed-report", "no-l2")).optuna_name  # same size, other grid
    search = _search(tmp_path)
    assert search.study_name.startswith("lr-search seed-report demo: tpe, lr 0.0001 to 0.01 (")
    assert search.study_name != _search(tmp_path, low=2e-4).study_name


def test_a_store_made_under_the_hashed_names_is_resumed_under_them(tmp_path):
    plan, search = _plan(tmp_path), _search(tmp_path)
    store = f"sqlite:///{tmp_path / 'optuna.db'}"
    fresh = driver.study_name(plan.sweep)  # nothing in the storage yet: the readable name
    assert fresh == plan.optuna_name
    optuna.create_study(study_name=plan.legacy_optuna_name, storage=store)
    optuna.create_study(study_name=search.name, storage=store)  # the search's old study name was its id
    assert driver.study_name(plan.sweep) == plan.legacy_optuna_name
    assert driver.study_name(search.sweep) == search.name
    other = _plan(tmp_path, only=("seed-report", "no-l2"))  # another grid in that storage starts readable
    assert driver.study_name(other.sweep) == other.optuna_name
