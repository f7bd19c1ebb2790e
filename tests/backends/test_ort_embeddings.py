"""Embedding tables lowered by ONNX Runtime: stored packed (int8, or two 4-bit values a byte), only the
rows a lookup reads dequantized, outputs equal to the torch model's fake-quantized table (real ORT)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.backends.onnx_lookup import lookup_block
from autocompress.backends.onnx_rewrite import locate
from autocompress.errors import BackendError
from autocompress.lowering import LayerLowering, LoweringSpec
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.testing.technique_suite import reference_task


class Table(nn.Module):
    """An embedding table whose output is the looked-up rows themselves (flattened per sample)."""

    def __init__(self, vocab: int = 2000, dim: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)

    def forward(self, ids):
        return self.emb(ids).flatten(1)

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, 2000, (batch, 12)),)


class NarrowTable(Table):
    """Rows of 24 features: no GatherBlockQuantized block size (a power of two from 16) divides them."""

    def __init__(self):
        super().__init__(2000, 24)


@pytest.fixture(scope="module")
def backend():
    be = OnnxRuntimeBackend(isolate=False)
    yield be
    be.close()


def _lowered(cls, plan_layer: LayerPlan | None, backend, out_dir):
    task = reference_task(cls, samples=64)
    teacher = task.model_fn().eval()
    plan = Plan(layers={} if plan_layer is None else {"emb": plan_layer}, epochs=0)
    out = compress(task, teacher, plan, reduce_range=backend.reduce_range)
    art = backend.lower(out.model, task.example_inputs(), out.lowering, out_dir, task.calibration_inputs(8))
    return task, teacher, out, art


GRIDS = [
    (8, "symmetric", "channel"),
    (8, "asymmetric", "channel"),
    (8, "symmetric", "tensor"),
    (6, "symmetric", "channel"),
    (4, "symmetric", "channel"),
    (4, "asymmetric", "channel"),
    (4, "asymmetric", "tensor"),
    (2, "symmetric", "channel"),
]


@pytest.mark.parametrize(("bits", "scheme", "granularity"), GRIDS)
def test_table_round_trips_and_the_artifact_gives_the_torch_rows(
    tmp_path, backend, bits, scheme, granularity
):
    lp = LayerPlan(bits=bits, quant_scheme=scheme, quant_granularity=granularity)
    task, teacher, out, art = _lowered(Table, lp, backend, tmp_path)
    record = out.lowering.layers["emb"].weight
    assert (record.bits, record.scheme, record.granularity) == (bits, scheme, granularity)
    w = teacher.emb.weight.detach().numpy()
    # a lookup accumulates nothing: the full grid even where int8 matmuls use 7 bits (no VNNI)
    qmax = 2 ** (bits - 1) - 1
    lo, hi = (-qmax, qmax) if scheme == "symmetric" else (-qmax - 1, qmax)
    assert record.q.min() >= lo and record.q.max() <= hi
    if granularity == "channel":
        assert record.scale.shape == (w.shape[0],)  # one scale per row (token)
    step = np.broadcast_to(record.scale.reshape(-1, 1) if record.scale.ndim else record.scale, w.shape)
    err = np.abs(record.dequantize() - w)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-12).all(), err.max()
    assert err.max() > 0  # it was quantized
    # the torch model holds exactly that table (fake quantization baked in)
    np.testing.assert_allclose(out.model.emb.weight.detach().numpy(), record.dequantize(), rtol=1e-6, atol=0)
    # ... and the artifact gives the torch model's rows
    x = task.test[0]
    got = backend.runner(art)((x.numpy(),))
    np.testing.assert_allclose(got, out.model(x).detach().numpy(), rtol=0, atol=1e-6)
    graph = onnx.load(str(art.path)).graph
    floats = [
        i for i in graph.initializer if i.data_type == TensorProto.FLOAT and list(i.dims) == list(w.shape)
    ]
    assert not floats  # the float table is gone
    ops = {n.op_type for n in graph.node}
    if bits <= 4:
        assert "GatherBlockQuantized" in ops and "DequantizeLinear" not in ops
        packed = next(i for i in graph.initializer if i.name.endswith("_int4"))
        assert packed.data_type == TensorProto.UINT8 and list(packed.dims) == [w.shape[0], w.shape[1] // 2]
    else:
        table = next(i for i in graph.initializer if i.name.endswith("_int8"))
        assert table.data_type == TensorProto.INT8 and list(table.dims) == list(w.shape)
        assert {"Gather", "Cast", "Mul"} <= ops and "DequantizeLinear" not in ops


def test_packed_tables_are_a_quarter_and_an_eighth_of_the_float_one(tmp_path, backend):
    table_bytes = 2000 * 64 * 4
    sizes = {}
    for name, lp in [
        ("float", None),
        ("int8", LayerPlan(bits=8)),
        ("int8 asym", LayerPlan(bits=8, quant_scheme="asymmetric")),
        ("int4", LayerPlan(bits=4)),
        ("int4 asym", LayerPlan(bits=4, quant_scheme="asymmetric")),
    ]:
        _, _, _, art = _lowered(Table, lp, backend, tmp_path / name.replace(" ", "_"))
        sizes[name] = os.path.getsize(art.path) / table_bytes
    assert 1.0 <= sizes["float"] < 1.01
    assert 0.25 < sizes["int8"] < 0.3 and 0.25 < sizes["int8 asym"] < 0.3  # + per-row scales (zero points)
    assert 0.125 < sizes["int4"] < 0.17 and 0.125 < sizes["int4 asym"] < 0.17


def test_rows_no_block_size_divides_are_dequantized_whole_before_the_lookup(tmp_path, backend):
    assert lookup_block(24) is None and lookup_block(384) == 128 and lookup_block(64) == 64
    task, _, out, art = _lowered(NarrowTable, LayerPlan(bits=4), backend, tmp_path)
    model = onnx.load(str(art.path))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {21}
    packed = next(i for i in model.graph.initializer if i.name.endswith("_int4"))
    assert packed.data_type == TensorProto.INT4 and list(packed.dims) == [2000, 24]
    assert "DequantizeLinear" in {n.op_type for n in model.graph.node}
    x = task.test[0]
    np.testing.assert_allclose(backend.runner(art)((x.numpy(),)), out.model(x).detach().numpy(), atol=1e-6)
    assert os.path.getsize(art.path) < 0.17 * 2000 * 24 * 4


def test_a_table_read_by_more_than_lookups_is_refused():
    table = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb.weight", "ids"], ["rows"], name="lookup"),
            helper.make_node("Gemm", ["rows2d", "emb.weight"], ["logits"], name="tied", transB=1),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "emb.weight")],
    )
    q, scale = np.zeros((10, 4), np.int32), np.ones(10, np.float32)
    with pytest.raises(
        BackendError, match=r"layer 'emb': its embedding table 'emb.weight' is also read by Gemm"
    ):
        locate(graph, "emb", table, 8, q, scale, set(), lookup=True)
    found = locate(graph, "emb", table, 8, q, scale, set())  # as the Gemm's weight it is found as before
    assert found.nodes == ["tied"] and not found.lookup


class TinyBert(nn.Module):
    """A transformers BertModel (from a BertConfig, nothing downloads) over token ids, mean-pooled."""

    def __init__(self):
        super().__init__()
        import transformers

        config = transformers.BertConfig(
            vocab_size=3000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
        self.bert = transformers.BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(64, 10)

    def forward(self, ids):
        return self.head(self.bert(input_ids=ids).last_hidden_state.mean(dim=1))

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, 3000, (batch, 16)),)


def test_bert_with_int8_tables_lowers_runs_and_sheds_three_quarters_of_them(tmp_path, backend):
    pytest.importorskip("transformers")
    task = reference_task(TinyBert, samples=32)
    teacher = task.model_fn().eval()
    tables = {n: m.weight.numel() * 4 for n, m in teacher.named_modules() if isinstance(m, nn.Embedding)}
    assert set(tables) == {f"bert.embeddings.{k}_embeddings" for k in ("word", "position", "token_type")}
    x = task.test[0]

    def lowered(layers, name):
        out = compress(task, teacher, Plan(layers=layers, epochs=0), reduce_range=backend.reduce_range)
        art = backend.lower(
            out.model, task.example_inputs(), out.lowering, tmp_path / name, task.calibration_inputs(8)
        )
        return out, art, os.path.getsize(art.path)

    table_bytes = sum(tables.values())
    scale_bytes = 4 * sum(m.num_embeddings for m in teacher.modules() if isinstance(m, nn.Embedding))
    _, _, float_size = lowered({}, "float")
    # int8 keeps a quarter of a table's bytes; one float32 scale per row (the default) 4 more bytes a row;
    # the lookups' Gather/Cast/Mul nodes and the unfused graph cost ~1.3 kB here (0.2% of the tables)
    _, _, size = lowered({n: LayerPlan(bits=8, quant_granularity="tensor") for n in tables}, "int8_tensor")
    assert 0.745 * table_bytes <= float_size - size <= 0.75 * table_bytes, (float_size, size, tables)
    out, art, size = lowered({n: LayerPlan(bits=8) for n in tables}, "int8_tables")
    assert float_size - size >= 0.745 * table_bytes - scale_bytes, (float_size, size, tables)
    assert art.meta["kernels"].get("Gather", 0) >= 3 and art.meta["kernels"]["Cast"] >= 3
    np.testing.assert_allclose(backend.runner(art)((x.numpy(),)), out.model(x).detach().numpy(), atol=1e-4)
    # int8 on every layer it offers, the tables included: the tables' saving comes on top
    linears = {n: LayerPlan(bits=8) for n, m in teacher.named_modules() if isinstance(m, nn.Linear)}
    _, _, linear_size = lowered(linears, "int8_linear")
    _, _, all_size = lowered({**linears, **{n: LayerPlan(bits=8) for n in tables}}, "int8_all")
    assert linear_size - all_size >= 0.745 * table_bytes - scale_bytes, (linear_size, all_size)
    assert all_size < 0.35 * float_size  # ~1/4 of every weight, plus QDQ scales and nodes


def test_tables_left_float_leave_the_artifact_byte_for_byte(tmp_path, backend):
    """A plan that keeps the tables at 32 bits lowers to the bytes of a spec that never names them (what
    the lowering made before tables were layers)."""
    pytest.importorskip("transformers")
    task = reference_task(TinyBert, samples=32)
    teacher = task.model_fn().eval()
    layers = {n: LayerPlan(bits=8) for n, m in teacher.named_modules() if isinstance(m, nn.Linear)}
    layers |= {n: LayerPlan(bits=32) for n, m in teacher.named_modules() if isinstance(m, nn.Embedding)}
    out = compress(task, teacher, Plan(layers=layers, epochs=0), reduce_range=backend.reduce_range)
    assert out.lowering.layers["bert.embeddings.word_embeddings"] == LayerLowering(32)
    tables = {n for n, m in teacher.named_modules() if isinstance(m, nn.Embedding)}
    without = LoweringSpec(
        {n: lay for n, lay in out.lowering.layers.items() if n not in tables}, out.lowering.calibration
    )
    assert len(without.layers) == len(out.lowering.layers) - 3
    calib = task.calibration_inputs(8)
    a = backend.lower(out.model, task.example_inputs(), out.lowering, tmp_path / "a", calib)
    b = backend.lower(out.model, task.example_inputs(), without, tmp_path / "b", calib)
    assert a.path.read_bytes() == b.path.read_bytes()
