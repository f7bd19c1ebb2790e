"""The shipped example tasks (a user's checkpoint path) at tiny sizes: build, validate, lower to ONNX
Runtime with their own inputs, evaluate with their own metric."""

from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import pytest
import torch

from autocompress.backends.onnxruntime import OnnxRuntimeBackend
from autocompress.errors import ConfigError
from autocompress.lowering import LayerLowering, LoweringSpec
from autocompress.tasks import validate_task, weights_hash
from autocompress.tasks.data import deployable


def _lower_and_score(task, tmp_path, precisions=None):
    """The teacher lowered by the project's ORT backend with the task's io, scored on the eval split."""
    teacher = task.teacher()
    backend = OnnxRuntimeBackend(threads=1)
    try:
        art = backend.lower(
            deployable(teacher, task.io),
            task.example_inputs(),
            precisions or {},
            tmp_path / "art",
            calibration=task.calibration_inputs() if precisions else None,
            io=task.io,
        )
        ref = None
        if task.metric_obj.needs_reference:
            with torch.no_grad():
                ref = [deployable(teacher, task.io)(*x).numpy() for x, _ in task.eval_split.batches()]
        return art, backend.evaluate(art, task.eval_split.batches(), task.metric_obj, ref)
    finally:
        backend.close()


def test_bert_encoder_tiny_checkpoint_loads_validates_lowers_and_scores(tmp_path):
    pytest.importorskip("transformers")
    from autocompress.examples.bert_encoder import bert_encoder

    opts = dict(layers=2, hidden=32, heads=4, intermediate=64, vocab_size=2000, seq_len=16)
    opts |= dict(train_samples=16, eval_samples=16, batch_size=8, checkpoint=str(tmp_path / "ckpt"))
    task = validate_task(bert_encoder(**opts), "task")
    assert (tmp_path / "ckpt" / "config.json").exists()
    assert task.io.input_names == ("input_ids", "attention_mask", "token_type_ids") and task.io.keyword
    assert task.io.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    x = task.example_inputs()
    assert all(t.dtype == torch.int64 and t.shape == (1, 16) for t in x)
    # a second factory call loads the same checkpoint from the folder (same weights)
    again = bert_encoder(**opts)
    assert weights_hash(again.teacher()) == weights_hash(task.teacher())
    art, fid = _lower_and_score(task, tmp_path)
    assert fid == pytest.approx(1.0, abs=1e-4)  # the float artifact is the teacher
    linear = LoweringSpec(  # dynamic int8 Linear, as the study searches
        {
            n: LayerLowering(8, "dynamic")
            for n, m in task.teacher().named_modules()
            if isinstance(m, torch.nn.Linear)
        }
    )
    art8, fid8 = _lower_and_score(task, tmp_path / "q", linear)
    assert 0.9 < fid8 < 1.0  # int8 weights (the tiny float embedding table dominates the file size)
    assert art8.meta["weights_stored_bytes"] < art.meta["weights_stored_bytes"]
    # static int8: the additive attention mask ([-inf, 0] when calibrated) is never quantized and ORT's
    # scale of it (inf / inf, computed though unused) raises no numpy warning
    static = LoweringSpec({n: LayerLowering(8, "static") for n in linear.layers})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        art_s, fid_s = _lower_and_score(task, tmp_path / "s", static)
    assert 0.9 < fid_s < 1.0
    qdq_inputs = {n.input[0] for n in onnx.load(str(art_s.path)).graph.node if n.op_type == "QuantizeLinear"}
    assert qdq_inputs and not any("Where" in t or "attention/self/Add" in t for t in qdq_inputs), qdq_inputs
    # the folder holds another model's config: refused, naming the option
    with pytest.raises(ConfigError, match=r"task.options.checkpoint: .*hidden_size 32 \(options ask 64\)"):
        bert_encoder(**(opts | {"hidden": 64}))


