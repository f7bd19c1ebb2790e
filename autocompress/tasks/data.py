"""Data as users have it: batches from any re-iterable, adapted to the model's inputs and targets.

A split is a :class:`Split`: it iterates normalized batches ``(inputs, targets)`` where ``inputs`` is
a tuple of tensors in the model's input order (named by the task's :class:`IOSpec`) and ``targets`` a
tensor or None. It is built from

* ``(inputs, labels)`` tensors (the built-in tasks): batches of ``batch_size``, shuffled by a seeded
  generator for training;
* any re-iterable of batches: a ``torch.utils.data.DataLoader``, a list of batches;
* a map-style ``Dataset`` (``__getitem__`` + ``__len__``) plus a batch size.

Nothing is held in memory beyond one batch; ``take(n)`` stops after ``n`` samples (evaluation on a
subset, calibration on the first N samples).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

Inputs = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class IOSpec:
    """How the model is called and what of its output counts.

    Attributes:
        input_names: the model's inputs in call order (ONNX input names too).
        keyword: the model takes its inputs by name (``model(**inputs)``), else positionally.
        packed: the model's forward takes ONE dict of the named inputs (``model({"input_ids": ...,
            "attention_mask": ...})``: a ``sentence_transformers.SentenceTransformer``).
        output: which tensor of the output is scored and distilled: None (the tensor itself; the
            first of a tuple; ``logits`` / ``sentence_embedding`` / ``last_hidden_state`` / the first
            value of a dict or ``ModelOutput``), an index, a key, ``"mean_pooling"`` (the token
            embeddings averaged over the ``attention_mask`` input: :func:`mean_pooling`), or a callable
            on the output, or on the output and the named inputs (``fn(out, inputs)``).
        dynamic_axes: input name -> {axis: name} exported as dynamic (batch always; the sequence
            axis of integer token inputs by default).
    """

    input_names: tuple[str, ...]
    keyword: bool = False
    output: int | str | Callable[[Any], torch.Tensor] | None = None
    dynamic_axes: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    output_name: str = "output"
    packed: bool = False

    def call(self, model: nn.Module, inputs: Inputs) -> torch.Tensor:
        """The model's selected output tensor for positional ``inputs``."""
        return self.invoke(model, inputs)

    def invoke(self, fn: Callable, inputs: Inputs) -> torch.Tensor:
        """``fn`` (a model or its unbound forward with ``self`` bound) called the model's way on
        positional ``inputs``; the selected output."""
        named = dict(zip(self.input_names, inputs, strict=True))
        if self.packed:
            out = fn(dict(named))  # a fresh dict: sentence-transformers modules add their outputs to it
        elif self.keyword:
            out = fn(**named)
        else:
            out = fn(*inputs)
        return select_output(out, self.output, named)

    def onnx_axes(self) -> dict[str, dict[int, str]]:
        axes = {n: dict(self.dynamic_axes.get(n, {0: "batch"})) for n in self.input_names}
        axes[self.output_name] = {0: "batch"}
        return axes


MEAN_POOLING = "mean_pooling"
DEFAULT_KEYS = ("logits", "sentence_embedding", "last_hidden_state")


def select_output(
    out: Any, selector: int | str | Callable | None, inputs: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """The tensor of a model's output that is scored: see :attr:`IOSpec.output`.

    ``inputs``: the named inputs of the call (a two-argument selector and ``"mean_pooling"`` read them).
    """
    if selector == MEAN_POOLING and not (hasattr(out, "keys") and MEAN_POOLING in set(out.keys())):
        return mean_pooling(select_output(out, None), inputs)
    if callable(selector):
        out = selector(out, dict(inputs or {})) if _takes_inputs(selector) else selector(out)
    elif isinstance(out, torch.Tensor):
        if selector is not None:
            raise ConfigError(
                f"task.output: {selector!r} selects from a tuple or a mapping, but the model returns a tensor"
            )
    elif isinstance(out, Mapping) or hasattr(out, "keys"):  # dict, transformers ModelOutput
        keys = list(out.keys())
        if isinstance(selector, str):
            if selector not in keys:
                raise ConfigError(f"task.output: the model's output has no {selector!r} (it has {keys})")
            out = out[selector]
        elif isinstance(selector, int):
            out = out[keys[selector]]
        else:
            key = next((k for k in DEFAULT_KEYS if k in keys), keys[0] if keys else None)
            if key is None:
                raise ConfigError("task.output: the model returned an empty mapping")
            out = out[key]
    elif isinstance(out, tuple | list):
        if not out:
            raise ConfigError("task.output: the model returned an empty tuple")
        if isinstance(selector, str):
            raise ConfigError(f"task.output: {selector!r} names a key, but the model returns a tuple")
        out = out[selector or 0]
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"task.output: the selected output is a {type(out).__name__}, not a tensor")
    return out


