#!/usr/bin/env bash
# One prepared check on a CUDA host: install autocompress from a local folder of wheels (no index) into a
# fresh virtual environment that sees the torch already installed, run the backend conformance suite on
# cuda:0, run the quickstart study on cuda:0, and print what was measured.
#
#   bash benchmarks/gpu_check.sh WHEELHOUSE [PYTHON]
#
# WHEELHOUSE: built as docs/howto/air-gapped-install.md shows (autocompress, its dependencies but torch,
# pytest, pytest-timeout, pytest-xdist, hypothesis; onnxruntime-gpu to check ONNX Runtime's CUDA provider too).
# PYTHON: the interpreter whose torch (a CUDA build) is used (default: python3).
# Run from a checkout (the conformance tests live in tests/). Takes about 10 minutes; exits 2, saying
# what is missing, on a machine without a CUDA device.
set -euo pipefail

WHEELHOUSE="${1:-}"
PY="${2:-python3}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
N_TRIALS="${GPU_CHECK_TRIALS:-8}"

fail() { echo "gpu_check: $*" >&2; exit 2; }

[ -n "$WHEELHOUSE" ] || fail "usage: bash benchmarks/gpu_check.sh WHEELHOUSE [PYTHON]"
[ -d "$WHEELHOUSE" ] || fail "no wheelhouse folder at $WHEELHOUSE (see docs/howto/air-gapped-install.md)"
ls "$WHEELHOUSE"/autocompress-*.whl >/dev/null 2>&1 || fail "no autocompress wheel in $WHEELHOUSE"
command -v "$PY" >/dev/null || fail "no interpreter '$PY'"
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: this check needs an NVIDIA GPU and its driver"
"$PY" - <<'PY' || fail "the torch of $PY cannot use a CUDA device (a CPU build, or no device visible)"
import sys
import torch
ok = torch.cuda.is_available() and torch.cuda.device_count() > 0
print(f"gpu_check: python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"device {torch.cuda.get_device_name(0) if ok else 'none'}")
sys.exit(0 if ok else 1)
PY

WORK="$(mktemp -d -t autocompress-gpu-check.XXXXXX)"
echo "gpu_check: working in $WORK"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# a fresh environment that sees the interpreter's packages (its CUDA torch) and gets the rest offline
"$PY" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --no-index --find-links "$WHEELHOUSE" autocompress pytest pytest-timeout pytest-xdist hypothesis
"$VPY" -c "import autocompress, torch; print('gpu_check: autocompress', autocompress.__version__, 'from', autocompress.__file__, '| torch', torch.__version__)"

# 1. the backend conformance suite on cuda:0, against the installed package (run outside the checkout)
cd "$WORK"
rc_suite=0
"$VPY" -m pytest "$REPO/tests/backends/test_conformance.py" --backend cuda -p no:cacheprovider -q -rs \
    || rc_suite=$?

# 2. the quickstart on cuda:0: the torch backend (float artifacts: bits fixed at 32), then ONNX Runtime's
#    CUDA provider where onnxruntime-gpu is installed
run_quickstart() {
    local label="$1"; shift
    echo "gpu_check: quickstart, $label, $N_TRIALS trials"
    "$WORK/venv/bin/autocompress" run quickstart --n-trials "$N_TRIALS" --output "$WORK/runs/$label" "$@"
    "$WORK/venv/bin/autocompress" report "$WORK/runs/$label"
}
rc_torch=0
run_quickstart torch-cuda --set backend.name=torch --set backend.device=cuda:0 \
    --set "space.overrides.bits={fixed: 32}" || rc_torch=$?
rc_ort=0
if "$VPY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    run_quickstart ort-cuda --set backend.device=cuda:0 || rc_ort=$?
else
    echo "gpu_check: onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu): ORT on cuda:0 not checked"
fi

echo "gpu_check: conformance exit $rc_suite, quickstart torch:cuda:0 exit $rc_torch, onnxruntime:cuda:0 exit $rc_ort"
echo "gpu_check: run folders and reports under $WORK/runs"
[ "$rc_suite" = 0 ] && [ "$rc_torch" = 0 ] && [ "$rc_ort" = 0 ]
