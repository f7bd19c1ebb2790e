"""The Task: what a user hands over (a model, data, an adapter, a metric), validated before a search."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..metrics import BUILTIN as METRICS  # noqa: F401 - re-exported by autocompress.tasks
from ..metrics import Metric, resolve_metric
from .data import Inputs, IOSpec, Split, takes_one_dict

LOSSES = ("auto", "ce_kd", "mse", "cosine")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` [N, C] against integer ``labels`` [N]."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())


@dataclass(eq=False)
class Task:
    """Everything a study needs to know about the model to compress.

    Give either ``model`` (a trained module, or a callable that loads one: used as the teacher as it
    is, never retrained) or ``model_fn`` (a fresh model the run trains once: the built-in tasks).

    Attributes:
        name: short name used in run folders and reports.
        model: the trained teacher (an ``nn.Module`` or a zero-argument loader returning one).
        model_fn: returns a fresh, untrained model (trained once per run with cross-entropy).
        train: fine-tuning data (also teacher training for ``model_fn`` and calibration by default):
            ``(inputs, labels)`` tensors, a DataLoader, a list of batches, or a Dataset (+ batch_size).
        eval: the data every artifact's metric is measured on (``test`` is the same field).
        calibration: data for activation ranges (default: ``train``); the first
            ``calibration_samples`` samples are used.
        inputs: batch -> model inputs (a tensor, a tuple, or a dict of named tensors). Default: a
            tensor batch is the input, a ``(x, y)`` batch gives ``x``, a dict batch gives its keys but
            ``label(s)`` / ``target(s)``.
        targets: batch -> targets (None for metrics that compare to the teacher).
        output: which tensor of the output is scored and distilled (see :class:`IOSpec`): e.g. a key of
            a dict output, or ``"mean_pooling"`` for a Hugging Face encoder whose sentence embedding is
            its token embeddings averaged over the attention mask. A model whose forward takes one dict
            of inputs (a ``SentenceTransformer``) is called that way; its ``sentence_embedding`` is
            the default output.
        metric: a built-in name (accuracy, top5, f1, mse, mae, fidelity), a :class:`~autocompress.metrics.Metric`
            or a callable ``fn(outputs, targets) -> float`` (higher is better).
        loss: fine-tuning loss: ``auto`` (CE + logit KD when the metric needs class targets, cosine to
            the teacher for the fidelity metric, else MSE
            to the teacher), ``ce_kd``, ``mse``, ``cosine``, or ``fn(student_out, teacher_out,
            targets) -> loss``.
        dynamic_axes: input name -> {axis: name} exported dynamic (default: batch; and the sequence
            axis of 2-D integer inputs).
        teacher_epochs / lr / batch_size: how a ``model_fn`` teacher is trained; ``batch_size`` also
            batches tensor and Dataset splits.
    """

    name: str
    model_fn: Callable[[], nn.Module] | None = None
    train: Any = None
    test: Any = None
    metric: str | Metric | Callable = "accuracy"
    teacher_epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    description: str = ""
    extra: dict = field(default_factory=dict)
    model: nn.Module | Callable[[], nn.Module] | None = None
    eval: Any = None
    calibration: Any = None
    inputs: Callable[[Any], Any] | None = None
    targets: Callable[[Any], Any] | None = None
    output: int | str | Callable | None = None
    loss: str | Callable = "auto"
    dynamic_axes: dict[str, dict[int, str]] | None = None
    calibration_samples: int = 256

    def __post_init__(self):
        if self.eval is None:
            self.eval = self.test
        elif self.test is None:
            self.test = self.eval

    # -- data ----------------------------------------------------------------------------------------
    def _split(self, which: str, source: Any, batch_size: int | None = None) -> Split:
        return Split(
            source,
            name=which,
            inputs=self.inputs,
            targets=self.targets,
            batch_size=batch_size or self.batch_size,
        )

    @functools.cached_property
    def train_split(self) -> Split:
        return self._split("train", self.train)

    @functools.cached_property
    def eval_split(self) -> Split:
        return self._split("eval", self.eval, 256 if _is_tensors(self.eval) else None)

    @functools.cached_property
    def calibration_split(self) -> Split:
        return (
            self._split("calibration", self.calibration) if self.calibration is not None else self.train_split
        )

    @functools.cached_property
    def io(self) -> IOSpec:
        """Input names, calling convention and output selector, read from the first eval batch."""
        raw = next(iter(self.eval_split.raw_batches()), None)
        if raw is None:
            raise ConfigError("task.eval yielded no batch")
        names, keyword, tensors, _ = self.eval_split.adapt(raw)
        axes = {}
        for n, t in zip(names, tensors, strict=True):
            given = (self.dynamic_axes or {}).get(n)
            if given is not None:
                axes[n] = {int(k): str(v) for k, v in given.items()}
            elif t.dim() == 2 and not t.is_floating_point():
                axes[n] = {0: "batch", 1: "sequence"}  # token ids, masks: any sequence length
            else:
                axes[n] = {0: "batch"}
        packed = keyword and self._forward_takes_one_dict(names)
        return IOSpec(names, keyword, self.output, axes, packed=packed)

    def _forward_takes_one_dict(self, names: tuple[str, ...]) -> bool:
        """Whether the model's forward takes ONE dict of the named inputs (a sentence-transformers
        model) rather than keyword arguments; read from the trained model's signature (a ``model_fn``
        model is built once to read it)."""
        model = self.model if isinstance(self.model, nn.Module) or self.model is None else self.teacher()
        if model is None:
            model = self.model_fn() if self.model_fn is not None else None
        return model is not None and takes_one_dict(model, names)

    @property
    def metric_obj(self) -> Metric:
        return resolve_metric(self.metric)

    @property
    def pretrained(self) -> bool:
        return self.model is not None

    def example_inputs(self, batch: int = 1) -> Inputs:
        """Inputs of the deployed shape (batch first), taken from the eval split."""
        tensors, _ = self.eval_split.first(batch)
        return tuple(t.contiguous() for t in tensors)

    def calibration_inputs(self, n: int | None = None) -> tuple[np.ndarray, ...]:
        """The first ``n`` (default ``calibration_samples``) calibration samples, one array per input."""
        tensors, _ = self.calibration_split.first(n or self.calibration_samples)
        return tuple(t.numpy() for t in tensors)

    def call(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        """The selected output of ``model`` on ``inputs``."""
        return self.io.call(model, inputs)

    def teacher(self) -> nn.Module:
        """The user's trained model (loaded if ``model`` is a loader), in eval mode."""
        model = self.model
        if not isinstance(model, nn.Module):
            model = model()
            if not isinstance(model, nn.Module):
                raise ConfigError(f"task.model loader returned {type(model).__name__}, not an nn.Module")
            self.model = model
        return model.eval()

    def loss_kind(self) -> str | Callable:
        """The fine-tuning loss: the task's, or for ``auto`` CE + logit KD when the metric scores
        classes (accuracy, top-k, F1) or a ``model_fn`` task trains on class labels, the cosine to the
        teacher's outputs when the metric is fidelity (embeddings: the loss is what is scored), else MSE
        to the teacher's outputs."""
        if callable(self.loss) or self.loss != "auto":
            return self.loss
        m = self.metric_obj
        classes = m.kind in ("accuracy", "topk", "f1") or (m.kind == "callable" and self.model_fn is not None)
        return "ce_kd" if classes else "cosine" if m.kind == "fidelity" else "mse"

    def score(self, logits: np.ndarray, labels: np.ndarray) -> float:
        """The metric over whole arrays (kept for callers that hold outputs in memory)."""
        m = self.metric_obj
        state = m.start()
        m.update(state, logits, labels)
        return m.result(state)


