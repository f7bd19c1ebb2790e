"""A user's model goes in as the user holds it: a sentence-transformers model (its forward takes one dict
and returns a dict), a Hugging Face encoder with masked mean pooling, and layers the scored output never
uses (a BERT's pooler) left out of the inventory."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from reliability_helpers import ROOT, study_file

import autocompress
from autocompress import ConfigError, Task
from autocompress.backends.onnx_export import export_onnx
from autocompress.config import load_config
from autocompress.inventory import build_inventory, unused_lines
from autocompress.tasks import deployable, mean_pooling, validate_task

transformers = pytest.importorskip("transformers")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]


def _bert_config():
    return transformers.BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )


def _batches(n: int = 4, batch: int = 8, seq: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, len(VOCAB), (batch, seq), generator=g)
        lengths = torch.randint(3, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def sentence_model(tmp_path_factory):
    """A tiny SentenceTransformer built offline: a config-initialized BertModel saved to a folder (with
    a word-piece vocabulary) + mean pooling, as ``SentenceTransformer(modules=[...])`` assembles it."""
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # before sentence-transformers 6
        from sentence_transformers.models import Pooling, Transformer

    folder = tmp_path_factory.mktemp("tiny-st")
    torch.manual_seed(0)
    transformers.BertModel(_bert_config()).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB))
    encoder = Transformer(str(folder), max_seq_length=16)
    return st.SentenceTransformer(modules=[encoder, Pooling(32)], device="cpu").eval()


def _reference(model, batch: dict) -> np.ndarray:
    with torch.no_grad():
        return model(dict(batch))["sentence_embedding"].numpy()


def test_a_sentence_transformer_is_called_with_one_dict_and_exports(sentence_model, tmp_path):
    data = _batches()
    task = validate_task(
        Task(name="st", model=sentence_model, train=data, eval=data, metric="fidelity"), "task"
    )
    assert task.io.packed and task.io.input_names == ("input_ids", "attention_mask")
    x = task.example_inputs(4)
    with torch.no_grad():  # the default output of a sentence-transformers dict: its sentence embedding
        got = deployable(sentence_model, task.io)(*x).numpy()
    want = _reference(sentence_model, {"input_ids": x[0], "attention_mask": x[1]})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    path = tmp_path / "st.onnx"
    export_onnx(deployable(sentence_model, task.io), task.example_inputs(), path, io=task.io)
    sess = ort.InferenceSession(str(path))
    longer = _batches(1, 3, 20, seed=1)[0]  # another batch size and sequence length
    out = sess.run(None, {k: v.numpy() for k, v in longer.items()})[0]
    np.testing.assert_allclose(out, _reference(sentence_model, longer), rtol=1e-4, atol=1e-5)
    # the BertModel's pooler feeds nothing the sentence embedding uses: not in the inventory, said once
    inv = build_inventory(sentence_model, task.example_inputs(), task.io)
    assert "0.model.pooler.dense" in inv.unused and "0.model.pooler.dense" not in {i.name for i in inv}
    assert len(inv) == 3 + 2 * 6  # word/position/type tables + 6 Linear layers per block
    assert unused_lines(inv) == [
        "inventory: left out 0.model.pooler.dense: the scored output does not depend on its weights "
        "(not in the exported graph)"
    ]


def test_a_hugging_face_encoder_with_mean_pooling_matches_its_sentence_transformer(sentence_model):
    bert = sentence_model[0].model  # the same weights, as a plain Hugging Face model
    data = _batches()
    task = validate_task(
        Task(name="hf", model=bert, train=data, eval=data, metric="fidelity", output="mean_pooling"), "task"
    )
    assert not task.io.packed and task.io.keyword
    x = task.example_inputs(8)
    with torch.no_grad():
        got = deployable(bert, task.io)(*x).numpy()
    np.testing.assert_allclose(got, _reference(sentence_model, data[0]), rtol=1e-5, atol=1e-6)
    inv = build_inventory(bert, task.example_inputs(), task.io)
    assert list(inv.unused) == ["pooler.dense"]
    pooled = validate_task(  # the pooler's output scored: then the pooler is in the inventory
        Task(name="hf", model=bert, train=data, eval=data, metric="fidelity", output="pooler_output"), "task"
    )
    assert "pooler.dense" in {i.name for i in build_inventory(bert, pooled.example_inputs(), pooled.io)}


def test_a_selector_may_read_the_inputs_and_mean_pooling_needs_a_mask():
    tokens = torch.arange(12.0).reshape(1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    np.testing.assert_allclose(mean_pooling(tokens, {"attention_mask": mask}), tokens[:, :2].mean(1))
    with pytest.raises(ConfigError, match=r"task.output: 'mean_pooling' needs an 'attention_mask' input"):
        mean_pooling(tokens, {"input_ids": mask})
    with pytest.raises(ConfigError, match=r"averages token embeddings .* the output is \(3, 4\)"):
        mean_pooling(tokens[0], {"attention_mask": mask})
    io = autocompress.tasks.IOSpec(
        ("x", "attention_mask"), keyword=True, output=lambda out, inputs: out * inputs["attention_mask"]
    )

    class Net(torch.nn.Module):
        def forward(self, x, attention_mask):
            return x + 1

    got = io.call(Net(), (torch.ones(2, 3), torch.tensor([[1, 0, 1], [0, 1, 1]])))
    np.testing.assert_allclose(got, [[2, 0, 2], [0, 2, 2]])


def test_a_study_runs_on_a_sentence_transformer_as_held(sentence_model, tmp_path):
    data = _batches()
    task = Task(name="st", model=sentence_model, train=data, eval=data, metric="fidelity")
    path, run = study_file(
        tmp_path,
        task={"name": None},
        space={"file": str(ROOT / "autocompress/search_spaces/int8_linear.yaml")},
        trials={"n": 1, "warm_start": [{"bits": 8}]},
        finetune={"epochs": 1, "threads": 1, "batch_size": 8},
        budgets={"max_metric_drop": 0.5},
    )
    lines: list[str] = []
    summary = autocompress.run_study(load_config(path), task=task, log=lines.append)
    assert summary.completed == 1
    assert sum("left out 0.model.pooler.dense" in line for line in lines) == 1
    cov = json.loads((run / "coverage.json").read_text())
    assert not any("pooler" in m for r in cov["untouched"] for m in r["modules"])
    assert cov["params_total"] == sum(p.numel() for p in sentence_model.parameters()) - 32 * 32 - 32
    front = json.loads((run / "pareto" / "front.json").read_text())["front"]
    assert front and front[0]["metric"] > 0.9
    sess = ort.InferenceSession(str(run / "baseline" / "model.onnx"))
    out = sess.run(None, {k: v.numpy() for k, v in data[0].items()})[0]
    np.testing.assert_allclose(out, _reference(sentence_model, data[0]), rtol=1e-4, atol=1e-5)


def test_a_layer_read_by_its_parent_stays_and_an_unused_branch_goes():
    class TwoHeads(torch.nn.Module):
        """``attn``'s out_proj is never called (nn.MultiheadAttention reads its weight) yet is used;
        ``aux`` is called, but only the first output is scored."""

        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            self.main = torch.nn.Linear(8, 3)
            self.aux = torch.nn.Linear(8, 5)

        def forward(self, x):
            h = self.attn(x, x, x, need_weights=False)[0].mean(1)
            return self.main(h), self.aux(h)

    inv = build_inventory(TwoHeads().eval(), (torch.randn(2, 4, 8),))
    assert [i.name for i in inv] == ["attn.out_proj", "main"] and list(inv.unused) == ["aux"]
    macs = {i.name: i.macs for i in inv}
    assert macs["main"] == 8 * 3 and macs["attn.out_proj"] == 0  # never called: no MACs seen, as before
