"""Resuming an fp16 run: its GradScaler state and its AMP mode, as a recovery may have left it, come
back from the checkpoint. Every other resume test trains in fp32, where neither is exercised."""

from __future__ import annotations

import dataclasses

import mlflow
import torch

from study.run.engine import train
from study.run.spec import Hooks
from tests.test_training import history, spec, tiny_cfg

FP16 = {"stabilizers.amp": "fp16"}


class Interrupt(Hooks):
    """Ctrl-C right after one epoch's checkpoint: the run ends KILLED and resumes."""

    def __init__(self, after_epoch: int):
        self.after_epoch = after_epoch

    def after_checkpoint(self, epoch):
        if epoch == self.after_epoch:
            raise KeyboardInterrupt


def _interrupted_then_resumed(store, tmp_path, hooks: Interrupt, **extra):
    s = spec(store, tmp_path, "resumed", **extra)
    s = dataclasses.replace(s, hooks=hooks)  # a RunSpec is frozen
    try:
        train(s)
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    return train(spec(store, tmp_path, "resumed", **extra))


def test_resumed_fp16_run_restores_the_scaler_and_equals_an_uninterrupted_one(store, tmp_path):
    resumed = _interrupted_then_resumed(store, tmp_path, Interrupt(after_epoch=1), **FP16)
    reference = train(spec(store, tmp_path / "ref", "reference", **FP16))
    client = mlflow.MlflowClient(store)
    scale = dict(history(client, reference.run_id, "grad_scale"))
    # the scaler has moved off its initial 2^16 by the checkpoint (a loss in nats per image overflows
    # fp16 at that scale), so a resume that forgot its state would train differently
    assert scale[1] < 2.0**16
    assert resumed.outcome == reference.outcome == "completed"
    assert history(client, resumed.run_id, "grad_scale") == history(client, reference.run_id, "grad_scale")
    assert history(client, resumed.run_id, "val_bpd") == history(client, reference.run_id, "val_bpd")
    assert resumed.test_bpd == reference.test_bpd


def test_resume_after_a_recovery_keeps_amp_off_and_the_scaler_state():
    """nan_amp_off: a divergence restores the last good checkpoint and turns fp16 off. A checkpoint taken
    after that must resume in fp32, not in the config's fp16; one taken in fp16 must resume with its
    GradScaler exactly as it was (scale and growth tracker). (An fp16 NaN cannot be forced into a
    recovery end to end cheaply: GradScaler skips it while its scale is above 1.)"""
    from study.run.state import new_state, restore, to_checkpoint
    from study.run.step import Precision

    cfg, shape, cpu = tiny_cfg(**FP16), (3, 8, 8), torch.device("cpu")
    st = new_state(cfg, shape, cpu)
    st.precision.scaler.scale(torch.ones(()))  # the scaler makes its state lazily, at its first use
    st.precision.scaler.update(new_scale=1234.0)
    st.precision.scaler._growth_tracker.fill_(7)  # as after 7 clean steps
    fp16_saved = to_checkpoint(st, cfg, shape, "run")
    st.precision = Precision.off()  # what restore_last_good does under nan_amp_off
    off_saved = to_checkpoint(st, cfg, shape, "run")

    back = new_state(cfg, shape, cpu)  # a resuming process builds its state from the config: fp16
    restore(back, fp16_saved, cpu)
    assert back.precision.amp == "fp16"
    saved = back.precision.scaler.state_dict()
    assert saved["scale"] == 1234.0 and saved["_growth_tracker"] == 7

    back = new_state(cfg, shape, cpu)
    restore(back, off_saved, cpu)
    assert back.precision.amp == "off" and back.precision.scaler is None
