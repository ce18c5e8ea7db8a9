#!/usr/bin/env bash
# Rehearse the GPU check here, before a GPU machine's 15 minutes are spent on it.
#
#   bash scripts/gpu/rehearse.sh            # REHEARSE_TESTS=0 skips the test suite
#
# 1. the bundle (scripts/gpu/build_bundle.sh), unless gpu-bundle/ already holds it;
# 2. a stand-in for the device image in .venv-gpu/: Python 3.12, torch 2.11.0, torchvision 0.26.0,
#    numpy 2.5.2 and the other image packages the project uses (scripts/gpu/rehearsal-image.txt),
#    and nothing the image lacks: no mlflow, no optuna (checked);
# 3. scripts/gpu/check.sh with that python, at the rehearsal scale, CUDA treated as absent: it installs
#    the bundle itself with --no-index --no-deps --target, exactly as on the device, and runs every step
#    on the CPU except the CUDA-only ones (fp16 + GradScaler), which it records as skipped;
# 4. the project's tests under the same interpreter with the bundle on PYTHONPATH.
# So a missing wheel, a torch 2.11 or Python 3.12 incompatibility, or a path that does not travel fails
# here. PyPI's torch for Linux is a CUDA build (download.pytorch.org, with the CPU builds, is out of
# reach here); it runs on the CPU. Results: gpu-check/rehearsal/ (summary.md, results.tsv, check.tar.gz).
# all in one function, read whole before it runs: editing or checking out this file during a
# run cannot change the running check
main() {
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY312=${PY312:-$(command -v python3.12 || echo /root/.pyenv/versions/3.12.1/bin/python3.12)}
VENV=${VENV:-.venv-gpu}
T0=$SECONDS

if ! ls gpu-bundle/wheels/*.whl >/dev/null 2>&1; then
  bash scripts/gpu/build_bundle.sh || exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "rehearse: creating $VENV with $PY312" >&2
  "$PY312" -m venv "$VENV" || exit 1
fi
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q -r scripts/gpu/rehearsal-image.txt 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" - <<'EOF' || exit 1
import sys, torch, torchvision, numpy
assert sys.version_info[:2] == (3, 12), sys.version
assert torch.__version__.startswith("2.11.0"), torch.__version__
assert torchvision.__version__.startswith("0.26.0"), torchvision.__version__
print(f"rehearse: python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"numpy {numpy.__version__}")
EOF
# the stand-in must hold nothing the image lacks, or it could pass where the device fails
(unset PYTHONPATH; "$VENV/bin/python" scripts/gpu/bundle_deps.py image-only) || {
  echo "rehearse: $VENV holds packages the device image lacks (see PROBLEM lines)" >&2
  exit 1
}

WORK=$(mktemp -d /tmp/gpu-rehearsal.XXXXXX)
rm -rf gpu-check/rehearsal
t_check=$SECONDS
(
  unset PYTHONPATH
  PY=$ROOT/$VENV/bin/python OUT=$ROOT/gpu-check/rehearsal CHECK_SCALE=rehearsal CHECK_CUDA=0 \
    CHECK_BUDGET_S=${CHECK_BUDGET_S:-2400} CHECK_TIME_FACTOR=${CHECK_TIME_FACTOR:-5} CHECK_WORK=$WORK \
    bash scripts/gpu/check.sh
)
check_rc=$?
t_check=$((SECONDS - t_check))

tests_rc=skipped
if [ "${REHEARSE_TESTS:-1}" = 1 ]; then
  echo
  echo "rehearse: the project's tests on Python 3.12 + torch 2.11, mlflow/optuna from the bundle only"
  t_tests=$SECONDS
  PYTHONPATH=$WORK/site:$ROOT "$VENV/bin/python" -m pytest -q -n 2 "$@" 2>&1 | tee gpu-check/rehearsal/pytest.log
  tests_rc=${PIPESTATUS[0]}
  echo "rehearse: tests took $((SECONDS - t_tests)) s"
fi

echo
echo "rehearse: check exit $check_rc ($t_check s), tests exit $tests_rc; $((SECONDS - T0)) s in all; scratch $WORK"
[ "$check_rc" = 0 ] && { [ "$tests_rc" = 0 ] || [ "$tests_rc" = skipped ]; }
}
main "$@"
