#!/usr/bin/env bash
# The one-shot GPU check (about 8 minutes on an H200). Each step records pass, fail or skip with its
# seconds and goes on: a failure never costs the later measurements. It ends with one summary table.
#
#   on a lent machine without network (the image's python3, the bundle carried):
#       bash scripts/gpu/check.sh                  # carry: gpu-bundle (scripts/gpu/build_bundle.sh)
#   with your own environment that already has mlflow and optuna (no bundle needed):
#       PY=.venv/bin/python bash scripts/gpu/check.sh
#
# Steps: the bundle's install and the environment; fp16 + GradScaler and bf16 training at the demo
# size; the paper-size bench matrix against the targets (5,000 training img/s in bf16, evaluation at
# 3x the training rate or more); a short ablation of two variants (seed-report, paper) at the paper
# size on the real CIFAR-10 slices, logged to MLflow; the literal fp16 recipe at the paper size with
# its skipped steps and non-finite events; `evaluate` on one of those checkpoints (if the command
# exists); torch.compile, plain and reduce-overhead (CUDA graphs), in the bench and in a training run;
# the before/after optimisation script; last, the scale ladder's check at the paper's size (issue 28:
# each recipe at 1x, 3x and 10x the seed report's learning rate for 2 epochs of the slices, 112 steps,
# then its table, paper-stability.csv in OUT). That one runs alone within the 8 minutes:
#       CHECK_ONLY=paper-stability,paper-stability-table bash scripts/gpu/check.sh
# and its table is committed as studies/transfer/paper-stability.csv, which the transfer report reads.
#
# Environment:
#   PY=python3          the interpreter (the device image's python3 holds torch)
#   OUT=./gpu-check     where the results go; the device tool sets it. At most 4 files there:
#                       summary.md, results.tsv and check.tar.gz (logs + MLflow/Optuna stores, no checkpoints),
#                       paper-stability.csv (step paper-stability-table)
#   BUNDLE=gpu-bundle   the carried wheels/ and cifar10-slices/ (scripts/gpu/build_bundle.sh)
#   DATA=npz:DIR        the CIFAR-10 slices (default: BUNDLE's, else ../shared's)
#   CHECK_SCALE=full    full (the device) | rehearsal (tiny sizes, so a CPU runs every step quickly)
#   CHECK_BUDGET_S=480  the whole check's deadline; a step that would start later is skipped as such
#   CHECK_CUDA=auto     auto | 0 (treat CUDA as absent: the rehearsal's CUDA steps are skipped)
#   CHECK_TIME_FACTOR=1 multiplies every step's time limit (the rehearsal on a shared 2-core CPU uses more)
#   CHECK_WORK=DIR      scratch folder (default: a new one under /tmp); kept afterwards
#   CHECK_ONLY=a,b      run only these steps (and setup, environment): to repeat one that failed
# all in one function, read whole before it runs: editing or checking out this file during a
# run cannot change the running check
main() {
set -uo pipefail  # not -e: a step's failure is recorded, never fatal
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-python3}
BUNDLE=${BUNDLE:-gpu-bundle}
SCALE=${CHECK_SCALE:-full}
BUDGET=${CHECK_BUDGET_S:-480}
FACTOR=${CHECK_TIME_FACTOR:-1}
OUT=${OUT:-$ROOT/gpu-check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${CHECK_WORK:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
LOGS=$WORK/logs
STORE=$WORK/store      # mlflow.db, optuna.db and mlartifacts/ beside them
CKPT=$WORK/checkpoints # not archived: paper-size checkpoints are large
SITE=$WORK/site        # the bundle's --target folder
RESULTS=$WORK/results.tsv
mkdir -p "$LOGS" "$STORE" "$CKPT"
: > "$RESULTS"
URI="sqlite:///$STORE/mlflow.db"  # $STORE is absolute: sqlite:////tmp/...
OPTUNA="sqlite:///$STORE/optuna.db"
export PYTHONUNBUFFERED=1 MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT=true MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export MLFLOW_TRACKING_URI=$URI
export CHECK_SCALE=$SCALE
if [ -z "${DATA:-}" ]; then
  for d in "$ROOT/$BUNDLE/cifar10-slices" "$ROOT/../shared/data/cifar10-slices"; do
    if ls "$d"/*train*.npz >/dev/null 2>&1; then DATA="npz:$(cd "$d" && pwd)"; break; fi
  done
fi
DATA=${DATA:-}
START=$SECONDS
DEADLINE=$((SECONDS + BUDGET))
echo "gpu check: scale $SCALE, budget ${BUDGET}s, time factor $FACTOR, python $PY, work $WORK, out $OUT, data ${DATA:-none}"

# record NAME STATUS SECONDS LIMIT NOTE
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$RESULTS"; echo "-- $1: $2 ($3 s) $5"; }

# step NAME LIMIT_S [--cuda] [--data] CMD... : run CMD with a time limit, log it, record the outcome.
# --cuda: skipped when CUDA is absent; --data: skipped without the CIFAR-10 slices. A command that
# exits 99 is recorded as skipped, its last output line being the reason.
step() {
  local name=$1 limit=$(($2 * FACTOR)) need_cuda=0 need_data=0
  shift 2
  while [ "${1:-}" = --cuda ] || [ "${1:-}" = --data ]; do
    [ "$1" = --cuda ] && need_cuda=1
    [ "$1" = --data ] && need_data=1
    shift
  done
  local log=$LOGS/$name.log
  if [ -n "${CHECK_ONLY:-}" ] && [[ ",$CHECK_ONLY,setup,environment," != *",$name,"* ]]; then
    record "$name" skip 0 "$limit" "not in CHECK_ONLY"
    return
  fi
  if [ $need_cuda = 1 ] && [ "$HAVE_CUDA" != 1 ]; then record "$name" skip 0 "$limit" "needs CUDA (none here)"; return; fi
  if [ $need_data = 1 ] && [ -z "$DATA" ]; then record "$name" skip 0 "$limit" "no CIFAR-10 slices (build the bundle)"; return; fi
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 30 ]; then record "$name" skip 0 "$limit" "out of time (CHECK_BUDGET_S=$BUDGET)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local shown="$*"
  [ ${#shown} -gt 300 ] && shown="${shown:0:300} ..." # the full command is in the step's log
  echo "== $name (limit ${limit}s): $shown"
  echo "\$ $*" > "$log"
  local t0=$SECONDS rc
  timeout -k 15 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) last
  last=$(grep -v '^\s*$' "$log" | tail -1 | tr '\t' ' ' | cut -c1-160)
  tail -n 4 "$log" | cut -c1-300 | sed 's/^/   | /'
  case $rc in
    0) record "$name" pass "$took" "$limit" "" ;;
    99) record "$name" skip "$took" "$limit" "$last" ;;
    124 | 137) record "$name" fail "$took" "$limit" "timed out after ${limit}s" ;;
    *) record "$name" fail "$took" "$limit" "exit $rc: $last" ;;
  esac
}

# --- 1. the bundle, unless this python already has mlflow and optuna ------------------------------
has_mlflow_optuna() {
  "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('mlflow') and u.find_spec('optuna') else 1)" \
    2>/dev/null
}
HAVE_CUDA=0 # (steps below; setup never needs it)
if has_mlflow_optuna; then
  record setup skip 0 0 "mlflow and optuna already importable by $PY: no bundle installed"
elif ! ls "$ROOT/$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
  record setup fail 0 0 "no wheels in $BUNDLE/wheels and $PY lacks mlflow/optuna: run scripts/gpu/build_bundle.sh (with a network)"
else
  [ -f "$ROOT/$BUNDLE/MANIFEST.txt" ] && { echo "bundle manifest:"; cat "$ROOT/$BUNDLE/MANIFEST.txt"; } > "$LOGS/manifest.log"
  step setup 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$ROOT/$BUNDLE"/wheels/*.whl
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi

case ${CHECK_CUDA:-auto} in
  0) HAVE_CUDA=0 ;;
  *) HAVE_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0) ;;
esac
DEV=cpu
[ "$HAVE_CUDA" = 1 ] && DEV=cuda
echo "gpu check: device $DEV"
step environment 90 "$PY" scripts/gpu/check_helper.py env "$ROOT/$BUNDLE/wheels" "$SITE"

# --- 2. sizes: the device's, or tiny ones that walk the same code on a CPU -------------------------
if [ "$SCALE" = rehearsal ]; then
  BENCH=(--preset demo --batch 16 --steps 2)
  OPTIM=(--preset demo --batch 8 --steps 2 --compile-size none)
  # the paper preset's code paths (bn bijector, L2, real slices) at the demo model size
  PAPER=(--epochs 1 --set data.train_limit=256 --set model.mid_channels=8 --set model.num_blocks=1
    --set train.eval_batch_size=250)
  DEMO=(--epochs 1 --set data.train_limit=256)
  STABILITY=(--epochs 1 --set data.train_limit=128 --set model.mid_channels=4 --set model.num_blocks=1
    --set train.eval_batch_size=250)
else
  BENCH=(--preset paper --batch 64 --steps 20)
  OPTIM=(--preset paper --batch 64 --steps 20 --compile-size small)
  PAPER=(--epochs 3) # all 3,600 training images of the slice, 400 validation, 500 test
  DEMO=(--epochs 2)
  STABILITY=(--epochs 2) # 2 x 56 steps of batch 64 over the slices' 3,600 training images
fi
TRAIN=(run_study.py train --preset demo "${DEMO[@]}" --device "$DEV" --experiment gpu-check
  --tracking-uri "$URI" --checkpoint-dir "$CKPT" --fresh)
ABLATION=(run_study.py ablation stabilizers --preset paper --data "$DATA" --seeds 1 --experiment gpu-check-ablation
  --storage "$OPTUNA" --tracking-uri "$URI" --checkpoint-dir "$CKPT" --device "$DEV")

# --- 3. the steps, most wanted first; the compile steps last (their cold compiles vary most) -------
step train-fp16-demo 90 --cuda "$PY" "${TRAIN[@]}" --experiment gpu-check-fp16 --set stabilizers.amp=fp16
step train-bf16-demo 90 "$PY" "${TRAIN[@]}" --experiment gpu-check-bf16 --set stabilizers.amp=bf16
step bench-matrix-paper 150 "$PY" run_study.py bench "${BENCH[@]}" --device "$DEV" --matrix --log --tracking-uri "$URI"
step ablation-paper 150 --data "$PY" "${ABLATION[@]}" --only seed-report --only paper "${PAPER[@]}"
step fp16-recipe-paper 120 --cuda --data "$PY" "${ABLATION[@]}" --only seed-report-fp16 "${PAPER[@]}"
step evaluate 90 "$PY" scripts/gpu/check_helper.py evaluate "$URI" "$DATA"
for mode in default reduce-overhead; do # reduce-overhead adds CUDA graphs on a GPU
  step "compile-$mode" 180 "$PY" run_study.py bench "${BENCH[@]}" --device "$DEV" --amp bf16 --channels-last \
    --compile --compile-mode "$mode" --log --tracking-uri "$URI"
done
# the training loop itself compiled, with CUDA graphs on a GPU (train/eval switches, optimizer outside)
step train-compiled-demo 150 "$PY" "${TRAIN[@]}" --experiment gpu-check-compiled --set stabilizers.amp=bf16 \
  --set train.compile=reduce-overhead
step bench-optimisations 120 "$PY" -m bench.optimisations "${OPTIM[@]}" --device "$DEV"
# the paper-size stability cells (experiments/ladder.py PAPER_CHECK): 12 cells, one seed, fp32
step paper-stability 420 --data "$PY" run_study.py ablation paper-stability --preset paper "${STABILITY[@]}" \
  --data "$DATA" --seeds 1 --experiment gpu-check-paper-stability --storage "$OPTUNA" --tracking-uri "$URI" \
  --checkpoint-dir "$CKPT" --device "$DEV"
step paper-stability-table 60 --data "$PY" scripts/gpu/paper_table.py "$URI" gpu-check-paper-stability \
  "$OUT/paper-stability.csv"

# --- 4. one table, one archive ---------------------------------------------------------------------
TOTAL=$((SECONDS - START))
"$PY" scripts/gpu/check_helper.py summary "$RESULTS" "$STORE/mlflow.db" "$LOGS" "$OUT/summary.md" "$TOTAL" \
  > "$LOGS/summary.log" 2>&1 || {
  # the helper itself failed (a broken python?): the same table without key numbers
  {
    echo "# GPU check ($SCALE scale, $TOTAL s; key numbers unavailable: see logs/summary.log)"
    echo
    echo "| step | status | seconds | note |"
    echo "|---|---|---:|---|"
    awk -F'\t' '{ printf "| %s | %s | %s | %s |\n", $1, $2, $3, $5 }' "$RESULTS"
  } > "$OUT/summary.md"
}
cp "$RESULTS" "$OUT/results.tsv"
cp "$OUT/summary.md" "$WORK/summary.md"
# logs and the stores, without checkpoints (MLflow's copy of each run's last checkpoint included)
tar -C "$WORK" --exclude='*/checkpoint/*' --exclude='*.pt' -czf "$OUT/check.tar.gz" logs store summary.md results.tsv
if [ "$(stat -c %s "$OUT/check.tar.gz")" -gt $((15 * 1048576)) ]; then # the device returns files up to 16 MiB
  tar -C "$WORK" --exclude='*/checkpoint/*' --exclude='*.pt' --exclude='mlartifacts' \
    -czf "$OUT/check.tar.gz" logs store summary.md results.tsv
fi
echo
cat "$OUT/summary.md"
echo
echo "results: $OUT/summary.md, $OUT/results.tsv, $OUT/check.tar.gz ($(du -h "$OUT/check.tar.gz" | cut -f1)); scratch: $WORK"
if grep -q "$(printf '\tfail\t')" "$RESULTS"; then exit 1; fi
}
main "$@"
