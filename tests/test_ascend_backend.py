"""The ascend backend without the hardware: its command lines, the parsing of their output, and the
errors that say what is missing. (On an Ascend host the conformance suite runs it for real.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from autocompress.backends import AscendBackend
from autocompress.backends.ascend import (
    atc_command,
    check_atc_output,
    parse_ais_bench_summary,
    parse_msame_output,
    parse_npu_smi,
    soc_version_for,
)
from autocompress.errors import BackendError, MissingDependencyError

NPU_SMI = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.6                   Version: 23.0.6                                               |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B4               | OK            | 95.9        39                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3161 / 32768         |
+===========================+===============+====================================================+
| 1     910B4               | OK            | 90.1        38                0    / 0             |
| 0                         | 0000:C2:00.0  | 0           0    / 0          3160 / 32768         |
+===========================+===============+====================================================+
"""

AIS_BENCH = """\
[INFO] load model /tmp/model.om success
[INFO] -----------------Performance Summary------------------
[INFO] H2D_latency (ms): min = 0.2384185791015625, max = 0.30, mean = 0.25, median = 0.24, percentile(99%) = 0.29
[INFO] NPU_compute_time (ms): min = 2.4769999980926514, max = 3.937000036239624, mean = 3.5538000106811523, median = 3.7230000495910645, percentile(99%) = 3.936680030822754
[INFO] D2H_latency (ms): min = 0.0286, max = 0.1, mean = 0.05, median = 0.04, percentile(99%) = 0.09
[INFO] throughput 1000*batchsize.mean(1)/NPU_compute_time.mean(3.5538000106811523): 281.38893494131406
"""


def test_atc_command_line():
    cmd = atc_command(Path("/r/model.onnx"), Path("/t/model"), "Ascend910B4", (1, 1, 8, 8))
    assert cmd == [
        "atc",
        "--framework=5",
        "--model=/r/model.onnx",
        "--output=/t/model",
        "--soc_version=Ascend910B4",
        "--input_shape=input:1,1,8,8",
        "--input_format=NCHW",
        "--log=error",
    ]
    cmd = atc_command(
        Path("m.onnx"),
        Path("o"),
        "Ascend310P3",
        (4, 64),
        precision_mode="force_fp32",
        extra=["--op_select_implmode=high_performance"],
    )
    assert cmd[5:] == [
        "--input_shape=input:4,64",
        "--precision_mode=force_fp32",
        "--log=error",
        "--op_select_implmode=high_performance",
    ]


def test_atc_output_is_checked():
    check_atc_output(
        0, "ATC start working now, please wait for a moment.\nATC run success, welcome to the next use.\n"
    )
    failed = (
        "ATC start working now, please wait for a moment.\n"
        "ATC run failed, Please check the detail log, Try 'atc --help' for more information\n"
        "E10001: Value [Ascend999] for parameter [--soc_version] is invalid.\n"
        "        Solution: check the value.\n"
    )
    with pytest.raises(
        BackendError, match=r"ATC conversion failed \(exit code 255\): E10001: Value \[Ascend999\]"
    ):
        check_atc_output(255, failed)
    with pytest.raises(BackendError, match=r"exit code 0\): ATC start working"):
        check_atc_output(0, "ATC start working now, please wait for a moment.\n")  # killed before the verdict


def test_ais_bench_and_msame_summaries_are_parsed():
    s = parse_ais_bench_summary(AIS_BENCH)
    assert s["NPU_compute_time"]["median"] == pytest.approx(3.7230000495910645)
    assert s["NPU_compute_time"]["p99"] == pytest.approx(3.936680030822754)
    assert s["H2D_latency"]["mean"] == pytest.approx(0.25) and set(s) == {
        "H2D_latency",
        "NPU_compute_time",
        "D2H_latency",
    }
    with pytest.raises(BackendError, match="no 'NPU_compute_time"):
        parse_ais_bench_summary("[INFO] nothing")
    m = parse_msame_output(
        "Inference time: 1.62ms\nInference average time : 1.52 ms\nInference average time without first time: 1.49 ms\n"
    )
    assert m == {"average_ms": 1.52, "average_without_first_ms": 1.49}
    with pytest.raises(BackendError, match="Inference average time"):
        parse_msame_output("")


def test_npu_smi_gives_driver_chips_and_soc_version():
    facts = parse_npu_smi(NPU_SMI)
    assert facts == {"driver": "23.0.6", "chips": [(0, "910B4"), (1, "910B4")]}
    assert soc_version_for(NPU_SMI, 1) == "Ascend910B4"
    with pytest.raises(BackendError, match="pass backend option soc_version"):
        soc_version_for("", 0)


@pytest.mark.skipif(shutil.which("atc") is not None, reason="CANN's atc is installed here")
def test_without_cann_the_error_names_what_is_missing():
    with pytest.raises(
        MissingDependencyError,
        match=r"`atc` \(CANN's model converter\) is not on PATH: install the CANN toolkit",
    ):
        AscendBackend(device="npu:0")
    with pytest.raises(BackendError, match="device 'cpu' is not supported"):
        AscendBackend(device="cpu")
    with pytest.raises(BackendError, match=r"unknown option\(s\) \['bogus'\]"):
        AscendBackend(bogus=1)
    assert AscendBackend.capabilities()["preferred_channel_multiple"] == 16
