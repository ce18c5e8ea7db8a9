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
OUTCOME = "outcome"  # completed | recovered | diverged | pruned (see OUTCOMES)
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
KIND_LR_SEARCH = "lr-search"
KIND_BENCH = "bench"

OUTCOMES = ("completed", "recovered", "diverged", "pruned")

# --- metrics (step = epoch) ----------------------------------------------------------------------------
EPOCH = "epoch"
TRAIN_BPD = "train_bpd"
VAL_BPD = "val_bpd"
TEST_BPD = "test_bpd"  # once, at the final epoch
LR = "lr"
GRAD_NORM_MEAN, GRAD_NORM_MEDIAN, GRAD_NORM_MAX = "grad_norm_mean", "grad_norm_median", "grad_norm_max"
CLIP_FRACTION = "clip_fraction"
NONFINITE_EVENTS = "nonfinite_events"  # per completed epoch
NONFINITE_EVENT = "nonfinite_event"  # 1.0 at the epoch a divergence happened
SKIPPED_STEPS = "skipped_steps"
GRAD_SCALE = "grad_scale"
IMAGES_PER_S = "images_per_s"
EPOCH_SECONDS = "epoch_seconds"
PEAK_MEMORY_MB = "peak_memory_mb"
AMP_ON = "amp_on"
LOGGING_SECONDS = "logging_seconds"
CHECKPOINT_SECONDS = "checkpoint_seconds"
BEST_VAL_BPD, BEST_LR = "best_val_bpd", "best_lr"

# the per-epoch curves analysis reads back (analysis/collect.py)
HISTORY_METRICS = (
    TRAIN_BPD, VAL_BPD, LR, GRAD_NORM_MEAN, GRAD_NORM_MEDIAN, GRAD_NORM_MAX, CLIP_FRACTION, NONFINITE_EVENTS,
    SKIPPED_STEPS, GRAD_SCALE, IMAGES_PER_S, EPOCH_SECONDS,
)  # fmt: skip

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
