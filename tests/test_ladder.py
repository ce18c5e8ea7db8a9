"""The scale ladder as declared (experiments/ladder.py, `ablation transfer`): its grid, what each cell
trains, the rungs' spacing in log(weights), and its dry run's cost from a measured step time."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

import run_study
from experiments import ladder
from experiments.presets import preset_config
from experiments.studies import STUDIES, plan_study
from study.config import apply_values
from study.flows import num_parameters
from study.model import build_model


def _cfg(variant):
    return apply_values(preset_config("ladder"), variant.overrides)


def test_the_grid_is_every_rung_recipe_and_learning_rate_once():
    cells = STUDIES["transfer"]
    assert len(cells) == len(ladder.RUNGS) * len(ladder.RECIPES) * len(ladder.LEARNING_RATES) == 72
    assert len({v.name for v in cells}) == 72
    for v in cells:
        rung, recipe, lr = ladder.parse(v.name)
        maps, blocks = next((m, b) for name, m, b in ladder.RUNGS if name == rung)
        cfg = _cfg(v)
        assert (cfg.model.mid_channels, cfg.model.num_blocks, cfg.train.lr) == (maps, blocks, lr), v.name
        assert cfg.stabilizers.amp == "off", "the precision is held fixed (fp32) across recipes"
    assert min(ladder.LEARNING_RATES) < 1e-3 < max(ladder.LEARNING_RATES) and 1e-3 in ladder.LEARNING_RATES
    ratios = [b / a for a, b in zip(ladder.LEARNING_RATES, ladder.LEARNING_RATES[1:], strict=False)]
    assert all(3.0 - 1e-9 <= r <= 3.34 for r in ratios)  # a 1-3-10 log grid: half-decade steps


def test_each_recipe_is_what_it_says():
    by = {ladder.parse(v.name)[1]: _cfg(v).stabilizers for v in STUDIES["transfer"]}
    assert by["seed-report-fp32"].scale_fn == "softplus" and by["seed-report-fp32"].grad_clip == 100.0
    assert by["no-gradclip-fp32"].grad_clip == 0.0 and by["no-gradclip-fp32"].scale_fn == "softplus"
    assert by["paper"].scale_fn == "tanh" and by["paper"].bn_bijector and by["paper"].grad_clip == 0.0
    unbounded = by["exp+zero-init"]  # no bound on s of any kind, and a finite first step
    assert unbounded.scale_fn == "exp" and unbounded.s_clamp == 0.0 and unbounded.zero_init
    assert unbounded.grad_clip == 0.0


def test_rungs_are_even_steps_in_log_weights():
    """Each rung has about 4x the previous one's weights: even steps in log(weights)."""
    counts = []
    for _, maps, blocks in ladder.RUNGS:
        cfg = apply_values(preset_config("ladder"), {"model.mid_channels": maps, "model.num_blocks": blocks})
        counts.append(num_parameters(build_model(cfg, in_channels=3, image_size=32)))
    steps = [math.log(b / a) for a, b in zip(counts, counts[1:], strict=False)]
    assert all(s > math.log(3) for s in steps), counts
    assert max(steps) / min(steps) < 1.15, (counts, steps)


def test_cost_is_cells_times_images_over_measured_speed():
    plan = plan_study("transfer", "ladder", preset_config("ladder"), (0, 1), device="cpu")
    speed = {"8x2": 200.0, "16x2": 80.0, "32x2": 25.0}
    rows = ladder.cost(plan, speed, workers=2, train_images=3600)
    assert [r["rung"] for r in rows] == ["8x2", "16x2", "32x2", "all"]
    assert [r["cells"] for r in rows] == [48, 48, 48, 144]
    seen = 3600 * 3  # 3 epochs of the preset
    expected = {name: 48 * seen / s * 1.08 / 3600 / 2 for name, s in speed.items()}
    for r in rows[:3]:
        assert r["images a cell trains on"] == seen
        assert r["hours (over workers)"] == pytest.approx(expected[r["rung"]], abs=0.006)
    assert rows[3]["hours (over workers)"] == pytest.approx(sum(expected.values()), abs=0.01)


def test_the_dry_run_prints_the_cells_and_each_rungs_cost(monkeypatch, tmp_path):
    import bench.timing

    timed = []

    class Speed:
        def __init__(self, ips):
            self.train_ips = ips

    def fake_bench(size, device, batch, steps, warmup):
        timed.append(size)
        return Speed({"rung-8x2": 180.0, "rung-16x2": 70.0, "rung-32x2": 30.0}[size])

    monkeypatch.setattr(bench.timing, "bench", fake_bench)
    monkeypatch.chdir(tmp_path)
    args = ["ablation", "transfer", "--preset", "ladder", "--data", "patches", "--seeds", "2", "--workers", "2",
            "--dry-run", "--device", "cpu"]
    out = CliRunner().invoke(run_study.cli, args)
    assert out.exit_code == 0, out.output
    assert "72 variants x 2 seeds = 144 cells, 3 epochs each" in out.output
    assert "16x2/exp+zero-init/lr0.03" in out.output
    assert timed == ["rung-8x2", "rung-16x2", "rung-32x2"]
    table = out.output[out.output.index("hours (over workers)"):].splitlines()
    assert [line.split()[0] for line in table[1:5]] == ["8x2", "16x2", "32x2", "all"]
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_the_paper_size_check_is_each_recipe_at_1_3_and_10x_the_seed_reports_rate_at_the_presets_size():
    cells = STUDIES["paper-stability"]
    assert len(cells) == len(ladder.RECIPES) * 3 and len({v.name for v in cells}) == len(cells)
    ladder_recipes = {ladder.parse(v.name)[1]: _cfg(v).stabilizers for v in STUDIES["transfer"]}
    for v in cells:
        rung, recipe, lr = ladder.parse(v.name)
        cfg = apply_values(preset_config("paper"), v.overrides)
        assert rung == "paper-size" and lr in (1e-3, 3e-3, 1e-2) and cfg.train.lr == lr
        assert (cfg.model.mid_channels, cfg.model.num_blocks) == (64, 8)  # the paper's, from the preset
        assert not any(k.startswith("model.") for k in v.overrides), "the CPU rehearsal shrinks the size with --set"
        assert cfg.stabilizers == ladder_recipes[recipe], f"{v.name}: not the ladder's {recipe}"
