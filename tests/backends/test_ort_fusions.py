"""The honest float baseline: ORT's transformer fusions where they apply, kept only where measured faster."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from autocompress.backends.base import LatencyStats
from autocompress.backends.onnxruntime import export_onnx
from autocompress.backends.ort_fusions import optimize_float, transformer_like
from autocompress.testing import PlainCNN

transformers = pytest.importorskip("transformers")

HEADS, HIDDEN, LAYERS, SEQ = 4, 64, 2, 32


class _Encoder(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BertModel from a config (no download), exported with eager attention."""
    cfg = transformers.BertConfig(
        vocab_size=500,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=4 * HIDDEN,
        max_position_embeddings=SEQ,
    )
    cfg._attn_implementation = "eager"  # sdpa exports keep SkipLayerNorm / BiasGelu fusable, not Attention
    torch.manual_seed(0)
    model = _Encoder(transformers.BertModel(cfg).eval()).eval()
    ids = torch.randint(0, 500, (1, SEQ))
    mask = torch.ones(1, SEQ, dtype=torch.long)
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids, mask),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input_ids", "attention_mask"],
            output_names=["hidden"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
        )
    return path, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _stats(ms: float) -> LatencyStats:
    return LatencyStats(ms, ms, 0.0, ms, 100, 0.01, 1, "cpu")


def _fake_timing(fastest: int | None):
    """A ``measure`` that makes the ``fastest``-th path the fastest (None: the unfused one, first)."""

    def measure(paths):
        return [
            _stats(1.0 if i == fastest or (fastest is None and i == 0) else 2.0) for i in range(len(paths))
        ]

    return measure


def test_fusions_are_found_reported_and_kept_when_faster(tiny_bert, tmp_path):
    path, feed = tiny_bert
    assert transformer_like(onnx.load(str(path)).graph)
    kept, report = optimize_float(
        path, num_heads=HEADS, hidden_size=HIDDEN, feed=feed, out_dir=tmp_path, measure=_fake_timing(1)
    )
    assert report["model_type"] == "bert" and report["decision"] == "fused is faster"
    assert report["variant"] == "all" and kept != path
    # one Attention per layer, two SkipLayerNormalization per layer, one BiasGelu per FFN
    fusions = report["transformer_fusions"]
    assert fusions["Attention"] == LAYERS and fusions["SkipLayerNormalization"] == 2 * LAYERS
    assert fusions["BiasGelu"] == LAYERS and fusions["EmbedLayerNormalization"] == 1
    ops = _ops(kept)
    assert all(ops[op] == n for op, n in fusions.items())  # the kept file holds what the report says
    assert "Softmax" not in ops  # attention runs inside the fused kernel
    # every variant tried computes the model's outputs; the ones not kept are gone
    assert all(c["outputs_match"] for c in report["candidates"].values())
    assert "attention only" in report["candidates"] and "all but attention" in report["candidates"]
    assert report["candidates"]["all but attention"]["fusions"].get("Attention", 0) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [kept.name]


def test_the_unfused_model_is_kept_when_every_fusion_is_slower(tiny_bert, tmp_path):
    path, feed = tiny_bert
    kept, report = optimize_float(
        path, num_heads=HEADS, hidden_size=HIDDEN, feed=feed, out_dir=tmp_path, measure=_fake_timing(None)
    )
    assert kept == path and report["decision"] == "fused is slower" and report["transformer_fusions"] == {}
    assert report["candidates"]["all"]["fusions"]["Attention"] == LAYERS  # found, measured, not kept
    assert report["candidates"]["all"]["latency_ms"] == 2.0 and report["unfused_ms"] == 1.0
    assert not list(tmp_path.iterdir())


def test_measured_side_by_side_the_faster_is_kept(tiny_bert, tmp_path):
    path, feed = tiny_bert
    kept, report = optimize_float(path, num_heads=HEADS, hidden_size=HIDDEN, feed=feed, out_dir=tmp_path)
    timed = {n: c["latency_ms"] for n, c in report["candidates"].items()}
    print(report["decision"], report["unfused_ms"], timed)
    best = min(timed.values())
    if kept == path:
        assert best >= report["unfused_ms"]
    else:
        assert timed[report["variant"]] == best < report["unfused_ms"]


def test_a_cnn_is_returned_as_it_is(tmp_path):
    path = tmp_path / "cnn.onnx"
    export_onnx(PlainCNN().eval(), PlainCNN.example_inputs(1), path)
    kept, report = optimize_float(path)
    assert kept == path and report["decision"] == "not a transformer" and report["transformer_fusions"] == {}
    assert np.array_equal(sorted(p.name for p in tmp_path.iterdir()), ["cnn.onnx"])
