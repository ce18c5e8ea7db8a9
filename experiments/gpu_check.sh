#!/usr/bin/env bash
# One short GPU check (about 5 minutes on an H200): CUDA AMP fp16 with GradScaler and bf16 in real
# training runs, torch.compile (plain, and reduce-overhead = CUDA graphs), the bench matrix at the paper
# size (with the usual reproduction's shape as baseline) and a compiled training run. Run from the repository root
# after `bash scripts/setup.sh`; results go to stdout and to ${OUT:-gpu-check}/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"
for amp in fp16 bf16; do  # one real run each: GradScaler path (fp16) and the scaler-free path (bf16)
  $PY run_study.py train --preset demo --device cuda --epochs 2 --set stabilizers.amp=$amp \
    --experiment gpu-check --tracking-uri "sqlite:///$PWD/$OUT/mlflow.db" --checkpoint-dir "$OUT/ckpt"
done
$PY run_study.py bench --size paper --device cuda --batch 64 --steps 20 --matrix | tee "$OUT/bench-paper.txt"
for mode in default reduce-overhead; do  # reduce-overhead: CUDA graphs, kept only if it pays
  $PY run_study.py bench --size paper --device cuda --amp bf16 --channels-last --compile --compile-mode $mode \
    --batch 64 --steps 20 | tee "$OUT/bench-paper-compile-$mode.txt"
done
$PY scripts/bench_optimisations.py --size paper --device cuda --batch 64 --steps 20 | tee "$OUT/optimisations.txt"
$PY run_study.py train --preset demo --device cuda --epochs 1 --set stabilizers.amp=bf16 --set train.compile=default \
  --experiment gpu-check --tracking-uri "sqlite:///$PWD/$OUT/mlflow.db" --checkpoint-dir "$OUT/ckpt" --fresh
