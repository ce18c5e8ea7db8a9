#!/usr/bin/env bash
# Create .venv with everything the study needs, then run the main job on the embedded offline
# default. SETUP_ONLY=1 skips the job (CI uses that). TORCH_SPEC overrides the torch pin elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# torch and torchvision must be installed together at matching versions (these lie on this
# machine's disk; pyproject.toml keeps looser ranges for users elsewhere)
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
# the versions this project was tested with (constraints.txt) unless CONSTRAINTS= is set empty
CONSTRAINTS=${CONSTRAINTS-constraints.txt}
.venv/bin/python -m pip install -q ${CONSTRAINTS:+-c "$CONSTRAINTS"} -e '.[dev,postgres]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, torchvision, mlflow, optuna, pandas, seaborn, click, skimage, statsmodels, psycopg2" \
  || { echo "setup: the environment is incomplete (see pip's messages above)" >&2; exit 1; }
echo "setup: .venv ready" >&2

if [ "${SETUP_ONLY:-0}" != "1" ]; then
  # the main job on the embedded offline data: the stabilizer ablation at the demo preset (2 seeds),
  # then its report in demo-report/ (report/ holds the committed studies' reports)
  .venv/bin/python run_study.py ablation stabilizers --preset demo --seeds 2 --workers 2
  exec .venv/bin/python run_study.py report --experiment stabilizers-demo --out demo-report
fi
