"""A run's mutable state, and its round trip through a checkpoint.

A checkpoint holds everything a run needs to continue exactly where it was: the full config, the
model, optimizer and GradScaler, the data generator, the epoch and global step, every epoch's metrics
(``history``) and the divergence bookkeeping (``run_state``). Its keys are a file format: recorded
checkpoints must keep loading, so keys are added, never renamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from study.config import Config, flatten, unflatten
from study.model import build_model
from study.run.step import Precision, compile_training


@dataclass
class RunState:
    """What changes while a run trains. ``precision`` is the one place AMP lives."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    precision: Precision
    gen: torch.Generator  # the data order, flips and dequantization noise
    lr_factor: float = 1.0
    retries: int = 0  # restores after a divergence so far
    events: list[dict[str, Any]] = field(default_factory=list)  # divergences, in order
    epoch: int = 0  # last completed epoch
    step: int = 0  # global optimisation steps taken
    history: list[dict[str, float]] = field(default_factory=list)  # every completed epoch's metrics


def new_state(cfg: Config, image_shape: tuple[int, int, int], device: torch.device) -> RunState:
    """The state of a fresh run, fixed by the seed: model, Adam, precision and data generator."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    channels, size, _ = image_shape
    model = build_model(cfg, in_channels=channels, image_size=size).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile != "off":  # compiles lazily, at the first step; state dicts are unaffected
        compile_training(model, cfg.train.compile)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    return RunState(model, opt, Precision.create(cfg.stabilizers.amp, device), gen)


def to_checkpoint(st: RunState, cfg: Config, image_shape, run_id: str) -> dict[str, Any]:
    scaler = st.precision.scaler
    return {
        "config": flatten(cfg),
        "image_shape": list(image_shape),
        "model": st.model.state_dict(),
        "optimizer": st.opt.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": st.epoch,
        "step": st.step,
        # nothing draws from torch's global RNG after set-up (tests/test_step.py); kept for safety
        "rng_torch": torch.get_rng_state(),
        "rng_data": st.gen.get_state(),
        "history": st.history,
        "run_state": {"amp": st.precision.amp, "lr_factor": st.lr_factor, "retries": st.retries,
                      "events": st.events},  # fmt: skip
        "mlflow_run_id": run_id,
    }


def restore(st: RunState, state: dict[str, Any], device: torch.device, bookkeeping: bool = True) -> None:
    """Put a checkpoint's weights, optimizer, RNGs, step and history into ``st``. With ``bookkeeping``
    (a resume) also its precision, lr factor, retries and events; a restore after a divergence keeps
    the live ones, which already count the divergence."""
    st.model.load_state_dict(state["model"])
    st.opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_torch"])
    st.gen.set_state(state["rng_data"])
    st.epoch, st.step, st.history = state["epoch"], state["step"], list(state["history"])
    if bookkeeping:
        saved = state["run_state"]
        st.precision = Precision.create(saved["amp"], device) if saved["amp"] != st.precision.amp else st.precision
        st.lr_factor, st.retries, st.events = saved["lr_factor"], saved["retries"], list(saved["events"])
    if st.precision.scaler is not None and state["scaler"]:
        st.precision.scaler.load_state_dict(state["scaler"])


def model_from_checkpoint(state: dict, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint holds (eval mode) and its Config."""
    cfg = unflatten(state["config"])
    channels, size, _ = state["image_shape"]
    model = build_model(cfg, in_channels=channels, image_size=size)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), cfg


def checkpoint_of_run(store, run_id: str) -> dict:
    """The last checkpoint of a run of ``store`` (study.store.Store): from its local checkpoint folder,
    else its logged artifact."""
    from study import schema
    from study.run import checkpoint

    try:
        run = store.get_run(run_id)
    except Exception:
        raise ValueError(f"no run {run_id!r} in {store.uri}: see `run_study.py ui` for run ids") from None
    found = checkpoint.load(Path(run.data.tags.get(schema.CHECKPOINT_DIR, "/nonexistent")))
    if found is not None:
        return found[0]
    try:
        local = store.download_artifact(run_id, f"{schema.CHECKPOINT_ARTIFACT_DIR}/{checkpoint.LAST}")
    except FileNotFoundError:
        raise ValueError(f"run {run_id} has no checkpoint (neither its folder nor an artifact)") from None
    return torch.load(local, map_location="cpu", weights_only=True)


def sample_from_run(store, run_id: str, temperature: float, n: int, out: str | None) -> Path:
    """A grid of ``n`` samples at ``temperature`` from a run's last checkpoint, written to ``out``."""
    from study.sampling import sample_grid, save_grid

    if temperature <= 0 or n < 1:
        raise ValueError("--temperature must be > 0 and -n at least 1")
    model, _ = model_from_checkpoint(checkpoint_of_run(store, run_id))
    path = Path(out or f"samples-{run_id[:8]}-t{temperature:g}.png")
    return save_grid(sample_grid(model, n, temperature), path)
