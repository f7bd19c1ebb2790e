#!/usr/bin/env bash
# The Ascend host kit in one command: on a host with the NPU driver, CANN (atc), torch_npu, amct_onnx and
# ais_bench, run from a checkout of autocompress:
#     bash benchmarks/ascend_host_check.sh            # writes ascend_host_report.md
# It sources CANN's environment when present, then runs `autocompress doctor --device npu` (see
# autocompress/doctor.py). Without the hardware it prints what is missing and exits 2.
set -u
cd "$(dirname "$0")/.."
for env in "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}/set_env.sh" /usr/local/Ascend/ascend-toolkit/set_env.sh; do
    if [ -f "$env" ]; then
        # shellcheck disable=SC1090
        source "$env"
        break
    fi
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m autocompress.cli doctor --device npu "$@"