def _is_tensors(source: Any) -> bool:
    return isinstance(source, torch.Tensor) or (
        isinstance(source, tuple) and len(source) == 2 and all(isinstance(t, torch.Tensor) for t in source)
    )


def weights_hash(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes and bytes), sorted by name."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def validate_task(task: object, where: str) -> Task:
    """Check that a task is usable before anything is written; raise ConfigError naming ``where``.

    Checks: a model (trained, or a factory), a known metric and loss, data that yields batches
    whose inputs match the first eval batch's names and fixed axes, a model that runs on them and
    gives a tensor output, and a metric that returns a number on it.
    """
    if not isinstance(task, Task):
        raise ConfigError(
            f"task factory returned {type(task).__name__}, expected autocompress.Task", field=where
        )
    if (task.model is None) == (task.model_fn is None):
        raise ConfigError(
            "give exactly one of model (a trained module) and model_fn (trained here)", field=where
        )
    try:
        metric = task.metric_obj
    except ConfigError as exc:
        raise ConfigError(exc.rule, field=f"{where}.metric") from None
    if not callable(task.loss) and task.loss not in LOSSES:
        raise ConfigError(
            f"unknown loss {task.loss!r}; known: {', '.join(LOSSES)} or a callable", field=f"{where}.loss"
        )
    if task.eval is None:
        raise ConfigError("the task has no eval data", field=f"{where}.eval")
    if task.train is None:
        raise ConfigError(
            "the task has no train data (fine-tuning and calibration use it)", field=f"{where}.train"
        )
    try:
        splits = [task.train_split, task.eval_split, task.calibration_split]
        io = task.io
        example = task.example_inputs(2)
        for split in splits:
            _check_split(split, io, example)
    except ConfigError as exc:
        raise ConfigError(exc.rule, field=where) from None
    except Exception as exc:  # the user's adapter or loader
        raise ConfigError(
            f"reading the task's data failed: {type(exc).__name__}: {_one_line(exc)}", field=where
        ) from exc
    model = _model(task, where)
    empty = [
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.numel() == 0
    ]
    if empty:  # e.g. a width of 0 in the model's options: nothing to compress, nothing to measure
        raise ConfigError(
            f"layer {empty[0]!r} of the model has no weights (a width of 0)", field=f"{where}.model"
        )
    try:
        with torch.no_grad():
            out = task.call(model, example)
    except ConfigError as exc:
        raise ConfigError(exc.rule, field=f"{where}.output") from None
    except Exception as exc:  # the user's code: report it, do not crash
        raise ConfigError(
            f"task model failed on the task's inputs: {type(exc).__name__}: {_one_line(exc)}", field=where
        ) from exc
    if out.shape[:1] != (len(example[0]),):
        raise ConfigError(
            f"task model output {tuple(out.shape)} has no batch axis of {len(example[0])}", field=where
        )
    _check_metric(task, metric, out, where)
    return task


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


