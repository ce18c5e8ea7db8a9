"""The MLflow schema of the study: every tag key, metric name and artifact name, once.

Training, the sweeps, bench, analysis/collect.py and the report read and write runs only through
these names, so a renamed metric cannot silently leave a reader looking for the old one. Changing a
value here orphans what recorded runs already hold: add a name, never rename one.
"""

from __future__ import annotations

# --- tags --------------------------------------------------------------------------------------------
RUN_KEY = "run_key"  # identity of a run: hash of its variant and configuration (study.run.spec.run_key)
PRESET = "preset"
VARIANT = "variant"
SEED = "seed"
GIT_COMMIT = "git_commit"
DEVICE = "device"
TORCH_VERSION = "torch_version"
THREADS = "threads"
CHECKPOINT_DIR = "checkpoint_dir"
# which checkpoint a resume continued from ("last.pt", "prev.pt (last.pt: why it was passed over)", or
# "none: ... (started again from scratch)"), so a run's record says when a corrupt file was skipped
RESUMED_FROM = "resumed_from"
OUTCOME = "outcome"  # see OUTCOMES
SKIP_REASON = "skip_reason"  # why a cell was not run (outcome skipped)
INTERRUPTED_BY = "interrupted_by"  # the signal (or disk-full) that stopped a run (outcome interrupted): it resumes
OWNER, OWNER_HEARTBEAT = "owner", "owner_heartbeat"  # host:pid of the process training a run, its last beat
FAMILY = "family"  # the ablation family a cell's variant belongs to
# MLflow's own: the UI shows these as the run's description, source and commit
NOTE = "mlflow.note.content"
SOURCE_NAME, SOURCE_TYPE, SOURCE_COMMIT = "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit"
RETRIES = "retries"
FINAL_AMP = "final_amp"
FIRST_NONFINITE_EPOCH = "first_nonfinite_epoch"
DIVERGENCE_CAUSES = "divergence_causes"
STUDY = "study"  # the ablation study a cell belongs to
ABLATION_KEY = "ablation_key"  # identity of an ablation study's parent run and its cells
LR_SEARCH = "lr_search"  # name of the learning-rate search a run belongs to
TRIAL = "trial"
KIND = "kind"  # what a run that is not a training cell is: see KINDS
SAMPLER, PRUNER = "sampler", "pruner"
BEST_TRIAL, BEST_RUN_ID = "best_trial", "best_run_id"
MACHINE, SIZE = "machine", "size"
PARENT = "mlflow.parentRunId"  # MLflow's own

KIND_STUDY_PARENT = "study-parent"
CELLS_PLANNED = "cells_planned"  # on a study's parent: the cells of the grid it last ran (skipped ones too)
KIND_LR_SEARCH = "lr-search"
KIND_BENCH = "bench"

OUTCOMES = ("completed", "recovered", "diverged", "pruned", "skipped", "interrupted")
# what happened to a run that ended (study.run.outcome.classify), beside the engine's OUTCOME
RESULT = "result"
RESULTS = ("fails-at-init", "diverges-in-training", "fails-in-eval", "trains-badly", "trained")

