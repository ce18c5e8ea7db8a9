"""The initialisation probe: what it measures on a run's first batch, and its resumable CSV."""

from __future__ import annotations

import csv
import math

import torch

from experiments.init_probe import cell_config, cells, run_probe
from experiments.presets import preset_config
from study.probe import probe_init


def _images(n: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_a_zero_initialised_model_has_s_exactly_zero_and_a_finite_first_batch():
    base = preset_config("demo")
    got = probe_init(cell_config(base, "exp+zero-init", 4, 1, 0), _images())
    assert got == {"nonfinite_fraction": 0.0, "batch_nonfinite": 0.0, "max_abs_s": 0.0, "batch": 64}
    tanh = probe_init(cell_config(base, "tanh", 4, 1, 0), _images())
    assert 0.0 < tanh["max_abs_s"] <= 1.0  # bounded by the learned rescale, 1 at initialisation


def test_the_probe_is_determined_by_its_seed():
    base = preset_config("demo")
    a = probe_init(cell_config(base, "exp", 4, 1, 3), _images())
    b = probe_init(cell_config(base, "exp", 4, 1, 3), _images())
    c = probe_init(cell_config(base, "exp", 4, 1, 4), _images())
    assert a == b and a["max_abs_s"] != c["max_abs_s"] and math.isfinite(a["max_abs_s"])


def test_an_interrupted_probe_continues_where_it_stopped(tmp_path):
    base, out = preset_config("demo"), tmp_path / "probe.csv"
    grid = cells((4,), (1,), ("exp+zero-init", "tanh"), (0, 1))
    run_probe(base, _images(), out, grid[:3], echo=lambda s: None)
    said = []
    run_probe(base, _images(), out, grid, echo=said.append)
    assert said[0] == f"init probe: 4 cells, 3 already in {out}, 1 to run"
    rows = list(csv.DictReader(out.open()))
    assert [(r["recipe"], int(r["seed"])) for r in rows] == [(r, s) for r, _, _, s in grid]