def mean_pooling(tokens: torch.Tensor, inputs: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """Token embeddings ``[batch, sequence, hidden]`` averaged over the positions where the
    ``attention_mask`` input is 1 (what sentence encoders end with): ``[batch, hidden]``.

    Raises:
        ConfigError: the call has no ``attention_mask`` input, or ``tokens`` is not 3-D.
    """
    mask = (inputs or {}).get("attention_mask")
    if mask is None:
        raise ConfigError(
            f"task.output: {MEAN_POOLING!r} needs an 'attention_mask' input; the inputs are "
            f"{sorted(inputs or {})}"
        )
    if tokens.dim() != 3:
        raise ConfigError(
            f"task.output: {MEAN_POOLING!r} averages token embeddings [batch, sequence, hidden]; the "
            f"output is {tuple(tokens.shape)}"
        )
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _takes_inputs(fn: Callable) -> bool:
    """Whether a selector takes the named inputs as a second positional argument."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: one argument
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def takes_one_dict(model: nn.Module, names: tuple[str, ...]) -> bool:
    """Whether ``model.forward`` takes ONE dict of the named inputs (a sentence-transformers model):
    its only required positional parameter is not one of the input ``names``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    return len(required) == 1 and required[0].name not in names


def deployable(model: nn.Module, io: IOSpec) -> nn.Module:
    """``model`` as a module with positional tensor inputs and one tensor output (what backends lower).

    The result shares every parameter, buffer and submodule with ``model`` (so module names, and the
    ONNX initializer names derived from them, are unchanged): it is a shallow copy of ``model`` whose
    class is a subclass with ``forward(*inputs) -> selected output``.
    """
    cls = type(model)
    if getattr(cls, "_ac_io", None) is io:
        return model
    if hasattr(cls, "_ac_io"):  # already wrapped with another spec: wrap the original class
        cls = cls.__bases__[0]

    def forward(self, *inputs):
        return _call_as(cls, self, io, inputs)

    sub = type(
        f"Deployable{cls.__name__}", (cls,), {"forward": forward, "_ac_io": io, "__module__": cls.__module__}
    )
    wrapped = cls.__new__(sub)
    wrapped.__dict__ = dict(model.__dict__)
    return wrapped


def _call_as(cls: type, self: nn.Module, io: IOSpec, inputs: Inputs) -> torch.Tensor:
    return io.invoke(functools.partial(cls.forward, self), inputs)


# -- batches ------------------------------------------------------------------------------------------
def _default_inputs(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor | Mapping):
        if isinstance(batch, Mapping):
            return {k: v for k, v in batch.items() if k not in ("label", "labels", "target", "targets")}
        return batch
    if isinstance(batch, tuple | list) and len(batch) >= 1:
        return batch[0]
    raise ConfigError(
        f"task.inputs: cannot tell the inputs of a {type(batch).__name__} batch; give an adapter"
    )


def _default_targets(batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return next((batch[k] for k in ("labels", "label", "targets", "target") if k in batch), None)
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        return batch[1]
    return None


def normalize_inputs(raw: Any, where: str = "task.inputs") -> tuple[tuple[str, ...], bool, Inputs]:
    """(names, keyword, tensors) of what an adapter returned: a tensor, a tuple or a dict of tensors."""
    if isinstance(raw, torch.Tensor):
        return ("input",), False, (raw,)
    if isinstance(raw, Mapping):
        items = list(raw.items())
        names, keyword, tensors = tuple(str(k) for k, _ in items), True, tuple(v for _, v in items)
    elif isinstance(raw, tuple | list):
        tensors = tuple(raw)
        names, keyword = (
            (("input",) if len(tensors) == 1 else tuple(f"input_{i}" for i in range(len(tensors)))),
            False,
        )
    else:
        raise ConfigError(
            f"{where}: the adapter returned {type(raw).__name__}; expected a tensor, a tuple or a dict of tensors"
        )
    if not tensors:
        raise ConfigError(f"{where}: the adapter returned no input")
    bad = [n for n, t in zip(names, tensors, strict=True) if not isinstance(t, torch.Tensor)]
    if bad:
        raise ConfigError(
            f"{where}: input {bad[0]!r} is a {type(tensors[names.index(bad[0])]).__name__}, not a tensor"
        )
    return names, keyword, tensors


class Split:
    """A re-iterable of normalized batches ``(inputs, targets)``; see the module docstring."""

    def __init__(
        self,
        source: Any,
        *,
        name: str,
        inputs: Callable[[Any], Any] | None = None,
        targets: Callable[[Any], Any] | None = None,
        batch_size: int = 64,
    ):
        self.name = name
        self._inputs = inputs or _default_inputs
        self._targets = targets or _default_targets
        self.batch_size = batch_size
        self.tensors: tuple[torch.Tensor, torch.Tensor | None] | None = None
        if (
            isinstance(source, tuple)
            and len(source) == 2
            and all(isinstance(t, torch.Tensor) for t in source)
        ):
            if len(source[0]) != len(source[1]) or len(source[0]) == 0:
                raise ConfigError(f"task.{name} must be two non-empty tensors of equal length")
            self.tensors, self._source = source, None
        elif isinstance(source, torch.Tensor):
            if len(source) == 0:
                raise ConfigError(f"task.{name} is an empty tensor")
            self.tensors, self._source = (source, None), None
        elif isinstance(source, torch.utils.data.Dataset) and not isinstance(
            source, torch.utils.data.IterableDataset
        ):
            if not hasattr(source, "__len__"):
                raise ConfigError(f"task.{name}: a map-style Dataset needs __len__")
            self._source = torch.utils.data.DataLoader(source, batch_size=batch_size, shuffle=False)
        elif isinstance(source, Iterable):
            if iter(source) is source:
                raise ConfigError(
                    f"task.{name} is an iterator (it can be read once); give a re-iterable such as a "
                    "DataLoader or a list of batches"
                )
            self._source = source
        else:
            raise ConfigError(
                f"task.{name} is a {type(source).__name__}; expected a DataLoader, a list of batches, a "
                "Dataset or (inputs, labels) tensors"
            )

    def __len__(self) -> int:
        """Number of batches (raises TypeError when the source has no length)."""
        if self.tensors is not None:
            return math.ceil(len(self.tensors[0]) / self.batch_size)
        return len(self._source)

    def n_samples(self) -> int | None:
        if self.tensors is not None:
            return len(self.tensors[0])
        ds = getattr(self._source, "dataset", None)
        try:
            return len(ds) if ds is not None else None
        except TypeError:
            return None

    def rows_per_batch(self, batch_size: int | None = None) -> int | None:
        """Samples per batch as this split yields them: ``batch_size`` (default the split's) for
        tensors, which are batched here; else the source's own (a DataLoader's ``batch_size``, or the
        first batch's length): a DataLoader or a list of batches is read as the user batched it."""
        if self.tensors is not None:
            return batch_size or self.batch_size
        own = getattr(self._source, "batch_size", None)
        if isinstance(own, int):
            return own
        first = next(iter(self.raw_batches()), None)
        if first is None:
            return None
        return len(self.adapt(first)[2][0])

    def adapt(self, batch: Any) -> tuple[tuple[str, ...], bool, Inputs, torch.Tensor | None]:
        names, keyword, tensors = normalize_inputs(self._inputs(batch))
        tgt = self._targets(batch)
        if tgt is not None and not isinstance(tgt, torch.Tensor):
            tgt = torch.as_tensor(tgt)
        return names, keyword, tensors, tgt

    def raw_batches(
        self, generator: torch.Generator | None = None, batch_size: int | None = None
    ) -> Iterator:
        if self.tensors is not None:
            x, y = self.tensors
            bs = batch_size or self.batch_size
            idx_all = torch.randperm(len(x), generator=generator) if generator is not None else None
            for i in range(0, len(x), bs):
                idx = idx_all[i : i + bs] if idx_all is not None else slice(i, i + bs)
                yield (x[idx], y[idx]) if y is not None else x[idx]
        else:
            yield from self._source

    def batches(
        self,
        limit: int | None = None,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> Iterator[tuple[Inputs, torch.Tensor | None]]:
        """Normalized batches; ``limit`` stops after that many samples (the last batch cut to fit)."""
        seen = 0
        for raw in self.raw_batches(generator, batch_size):
            _, _, tensors, tgt = self.adapt(raw)
            n = len(tensors[0])
            if limit is not None and seen + n > limit:
                keep = limit - seen
                tensors = tuple(t[:keep] for t in tensors)
                tgt = tgt[:keep] if tgt is not None else None
                n = keep
            if n <= 0:
                break
            yield tensors, tgt
            seen += n
            if limit is not None and seen >= limit:
                break

    def first(self, n: int) -> tuple[Inputs, torch.Tensor | None]:
        """The first ``n`` samples (fewer if the split is smaller), concatenated across batches."""
        parts = list(self.batches(limit=n))
        if not parts:
            raise ConfigError(f"task.{self.name} yielded no batch")
        tensors = tuple(torch.cat([p[0][i] for p in parts]) for i in range(len(parts[0][0])))
        tg = [p[1] for p in parts]
        return tensors, (torch.cat(tg) if tg[0] is not None else None)