# --- metrics (step = epoch) ----------------------------------------------------------------------------
EPOCH = "epoch"  # read from runs recorded before 2026-11-29's redesign only: the step is the epoch
TRAIN_BPD = "train_bpd"
VAL_BPD = "val_bpd"
TEST_BPD = "test_bpd"  # once, at the final epoch
LR = "lr"
GRAD_NORM_MEAN, GRAD_NORM_MEDIAN, GRAD_NORM_MAX = "grad_norm_mean", "grad_norm_median", "grad_norm_max"
CLIP_FRACTION = "clip_fraction"
NONFINITE_EVENTS = "nonfinite_events"  # divergences in that epoch (logged also at an epoch that diverged)
SKIPPED_STEPS = "skipped_steps"
GRAD_SCALE = "grad_scale"
IMAGES_PER_S = "images_per_s"
EPOCH_SECONDS = "epoch_seconds"
PEAK_MEMORY_MB = "peak_memory_mb"
AMP_ON = "amp_on"
LOGGING_SECONDS = "logging_seconds"
CHECKPOINT_SECONDS = "checkpoint_seconds"
# how much each stabilizer acted in the epoch (0 when its switch is off): see SWITCH_ACTIVITY
CLIP_RATIO_MEDIAN = "clip_ratio_median"  # median gradient norm / clip threshold (> 1: clipped)
L2_PENALTY = "l2_penalty"  # the L2 term, nats per image, mean over steps
INPUT_CLAMP_FRACTION = "input_clamp_fraction"  # logit-space inputs the clamp moved
S_CLAMP_FRACTION = "s_clamp_fraction"  # log-scales beyond the clamp of s
SCALE_BOUND_FRACTION = "scale_bound_fraction"  # tanh saturated (>0.99) or softplus scale at its floor
BN_MEAN_GAP = "bn_mean_gap"  # bijector: |batch mean - running mean| in running std, mean over layers
BN_LOGVAR_GAP = "bn_logvar_gap"  # bijector: |log batch var - log running var|
# |softplus form - log form| of the logit log-det, nats per dimension, mean over training inputs: the
# two ways of writing it are one function, so this is float rounding unless an input breaks one form
LOGIT_FORM_GAP = "logit_form_gap"
BEST_VAL_BPD, BEST_LR = "best_val_bpd", "best_lr"

# the per-epoch curves analysis reads back (analysis/collect.py)
HISTORY_METRICS = (
    TRAIN_BPD, VAL_BPD, LR, GRAD_NORM_MEAN, GRAD_NORM_MEDIAN, GRAD_NORM_MAX, CLIP_FRACTION, NONFINITE_EVENTS,
    SKIPPED_STEPS, GRAD_SCALE, IMAGES_PER_S, EPOCH_SECONDS, AMP_ON, CLIP_RATIO_MEDIAN, L2_PENALTY,
    INPUT_CLAMP_FRACTION, S_CLAMP_FRACTION, SCALE_BOUND_FRACTION, BN_MEAN_GAP, BN_LOGVAR_GAP, LOGIT_FORM_GAP,
)  # fmt: skip

# The flow's activity counters (study.flows.activity kinds) -> their metric names
FLOW_ACTIVITY = {
    "input_clamp": INPUT_CLAMP_FRACTION, "s_clamp": S_CLAMP_FRACTION, "scale_bound": SCALE_BOUND_FRACTION,
    "bn_mean_gap": BN_MEAN_GAP, "bn_logvar_gap": BN_LOGVAR_GAP, "logit_form_gap": LOGIT_FORM_GAP,
}  # fmt: skip

# Which metric says a switch acted (> 0 in some epoch of the arm where it is on). Switches not listed
# change the model's function wherever they differ (structural); whether that mattered is then told
# by the results, and a variant bit-identical to its baseline is reported as not acting.
SWITCH_ACTIVITY = {
    "stabilizers.grad_clip": CLIP_FRACTION,
    "stabilizers.input_clamp": INPUT_CLAMP_FRACTION,
    "stabilizers.s_clamp": S_CLAMP_FRACTION,
    "stabilizers.s_clamp_kind": S_CLAMP_FRACTION,
    "stabilizers.l2": L2_PENALTY,
    "stabilizers.amp": AMP_ON,
    "stabilizers.logit_logdet": LOGIT_FORM_GAP,
}
# the level above which a switch counts as acting (0 unless its metric has a floor of float rounding:
# float32 writes a log-det of a few nats per dimension to about 1e-6)
SWITCH_THRESHOLD = {LOGIT_FORM_GAP: 1e-4}

# --- artifacts -------------------------------------------------------------------------------------------
SAMPLES_DIR = "samples"
CHECKPOINT_ARTIFACT_DIR = "checkpoint"
EVENTS_DIR = "events"
DIVERGENCE_EVENTS_FILE = "divergence_events.json"
REPORT_DIR = "report"


def sample_file(epoch: int, temperature: float) -> str:
    """File name of a sample grid (inside SAMPLES_DIR): written by training, read by the report."""
    return f"epoch_{epoch:03d}_t{temperature:.1f}.png"


def sample_artifact(epoch: int, temperature: float) -> str:
    return f"{SAMPLES_DIR}/{sample_file(epoch, temperature)}"