def test_bert_encoder_is_made_and_loaded_with_the_network_cut(tmp_path, monkeypatch):
    """Nothing downloads: with every socket connection refused, a new checkpoint is written from its
    config and loaded from the folder; a hub model id is refused as a non-folder, never fetched."""
    pytest.importorskip("transformers")
    import socket

    from autocompress.examples.bert_encoder import bert_encoder, load_encoder

    tried: list = []
    before = os.environ.get("HF_HUB_OFFLINE")

    def refuse(*args, **kwargs):
        tried.append(args)
        raise OSError("network access in a test that must run offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    opts = dict(layers=1, hidden=16, heads=2, intermediate=32, vocab_size=2000, seq_len=8)
    opts |= dict(train_samples=4, eval_samples=4, batch_size=4, checkpoint=str(tmp_path / "ckpt"))
    task = bert_encoder(**opts)
    with torch.no_grad():
        out = deployable(task.teacher(), task.io)(*task.example_inputs())
    assert out.shape == (1, 8, 16) and bool(torch.isfinite(out).all())
    with pytest.raises(ConfigError, match="bert-base-uncased is not a save_pretrained folder"):
        load_encoder("bert-base-uncased")
    assert tried == []  # not one connection was attempted
    assert os.environ.get("HF_HUB_OFFLINE") == before  # restored after loading


def test_resnet18_tiny_checkpoint_loads_validates_lowers_and_scores(tmp_path):
    from autocompress.examples.resnet18 import resnet18_task

    ckpt = tmp_path / "resnet.safetensors"
    opts = dict(checkpoint=str(ckpt), image_size=32, width=8, epochs=2, batch_size=32, samples=300)
    task = validate_task(resnet18_task(**opts), "task")
    assert ckpt.exists()
    model = task.teacher()
    names = {n for n, _ in model.named_children()}
    stem = {"conv1", "bn1", "relu", "maxpool", "avgpool", "fc"}
    assert names == stem | {f"layer{i}" for i in range(1, 5)}
    assert type(model.layer2[0]).__name__ == "BasicBlock" and model.layer2[0].downsample is not None
    assert task.example_inputs()[0].shape == (1, 3, 32, 32)
    again = resnet18_task(**opts)  # loaded from the checkpoint, not trained again
    assert weights_hash(again.teacher()) == weights_hash(model)
    _, acc = _lower_and_score(task, tmp_path)
    with torch.no_grad():
        logits = torch.cat([model(*x) for x, _ in task.eval_split.batches()])
    labels = torch.cat([y for _, y in task.eval_split.batches()])
    assert acc == pytest.approx(float((logits.argmax(1) == labels).float().mean()), abs=0.01)
    assert np.isfinite(acc) and len(labels) == 60


def test_tiny_bert_study_runs_from_python_and_times_the_teacher_apart(tmp_path):
    """A whole (one-trial) study on the tiny encoder through run_study(task=...). The baseline's
    evaluation time no longer includes the teacher's reference outputs (computed once per run): they
    are recorded as ``teacher_evaluate``, so the per-trial estimate does not count them every trial."""
    pytest.importorskip("transformers")
    import json

    import yaml
    from conftest import ROOT
    from reliability_helpers import QUICK_TIMING

    import autocompress
    from autocompress.examples.bert_encoder import bert_encoder

    task = bert_encoder(
        checkpoint=str(tmp_path / "ckpt"), layers=2, hidden=32, heads=4, intermediate=64,
        vocab_size=2000, seq_len=16, train_samples=16, eval_samples=16, batch_size=8,
    )  # fmt: skip
    study = {
        "name": "tiny_bert",
        "task": {},
        "space": {"file": str(ROOT / "autocompress/search_spaces/int8_linear.yaml"), "overrides": {"groups": "global"}},
        "finetune": {"steps": 0, "threads": 1},
        "backend": {"options": {"timing": dict(QUICK_TIMING)}},
        "trials": {"n": 1, "warm_start": [{"bits": 8}], "eval_samples": 8, "keep": "pareto"},
        "budgets": {"max_metric_drop": 0.05},
        "output": str(tmp_path / "run"),
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    with warnings.catch_warnings():  # the layer map leaves room for BERT's long layer names
        warnings.filterwarnings("error", "Tight layout not applied", UserWarning)
        summary = autocompress.run_study(
            autocompress.load_config(tmp_path / "s.yaml"), task=task, log=lambda s: None
        )
    assert summary.completed == 1
    base = json.loads((tmp_path / "run" / "baseline" / "metrics.json").read_text())
    assert base["seconds"]["teacher_evaluate"] > 0 and base["metric"] == pytest.approx(1.0, abs=1e-4)
    (t,) = summary.study.best_trials
    assert t.user_attrs["metric_name"] == "fidelity" and 0.9 < t.user_attrs["metric"] <= 1.0
    # re-scored on all 16 eval samples (in the study: a finished trial's attrs are read-only in SQLite)
    full = summary.study.user_attrs["metric_full"][str(t.number)]
    assert 0.9 < full["metric"] <= 1.0


def test_mobilenet_v2_tiny_checkpoint_has_torchvision_names_lowers_and_scores(tmp_path):
    from autocompress.examples.mobilenet_v2 import InvertedResidual, mobilenet_v2_task

    ckpt = tmp_path / "mnv2.safetensors"
    opts = dict(checkpoint=str(ckpt), image_size=32, width_mult=0.25, epochs=1, batch_size=32, samples=200)
    task = validate_task(mobilenet_v2_task(**opts), "task")
    model = task.teacher()
    assert len(model.features) == 19 and isinstance(model.features[1], InvertedResidual)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert convs["features.1.conv.0.0"].groups == convs["features.1.conv.0.0"].in_channels  # depthwise
    assert convs["features.2.conv.0.0"].kernel_size == (1, 1)  # expand
    assert convs["features.2.conv.1.0"].groups == 6 * 8  # depthwise over 6x the 8 input channels
    assert model.features[3].use_res_connect and not model.features[2].use_res_connect
    assert model.classifier[1].in_features == 1280  # width_mult < 1 keeps 1280 features
    again = mobilenet_v2_task(**opts)
    assert weights_hash(again.teacher()) == weights_hash(model)
    _, acc = _lower_and_score(task, tmp_path)
    assert 0.0 <= acc <= 1.0
    with pytest.raises(ConfigError, match="task.options.checkpoint: .*the options ask"):
        mobilenet_v2_task(**(opts | {"width_mult": 0.5}))


def test_hub_offline_reaches_an_imported_huggingface_hub_and_is_restored():
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: setting the environment alone would not
    switch off a hub already imported; the built-in tasks' loaders switch off both."""
    constants = pytest.importorskip("huggingface_hub.constants")
    from autocompress.examples._offline import hub_offline

    before, env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    with hub_offline():
        assert constants.is_offline_mode() and os.environ["HF_HUB_OFFLINE"] == "1"
    assert constants.HF_HUB_OFFLINE is before and os.environ.get("HF_HUB_OFFLINE") == env
