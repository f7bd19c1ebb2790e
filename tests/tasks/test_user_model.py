"""A user's own model: a trained module, DataLoaders / datasets / lists of batches, dict inputs, tuple and
ModelOutput outputs, metrics with a direction, and the errors for bad input (issue "Your own model")."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from reliability_helpers import study_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autocompress
from autocompress import ConfigError, Task, metrics
from autocompress.backends import BACKENDS
from autocompress.config import load_config
from autocompress.tasks import deployable, validate_task
from autocompress.tasks.data import Split


# -- a user's models --------------------------------------------------------------------------------
class TinyText(nn.Module):
    """Token ids + attention mask in, a dict out (like a Hugging Face encoder): hidden states, pooled."""

    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        h = torch.relu(self.proj(self.emb(input_ids)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = self.head((h * m).sum(1) / m.sum(1).clamp(min=1))
        return {"last_hidden_state": h, "pooled": pooled}


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc(x)
        return y, y.sum(1)


def _text_batches(n_batches: int = 4, batch: int = 8, seq: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, 50, (batch, seq), generator=g)
        lengths = torch.randint(3, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def _trained_mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(160, 8)
    y = (x[:, 0] + x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()
    flip = torch.rand(160, generator=torch.Generator().manual_seed(1)) < 0.15
    y = torch.where(flip, (y + 1) % 4, y)  # label noise: no model scores 1.0
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, y


# -- data as users have it -----------------------------------------------------------------------
def test_dataloader_dataset_and_list_give_the_batches_of_tensors():
    _, x, y = _trained_mlp()
    tensors = Split((x, y), name="eval", batch_size=32)
    loader = Split(DataLoader(TensorDataset(x, y), batch_size=32), name="eval")
    dataset = Split(TensorDataset(x, y), name="eval", batch_size=32)
    listed = Split([(x[i : i + 32], y[i : i + 32]) for i in range(0, 160, 32)], name="eval")
    ref = list(tensors.batches())
    for split in (loader, dataset, listed):
        got = list(split.batches())
        assert len(got) == len(ref) == 5
        for (gi, gt), (ri, rt) in zip(got, ref, strict=True):
            assert torch.equal(gi[0], ri[0]) and torch.equal(gt, rt)
    # a subset stops after exactly n samples, cutting the last batch
    assert [len(b[0][0]) for b in loader.batches(limit=70)] == [32, 32, 6]
    inputs, targets = loader.first(40)
    assert torch.equal(inputs[0], x[:40]) and torch.equal(targets, y[:40])


def test_artifact_metric_is_the_same_for_every_data_form(tmp_path):
    model, x, y = _trained_mlp()
    backend = BACKENDS.get("onnxruntime")("cpu", isolate=False)
    art = backend.lower(model, (x[:1],), {}, tmp_path)
    forms = [
        (x, y),
        DataLoader(TensorDataset(x, y), batch_size=16),
        TensorDataset(x, y),
        [(x[i : i + 50], y[i : i + 50]) for i in range(0, 160, 50)],
    ]
    scores = []
    for form in forms:
        task = validate_task(Task(name="m", model=model, train=form, eval=form, batch_size=16), "task")
        scores.append(backend.evaluate(art, task.eval_split.batches(), task.metric_obj))
    direct = float((model(x).argmax(1) == y).float().mean())
    assert scores == pytest.approx([direct] * 4, abs=1e-6)
    assert 0.6 < direct < 1.0  # a real classifier: the comparison means something


# -- inputs and outputs as models have them ------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["onnxruntime", "torch"])
def test_dict_inputs_and_dict_output_lower_and_evaluate(tmp_path, backend_name):
    torch.manual_seed(0)
    model = TinyText().eval()
    data = _text_batches()
    task = validate_task(
        Task(name="text", model=model, train=data, eval=data, output="pooled", metric="fidelity"), "task"
    )
    assert task.io.input_names == ("input_ids", "attention_mask") and task.io.keyword
    assert task.io.dynamic_axes["input_ids"] == {0: "batch", 1: "sequence"}
    backend = BACKENDS.get(backend_name)("cpu", isolate=False)
    art = backend.lower(deployable(model, task.io), task.example_inputs(), {}, tmp_path, io=task.io)
    with torch.no_grad():
        ref = [
            model(**dict(zip(task.io.input_names, i, strict=True)))["pooled"].numpy()
            for i, _ in task.eval_split.batches()
        ]
    fid = backend.evaluate(art, task.eval_split.batches(), metrics.fidelity, ref)
    assert fid == pytest.approx(1.0, abs=1e-5)
    # a perturbed reference lowers the fidelity: the metric looks at the outputs
    noisy = [r + np.random.default_rng(0).normal(0, 1.0, r.shape).astype(np.float32) for r in ref]
    assert backend.evaluate(art, task.eval_split.batches(), metrics.fidelity, noisy) < 0.95
    if backend_name == "onnxruntime":  # another batch size and sequence length run in the same artifact
        sess = ort.InferenceSession(str(art.path))
        assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
        ids = torch.randint(1, 50, (3, 20))
        out = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((3, 20), np.int64)})[0]
        with torch.no_grad():
            want = model(ids, torch.ones(3, 20, dtype=torch.long))["pooled"].numpy()
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend_name", ["onnxruntime", "torch"])
def test_tuple_and_model_output_outputs_are_selected(tmp_path, backend_name):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    x = torch.randn(12, 8)
    backend = BACKENDS.get(backend_name)("cpu", isolate=False)
    tup = TupleOut().eval()
    task = validate_task(Task(name="t", model=tup, train=x, eval=x, output=1, metric="fidelity"), "task")
    art = backend.lower(deployable(tup, task.io), task.example_inputs(), {}, tmp_path / "t", io=task.io)
    got = backend.runner(art)((x.numpy(),))
    np.testing.assert_allclose(got, tup(x)[1].detach().numpy(), rtol=1e-5, atol=1e-5)

    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    ).eval()
    data = _text_batches(2, 4, 10)
    task = validate_task(Task(name="b", model=bert, train=data, eval=data, metric="fidelity"), "task")
    art = backend.lower(deployable(bert, task.io), task.example_inputs(), {}, tmp_path / "b", io=task.io)
    inputs = next(task.eval_split.batches())[0]
    with torch.no_grad():  # no selector: a ModelOutput's last_hidden_state
        want = bert(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state.numpy()
    np.testing.assert_allclose(
        backend.runner(art)(tuple(t.numpy() for t in inputs)), want, rtol=1e-3, atol=1e-4
    )


# -- metrics --------------------------------------------------------------------------------------
def test_builtin_metrics_accumulate_over_batches():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    out = rng.normal(size=(100, 5)).astype(np.float32)
    y = rng.integers(0, 5, 100)

    def run(metric, outputs, targets, ref=None):
        state = metric.start()
        for i in range(0, 100, 30):
            metric.update(
                state,
                outputs[i : i + 30],
                None if targets is None else targets[i : i + 30],
                None if ref is None else ref[i : i + 30],
            )
        return metric.result(state)

    assert run(metrics.accuracy, out, y) == pytest.approx((out.argmax(1) == y).mean())
    assert run(metrics.f1, out, y) == pytest.approx(f1_score(y, out.argmax(1), average="macro"))
    top2 = np.argsort(-out, 1)[:, :2]
    assert run(metrics.top_k(2), out, y) == pytest.approx((top2 == y[:, None]).any(1).mean())
    t = rng.normal(size=(100, 5)).astype(np.float32)
    assert run(metrics.mse, out, t) == pytest.approx(((out - t) ** 2).mean(), rel=1e-6)
    assert run(metrics.fidelity, out, None, out) == pytest.approx(1.0)
    assert run(metrics.fidelity, out, None, -out) == pytest.approx(-1.0)
    assert not metrics.mse.higher_is_better and metrics.fidelity.higher_is_better


# -- bad input: one clear line, before the search -----------------------------------------------------
def _ok(**changes) -> Task:
    model, x, y = _trained_mlp()
    base = {"name": "u", "model": model, "train": DataLoader(TensorDataset(x, y), batch_size=16)}
    base["eval"] = base["train"]
    base.update(changes)
    return Task(**base)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"metric": lambda o, t: "high"}, r"task.metric: metric '<lambda>' returned str, expected a number"),
        ({"metric": lambda o, t: 1 / 0}, r"task.metric: metric '<lambda>' raised ZeroDivisionError"),
        ({"metric": "acuracy"}, r"task.metric: unknown metric 'acuracy'"),
        ({"inputs": lambda b: "text"}, r"task.inputs: the adapter returned str; expected a tensor"),
        (
            {"eval": DataLoader(TensorDataset(torch.empty(0, 8), torch.empty(0)), batch_size=4)},
            r"task.eval yielded no batch",
        ),
        ({"train": iter([(torch.zeros(2, 8), torch.zeros(2))])}, r"task.train is an iterator"),
        (
            {"train": [(torch.zeros(4, 9), torch.zeros(4, dtype=torch.long))]},
            r"task.train: input 'input' has shape \(4, 9\), the example inputs \(2, 8\)",
        ),
        ({"model": nn.Linear(3, 2)}, r"task: task model failed on the task's inputs: RuntimeError"),
        (
            {"output": "logits"},
            r"task.output: 'logits' selects from a tuple or a mapping, but the model returns a tensor",
        ),
        ({"loss": "hinge"}, r"task.loss: unknown loss 'hinge'"),
        ({"model_fn": lambda: nn.Linear(8, 4)}, r"give exactly one of model"),
    ],
)
def test_bad_task_is_refused_with_the_field_and_rule(changes, match):
    with pytest.raises(ConfigError, match=match):
        validate_task(_ok(**changes), "task")


def test_checkpoint_that_does_not_match_the_model_is_refused():
    def loader():
        m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        m.load_state_dict({"0.weight": torch.zeros(16, 8)}, strict=False)
        return m

    with pytest.raises(
        ConfigError, match=r"task.model: loading the model failed: RuntimeError: .*size mismatch"
    ):
        validate_task(_ok(model=loader), "task")


# -- a study on a live Task from Python --------------------------------------------------------------
@pytest.mark.slow
def test_run_study_on_a_trained_module_uses_it_unchanged_and_refuses_another(tmp_path):
    model, x, y = _trained_mlp()
    before = copy.deepcopy(model.state_dict())
    lower_is_better = metrics.Metric(
        "error", fn=lambda o, t: float((o.argmax(1) != t).mean()), higher_is_better=False
    )
    task = Task(
        name="user",
        model=model,
        train=DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False),
        eval=[(x[i : i + 40], y[i : i + 40]) for i in range(0, 160, 40)],
        metric=lower_is_better,
        loss="ce_kd",
    )
    path, run = study_file(
        tmp_path,
        task={"name": None},
        trials={"n": 2, "warm_start": [{"bits": 8}], "eval_samples": 80},
        finetune={"epochs": 1, "threads": 1, "batch_size": 16},
        budgets={"max_metric_drop": 0.5},
    )
    summary = autocompress.run_study(load_config(path), task=task, log=lambda s: None)
    assert summary.completed == 2
    assert summary.study.directions[0].name == "MINIMIZE"
    for k, v in model.state_dict().items():  # the teacher is used as it is: never trained
        assert torch.equal(v, before[k]), k
    base = json.loads((run / "baseline" / "metrics.json").read_text())
    assert base["metric_name"] == "error" and base["eval_samples"] == 80
    assert base["metric"] == pytest.approx(float((model(x[:80]).argmax(1) != y[:80]).float().mean()))
    assert base["metric_full"] == pytest.approx(float((model(x).argmax(1) != y).float().mean()))
    sess = ort.InferenceSession(str(run / "baseline" / "model.onnx"))
    np.testing.assert_allclose(
        sess.run(None, {"input": x.numpy()})[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5
    )
    meta = json.loads((run / "teacher.json").read_text())
    assert meta["weights_sha256"] == autocompress.tasks.weights_hash(model)
    full = summary.study.user_attrs["metric_full"]
    front = json.loads((run / "pareto" / "front.json").read_text())["front"]
    assert front and {str(r["trial"]) for r in front} <= set(full)
    for r in front:
        assert r["metric_name"] == "error" and r["metric_full"] == full[str(r["trial"])]["metric"]

    other, _, _ = _trained_mlp(seed=1)
    with pytest.raises(
        ConfigError, match=r"output: run folder .* holds trials of a teacher with weights sha256"
    ):
        autocompress.run_study(
            load_config(path), task=dataclasses.replace(task, model=other), log=lambda s: None
        )


class _Unexportable(nn.Module):
    """Runs in torch, but ONNX has no symmetric eigen-decomposition: the export of the baseline fails."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) + torch.linalg.eigvalsh(x[:, :4, None] * x[:, None, :4])


def test_a_model_that_cannot_be_exported_is_refused_before_the_search(tmp_path):
    _, x, y = _trained_mlp()
    task = Task(name="u", model=_Unexportable().eval(), train=(x, y), eval=(x, y))
    path, run = study_file(tmp_path, task={"name": None}, trials={"n": 1})
    with pytest.raises(ConfigError, match=r"task: the baseline \(uncompressed model\) failed: .*export"):
        autocompress.run_study(load_config(path), task=task, log=lambda s: None)
    assert not (run / "trials").exists() or not any((run / "trials").iterdir())