def _model(task: Task, where: str) -> nn.Module:
    try:
        return task.teacher() if task.pretrained else task.model_fn().eval()
    except ConfigError as exc:
        raise ConfigError(exc.rule, field=f"{where}.model") from None
    except Exception as exc:
        what = "model" if task.pretrained else "model_fn"
        raise ConfigError(
            f"loading the model failed: {type(exc).__name__}: {_one_line(exc)}", field=f"{where}.{what}"
        ) from exc


def _check_split(split: Split, io: IOSpec, example: Inputs) -> None:
    """The first two batches of ``split`` have the eval inputs' names and their fixed axes."""
    seen = 0
    for raw in split.raw_batches():
        names, _, tensors, _ = split.adapt(raw)
        if names != io.input_names:
            raise ConfigError(
                f"task.{split.name}: batch inputs {list(names)} differ from the eval inputs {list(io.input_names)}"
            )
        for n, t, ref in zip(names, tensors, example, strict=True):
            dynamic = set(io.dynamic_axes.get(n, {0: "batch"}))
            fixed = [
                (i, a, b)
                for i, (a, b) in enumerate(zip(t.shape, ref.shape, strict=False))
                if i not in dynamic and a != b
            ]
            if t.dim() != ref.dim() or fixed:
                raise ConfigError(
                    f"task.{split.name}: input {n!r} has shape {tuple(t.shape)}, the example inputs "
                    f"{tuple(ref.shape)} (only axes {sorted(dynamic)} may differ)"
                )
        seen += 1
        if seen == 2:
            break
    if seen == 0:
        raise ConfigError(f"task.{split.name} yielded no batch")


def _check_metric(task: Task, metric: Metric, out: torch.Tensor, where: str) -> None:
    _, targets = task.eval_split.first(len(out))
    if metric.needs_targets and targets is None:
        raise ConfigError(
            f"metric {metric.name!r} needs targets; the task's batches have none", field=f"{where}.targets"
        )
    if metric.kind in ("accuracy", "topk", "f1") and targets is not None:
        labels = [targets] + [t for t in (task.train_split.tensors or (None, None))[1:] if t is not None]
        labels.append(task.eval_split.first(256)[1])
        labels.append(task.train_split.first(2)[1])
        for t in labels:
            if t is not None and t.dim() != 1:  # [N, 1] == [N] broadcasts: a silently wrong accuracy
                raise ConfigError(
                    f"labels of shape {tuple(t.shape)}: metric {metric.name!r} and the classification loss "
                    "need one class index per sample, shape [batch] (e.g. a targets adapter that squeezes them)",
                    field=f"{where}.targets",
                )
        n_classes = int(max(int(t.max()) for t in labels if t is not None)) + 1
        if out.dim() != 2 or out.shape[1] < n_classes:
            raise ConfigError(
                f"task model output {tuple(out.shape)} does not match the data: expected logits [batch, >= {n_classes} classes]",
                field=where,
            )
    try:
        state = metric.start()
        metric.update(
            state, out.float().numpy(), None if targets is None else targets.numpy(), out.float().numpy()
        )
        metric.result(state)
    except ConfigError as exc:
        raise ConfigError(exc.rule, field=f"{where}.metric") from None
    except Exception as exc:
        raise ConfigError(
            f"metric {metric.name!r} raised {type(exc).__name__}: {_one_line(exc)}", field=f"{where}.metric"
        ) from exc
