"""The ascend backend without the hardware: its command lines (ATC, ais_bench), the AMCT call, the
precision modes, the parsing of their output, the bit-width rule, and the errors that say what is missing.
Nothing here runs on an NPU: on an Ascend host, ``autocompress doctor --device npu`` runs it for real."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml
from conftest import ROOT, cli_env

from autocompress.backends import AscendBackend
from autocompress.backends.amct import amct_violations
from autocompress.backends.ascend import (
    _exec_ms,
    ais_bench_command,
    atc_command,
    atc_precision,
    build_atc_input,
    check_atc_output,
    float_tables_apart,
    keep_dtype_nodes,
    measured_on,
    parse_ais_bench_summary,
    parse_msame_output,
    parse_npu_smi,
    soc_version_for,
)
from autocompress.errors import BackendError, MissingDependencyError
from autocompress.testing import PlainCNN

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


# -- bit widths, precision modes, AMCT and the host kit -------------------------------------------
def test_capabilities_say_what_the_npu_runs():
    caps = AscendBackend.capabilities()
    assert caps["stored_bits"] == caps["native_bits"] == [8, 16, 32]
    assert caps["weight_granularity"]["Linear"] == ["tensor"]
    assert caps["weight_granularity"]["Conv2d"] == ["channel", "tensor"]


def test_precision_mode_and_layers_kept_in_fp32():
    assert atc_precision({}) == ("force_fp16", [])  # the baseline: the fastest float artifact
    assert atc_precision({"a": 8, "b": 16, "c": 32, "d": 32}) == ("force_fp16", ["c", "d"])
    assert atc_precision({"c": 32}, "allow_fp32_to_fp16") == ("allow_fp32_to_fp16", ["c"])
    assert atc_precision({"c": 32}, "must_keep_origin_dtype") == ("must_keep_origin_dtype", [])
    with pytest.raises(BackendError, match=r"bits \[4\] not in \(8, 16, 32\) for \['a'\]"):
        atc_precision({"a": 4, "b": 8})
    cmd = atc_command(Path("m.onnx"), Path("o"), "Ascend910B4", (1, 64), keep_dtype=Path("/r/keep_dtype.cfg"))
    assert cmd[5:] == ["--input_shape=input:1,64", "--keep_dtype=/r/keep_dtype.cfg", "--log=error"]


def test_float_plans_export_the_onnx_atc_converts_and_name_the_fp32_nodes(tmp_path):
    model = PlainCNN().eval()
    src = build_atc_input(model, PlainCNN.example_inputs(), {"classifier": 32, "features.0": 16}, tmp_path)
    assert src == {
        "source": tmp_path / "model.onnx",
        "atc_input": tmp_path / "model.onnx",
        "fake_quant": None,
    }
    onnx.checker.check_model(str(src["atc_input"]))
    assert keep_dtype_nodes(src["atc_input"], ["classifier"]) == ["/classifier/Gemm"]
    assert keep_dtype_nodes(src["atc_input"], ["features.0"]) == ["/features/features.0/Conv"]
    with pytest.raises(BackendError, match=r"cannot find the ONNX node of layer 'nope' in model.onnx"):
        keep_dtype_nodes(src["atc_input"], ["nope"])
    with pytest.raises(BackendError, match=r"bits \[4\] not in \(8, 16, 32\)"):
        build_atc_input(model, PlainCNN.example_inputs(), {"classifier": 4}, tmp_path / "x")


def test_float_embedding_tables_follow_the_precision_mode_and_lower_ones_are_refused(tmp_path):
    """A table kept at 32 bits is no compute node for --keep_dtype (it follows the precision mode, as
    before tables were layers); this backend stores tables in float only."""
    from torch import nn

    from autocompress.lowering import LoweringSpec

    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(50, 16), nn.Linear(16, 4)

        def forward(self, ids):
            return self.head(self.emb(ids).mean(1))

    assert AscendBackend.bits_by_kind == {"Embedding": (32,)}
    model = Text().eval()
    kept = float_tables_apart(model, LoweringSpec.coerce({"emb": 32, "head": 32}))
    assert kept.layer_bits() == {"head": 32}
    assert atc_precision(kept.layer_bits()) == ("force_fp16", ["head"])
    with pytest.raises(BackendError, match=r"'emb' are embedding tables, stored in float only"):
        float_tables_apart(model, LoweringSpec.coerce({"emb": 8, "head": 8}))


def _int8_plain_cnn():
    from torch import nn
    from torch.nn.utils import parametrize

    from autocompress.inventory import compressible_layers
    from autocompress.lowering import LayerLowering, LoweringSpec
    from autocompress.techniques import fold_batchnorm
    from autocompress.techniques.quantize import add_fake_quant, record_weight_quant

    model = fold_batchnorm(PlainCNN().eval())[0]
    layers = {}
    for name, m in compressible_layers(model):
        add_fake_quant(m, 8, granularity="tensor" if isinstance(m, nn.Linear) else "channel")
        layers[name] = LayerLowering(8, "static", record_weight_quant(m))  # the trained grid, for the backend
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return model, LoweringSpec(layers)


class _RecordingAmct:
    """Stands in for amct_onnx to check the call this backend makes (not what AMCT does with it): it
    records the arguments and writes the two files the AMCT guide documents (copies of its input)."""

    def __init__(self, write: bool = True):
        self.calls, self.write = [], write

    def convert_qat_model(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.write:
            for suffix in ("_fake_quant_model.onnx", "_deploy_model.onnx"):
                shutil.copyfile(args[0], f"{args[1]}{suffix}")


def test_int8_plans_go_through_the_graph_check_and_convert_qat_model(tmp_path):
    model, precisions = _int8_plain_cnn()
    amct = _RecordingAmct()
    calib = PlainCNN.example_inputs(16)[0].numpy()
    src = build_atc_input(model, PlainCNN.example_inputs(), precisions, tmp_path, calib, amct=amct)
    [(args, kwargs)] = amct.calls
    assert args[0] == str(tmp_path / "model.onnx") and Path(args[1]).name == "model"
    assert kwargs == {"record_file": None}
    assert src["atc_input"] == tmp_path / "model_deploy.onnx"
    assert src["fake_quant"] == tmp_path / "model_fake_quant.onnx"
    assert src["fake_quant"].is_file() and src["atc_input"].is_file()
    assert amct_violations(onnx.load(str(tmp_path / "model.onnx"))) == []  # what AMCT was given
    with pytest.raises(
        BackendError,
        match=r"amct_onnx.convert_qat_model did not write model_fake_quant_model.onnx, model_deploy_model.onnx in .* "
        r"\(found: nothing\)",
    ):
        build_atc_input(
            model, PlainCNN.example_inputs(), precisions, tmp_path / "b", calib, amct=_RecordingAmct(False)
        )
    with pytest.raises(BackendError, match="int8 layers need calibration inputs"):
        build_atc_input(model, PlainCNN.example_inputs(), precisions, tmp_path / "c", None, amct=amct)


@pytest.mark.skipif(importlib.util.find_spec("amct_onnx") is not None, reason="amct_onnx is installed here")
def test_without_amct_the_error_names_the_package_and_cann_version(tmp_path):
    model, precisions = _int8_plain_cnn()
    with pytest.raises(
        MissingDependencyError,
        match=r"amct_onnx is not importable: install AMCT for ONNX \(the amct_onnx wheel .*CANN 8\.0 or later",
    ):
        build_atc_input(
            model, PlainCNN.example_inputs(), precisions, tmp_path, PlainCNN.example_inputs(8)[0].numpy()
        )


def test_ais_bench_command_line_and_execution_times():
    assert ais_bench_command(Path("/r/model.om"), 1, loop=50, warmup=5) == [
        "python3",
        "-m",
        "ais_bench",
        "--model=/r/model.om",
        "--device=1",
        "--loop=50",
        "--warmup_count=5",
    ]
    assert _exec_ms(3.5) == 3.5 and _exec_ms((10.0, 12.5)) == 2.5  # ms, or (start, end) in ms


def test_the_report_says_what_was_measured():
    m = measured_on("npu:0", {}, quantized=True)
    assert m == {
        "metric": "model.om on npu:0 (ais_bench InferSession)",
        "latency": "model.om on npu:0: ais_bench's execution time per call (exec_time_list)",
    }
    m = measured_on("npu:1", {"evaluate_on": "cpu", "latency": "wall"}, quantized=True)
    assert (
        m["metric"] == "model_fake_quant.onnx (AMCT's fake-quant model) on the CPU (onnxruntime), not the .om"
    )
    assert "wall time of InferSession.infer" in m["latency"]
    assert measured_on("npu:0", {"evaluate_on": "cpu"}, quantized=False)["metric"].startswith(
        "model.onnx (fp32)"
    )


def _cli(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "autocompress.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=300,
    )


def _ascend_study(tmp_path, bits):
    study = {
        "name": "npu",
        "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 1}},
        "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml"), "overrides": {"bits": {"choices": bits}}},
        "backend": {"name": "ascend", "device": "npu:0"},
        "trials": {"n": 1},
    }
    path = tmp_path / f"study{len(bits)}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.skipif(shutil.which("atc") is not None, reason="CANN's atc is installed here")
def test_a_4_bit_space_on_ascend_is_refused_up_front(tmp_path):
    proc = _cli(tmp_path, "run", str(_ascend_study(tmp_path, [4, 8, 32])), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(
        r"error: .*default\.yaml \(\+ overrides in .*study3\.yaml\): bits: 4 is not allowed by backend 'ascend' "
        r"\(native: 8, 16, 32; stored: 8, 16, 32\)",
        lines[0],
    ), lines[0]
    assert not (tmp_path / "out").exists()
    # 8 / 16 / 32 pass the bit-width rule: what stops that study here is the missing CANN toolkit
    proc = _cli(tmp_path, "run", str(_ascend_study(tmp_path, [8, 16])), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not allowed by backend" not in proc.stderr
    assert "backend.device: ascend backend: `atc` (CANN's model converter) is not on PATH" in proc.stderr


@pytest.mark.skipif(shutil.which("npu-smi") is not None, reason="an Ascend driver is installed here")
def test_the_host_kit_says_what_is_missing_and_exits_2(tmp_path):
    proc = _cli(tmp_path, "doctor", "--device", "npu", "--report", str(tmp_path / "r.md"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith("autocompress doctor --device npu: this machine cannot run the Ascend host check")
    for needed in ("`npu-smi` is not on PATH", "`atc` (CANN's model converter) is not on PATH", "torch_npu"):
        assert needed in out
    for package in ("amct_onnx", "ais_bench", "aclruntime"):
        if importlib.util.find_spec(package) is None:
            assert f"Python package {package} is not installed" in out
    assert "nothing was run and no report was written" in out and not (tmp_path / "r.md").exists()


def test_the_host_kit_study_is_valid_and_asks_only_what_the_npu_runs(tmp_path):
    from autocompress.config import load_config, resolve_space_file
    from autocompress.doctor import STUDY, TEST_FILES
    from autocompress.space import SearchSpace

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    cfg = load_config(str(path))
    assert (cfg.backend.name, cfg.backend.device, cfg.trials.n) == ("ascend", "npu:0", 6)
    space = SearchSpace.from_file(resolve_space_file(cfg), cfg.space.overrides)
    assert space.bit_widths() == {8, 16, 32} <= set(AscendBackend.stored_bits)
    assert all((ROOT / f).is_file() for f in TEST_FILES)  # what the kit runs on a host exists here


def test_sensitivity_skips_bit_widths_the_backend_does_not_store(tmp_path):
    """`autocompress inspect` on a backend without 8-bit weights (torch here; ascend has no 4-bit): the row
    says why it was not measured instead of failing the whole analysis inside the lowering."""
    from types import SimpleNamespace

    from autocompress.backends import TorchBackend
    from autocompress.inspection import analyze
    from autocompress.inventory import build_inventory
    from autocompress.metrics import accuracy

    model = PlainCNN().eval()
    ctx = SimpleNamespace(
        run_dir=tmp_path,
        baseline={"metric": 1.0},
        metric=accuracy,
        task=SimpleNamespace(test=PlainCNN.example_inputs(4) * 2),
        inventory=build_inventory(model, PlainCNN.example_inputs()),
        backend=TorchBackend("cpu"),
        teacher=model,
        config=SimpleNamespace(seed=0),
    )
    df = analyze(ctx, settings=(("bits", 8),), log=lambda s: None)
    assert len(df) == len(ctx.inventory) and not df.applied.any()
    assert set(df.note) == {"backend 'torch' does not store 8-bit weights"}


def test_a_trial_plan_from_the_ascend_space_lowers_to_a_graph_amct_accepts(
    tmp_path, digits_task, digits_teacher
):
    """Space (ascend grids) -> pipeline (QAT, finalize) -> the ascend lowering up to the AMCT call."""
    import optuna

    from autocompress.inventory import build_inventory
    from autocompress.pipeline import compress
    from autocompress.space import SearchSpace

    space = SearchSpace.from_dict(
        {"bits": {"fixed": 8}, "quant_granularity": {"choices": ["channel", "tensor"]}}
    )
    space.granularity_by_kind = dict(AscendBackend.weight_granularity)
    inventory = build_inventory(digits_teacher, digits_task.example_inputs())
    plan = space.suggest(optuna.create_study().ask(), inventory, epochs=1, lr=1e-3, seed=0)
    linear = [i.name for i in inventory if i.kind == "Linear"]
    assert linear and all(plan.layers[n].quant_granularity == "tensor" for n in linear)
    out = compress(digits_task, digits_teacher, plan, reduce_range=AscendBackend.reduce_range)
    amct = _RecordingAmct()
    src = build_atc_input(
        out.model,
        digits_task.example_inputs(),
        out.lowering,
        tmp_path,
        digits_task.calibration_inputs(),
        amct=amct,
    )
    assert len(amct.calls) == 1 and src["atc_input"].name == "model_deploy.onnx"
    qdq = onnx.load(str(src["source"]))
    assert amct_violations(qdq) == []
    gemm = [n for n in qdq.graph.node if n.op_type in ("Gemm", "MatMul")]
    inits = {i.name: i for i in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    for node in gemm:  # the classifier's weight scale is one number: per tensor, as AMCT requires
        scale = inits[producer[node.input[1]].input[1]]
        assert list(scale.dims) in ([], [1]), node.name
