"""The held-out part of the training split: data no trial fine-tunes on, scored with the task's metric.

Two things read it: early stopping (the torch model's metric after each fine-tuning epoch, see
:mod:`autocompress.search.multifidelity`) and ``finetune.keep_better`` (each trial scores its post-training
model and its fine-tuned model on it and keeps the better one, see :mod:`autocompress.objective`). A run
holds out one part, ``finetune.holdout_fraction`` of the training split drawn with the study's seed, and
fine-tunes every trial on the rest; the eval (test) split is never touched.

What can be split: ``(inputs, labels)`` tensors (a seeded permutation of the samples), a map-style
``Dataset`` (a seeded ``Subset`` of it), a ``DataLoader`` over one with automatic batching (the same
loader settings over a ``Subset``), a list or tuple of batches (a seeded choice of whole batches). Any
other source (an iterable of batches without a length, a loader with its own batch sampler) cannot be
split: :class:`HeldOut` then says why and the trials fine-tune on all of it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler, Subset

from .tasks import Task
from .tasks.data import Split, deployable


@dataclass
class HeldOut:
    """A task's training split cut in two.

    Attributes:
        task: the task whose training split is the rest (the one trials fine-tune on); the task itself
            when nothing is held out.
        split: the held-out batches (None: nothing held out, see ``reason``).
        reason: why nothing is held out (empty when ``split`` is set).
    """

    task: Task
    split: Split | None = None
    reason: str = ""


def _perm(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out indices, the rest) of ``n`` items: ``round(n * fraction)`` (at least 1) drawn with ``seed``."""
    n_val = max(1, int(round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[:n_val], perm[n_val:]


def _loader_like(loader: DataLoader, dataset: Dataset) -> DataLoader:
    """A DataLoader over ``dataset`` with ``loader``'s batching, shuffling, collation and workers."""
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        shuffle=isinstance(loader.sampler, RandomSampler),
        collate_fn=loader.collate_fn,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        generator=loader.generator,
    )


def _split_source(source, fraction: float, seed: int):
    """(rest, held-out) sources of the same kind as ``source``, or (None, reason)."""
    if isinstance(source, DataLoader):
        ds = source.dataset
        if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
            return None, "its DataLoader reads an iterable dataset (no length to draw samples from)"
        if source.batch_size is None or not isinstance(source.sampler, RandomSampler | SequentialSampler):
            return None, "its DataLoader has its own sampler or batch sampler"
        val, rest = _perm(len(ds), fraction, seed)
        if len(rest) == 0:
            return None, f"it has {len(ds)} sample(s)"
        return (
            _loader_like(source, Subset(ds, rest.tolist())),
            _loader_like(source, Subset(ds, sorted(val.tolist()))),
        )
    if isinstance(source, Dataset) and not isinstance(source, IterableDataset):
        val, rest = _perm(len(source), fraction, seed)
        if len(rest) == 0:
            return None, f"it has {len(source)} sample(s)"
        return Subset(source, rest.tolist()), Subset(source, sorted(val.tolist()))
    if isinstance(source, Sequence) and not isinstance(source, str | bytes):
        if len(source) < 2:
            return None, f"it is a list of {len(source)} batch(es)"
        val, rest = _perm(len(source), fraction, seed)
        if len(rest) == 0:
            return None, f"it is a list of {len(source)} batches"
        return [source[i] for i in sorted(rest.tolist())], [source[i] for i in sorted(val.tolist())]
    return (
        None,
        f"a {type(source).__name__} cannot be split (give tensors, a Dataset, a DataLoader or a list)",
    )


def split_training(task: Task, fraction: float, seed: int) -> HeldOut:
    """Hold out ``fraction`` of ``task``'s training split (see the module docstring).

    For ``(inputs, labels)`` tensors the held-out samples are the first ``round(n * fraction)`` of
    ``torch.randperm(n)`` seeded with ``seed`` (the split early stopping has always used).
    """
    split = task.train_split
    if split.tensors is not None:
        x, y = split.tensors
        if len(x) < 2:
            return HeldOut(task, None, f"the training split has {len(x)} sample")
        val, rest = _perm(len(x), fraction, seed)
        if y is None:
            return HeldOut(dataclasses.replace(task, train=x[rest]), task._split("holdout", x[val]))
        held = task._split("holdout", (x[val], y[val]))
        return HeldOut(dataclasses.replace(task, train=(x[rest], y[rest])), held)
    rest, held = _split_source(task.train, fraction, seed)
    if rest is None:
        return HeldOut(task, None, f"the training split cannot be split: {held}")
    return HeldOut(dataclasses.replace(task, train=rest), task._split("holdout", held))


@torch.no_grad()
def holdout_scores(
    models: Sequence[nn.Module], task: Task, split: Split, teacher: nn.Module | None = None
) -> list[float]:
    """The task's metric of each torch model on ``split``, in one pass over its batches.

    Each model runs in eval mode (its mode is restored). A metric that compares to the teacher
    (``fidelity``) gets ``teacher``'s outputs on the same batch. A model whose outputs are not finite
    scores NaN (no value of the metric is worse).
    """
    metric = task.metric_obj
    if metric.needs_reference and teacher is None:
        raise ValueError(f"metric {metric.name!r} compares to the teacher: pass the teacher")
    nets = [deployable(m, task.io) for m in models]
    modes = [m.training for m in models]
    states = [metric.start() for _ in models]
    finite = [True] * len(models)
    ts = deployable(teacher, task.io) if teacher is not None and metric.needs_reference else None
    try:
        for m in models:
            m.eval()
        for inputs, targets in split.batches():
            ref = ts(*inputs).float().numpy() if ts is not None else None
            tgt = targets.numpy() if targets is not None else None
            for i, net in enumerate(nets):
                if not finite[i]:
                    continue
                out = net(*inputs).float().numpy()
                if not np.all(np.isfinite(out)):
                    finite[i] = False
                    continue
                metric.update(states[i], out, tgt, ref)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return [metric.result(s) if ok else math.nan for s, ok in zip(states, finite, strict=True)]
