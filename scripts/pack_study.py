#!/usr/bin/env python
"""Pack a finished study's stores for committing, so report/ regenerates from any clone and the MLflow
UI of any clone shows every run's sample grid.

    .venv/bin/python scripts/pack_study.py studies/cifar-study

In place, on STUDY_DIR/mlflow.db and STUDY_DIR/mlartifacts/:
- artifact locations become ``mlflow-artifacts:/...`` (study.store.relocate_artifacts), resolved
  against the store's own mlartifacts/ folder by `run_study.py ui` and by the report;
- each run keeps its final sample grid at temperature 0.7, cropped to its first 16 samples (the same
  latents, 4x4) to keep the repository small; other grids and logged reports are dropped;
- checkpoints are kept only for the runs the report loads (analysis.diagnosis.checkpoint_runs), as
  model weights with their config and history (no optimizer state), and dropped for every other run;
- the local checkpoints/ folder is not committed, and no absolute path of the machine that trained stays
  in the store (study.store.portable_paths: checkpoint_dir tags, the Default experiment's root, an absolute
  data.path, made relative to the repository);
- every experiment is tagged for MLflow's model-training view (a store made before the tag existed);
- the store is compressed to STUDY_DIR/mlflow.db.xz, which is what git holds (study.committed): the
  mlflow.db beside it stays as its git-ignored working copy, the one every command opens.
Prints what it kept and the size of what will be committed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEEP_GRID_T = 0.7
GRID_SAMPLES = 4  # 4 x 4 of the 8 x 8 grid


def crop_grid(path: Path) -> None:
    """The top-left GRID_SAMPLES x GRID_SAMPLES samples of a torchvision grid (32 px images, padding 2)."""
    from PIL import Image

    with Image.open(path) as im:
        side = GRID_SAMPLES * 34 + 2
        im.crop((0, 0, side, side)).save(path, optimize=True)


def slim_checkpoint(path: Path) -> None:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    keep = ("config", "image_shape", "model", "epoch", "step", "history", "run_state", "mlflow_run_id")
    torch.save({k: state[k] for k in keep if k in state}, path)


def main(study_dir: Path) -> None:
    from analysis.diagnosis import checkpoint_runs
    from study import committed, schema
    from study.store import Store, portable_paths, relocate_artifacts
    from study.tracking import EXPERIMENT_KIND

    db = study_dir / "mlflow.db"
    store = Store(f"sqlite:///{db.resolve()}")
    experiments = store.experiments(include_default=True)
    runs = [r for e in experiments for r in store.search_runs([e.experiment_id])]
    keep_ckpt = checkpoint_runs(runs)
    for exp in experiments:
        if EXPERIMENT_KIND not in exp.tags:
            store.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
    print(f"relocated {relocate_artifacts(db)} artifact locations to mlflow-artifacts:/")
    print(f"made {portable_paths(db, ROOT)} absolute paths of this machine relative")
    art_root = study_dir / "mlartifacts"
    for exp_dir in sorted(p for p in art_root.iterdir() if p.is_dir()) if art_root.exists() else []:
        for run_dir in sorted(p for p in exp_dir.iterdir() if p.is_dir()):
            arts = run_dir / "artifacts"
            grids = sorted((arts / schema.SAMPLES_DIR).glob("epoch_*.png"))
            for grid in grids:
                last = max(int(p.name[6:9]) for p in grids)
                if grid.name == schema.sample_file(last, KEEP_GRID_T):
                    crop_grid(grid)
                else:
                    grid.unlink()
            ckpt = arts / schema.CHECKPOINT_ARTIFACT_DIR
            if ckpt.exists():
                if run_dir.name in keep_ckpt:
                    for f in ckpt.glob("*.pt"):
                        slim_checkpoint(f)
                else:
                    shutil.rmtree(ckpt)
            if (arts / schema.REPORT_DIR).exists():
                shutil.rmtree(arts / schema.REPORT_DIR)
    shutil.rmtree(study_dir / "checkpoints", ignore_errors=True)
    xz = committed.pack(db)
    print(f"compressed the store: {db.stat().st_size / 2**20:.1f} MiB -> {xz.name} {xz.stat().st_size / 2**20:.1f} MiB")
    working = {db, db.with_name(db.name + committed.FROM)}
    size = sum(p.stat().st_size for p in study_dir.rglob("*")
               if p.is_file() and p.suffix != ".log" and p not in working)  # fmt: skip
    print(f"kept checkpoints of {len(keep_ckpt)} runs; {size / 2**20:.1f} MiB to commit in {study_dir} "
          f"(not {db.name}: git ignores it)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
