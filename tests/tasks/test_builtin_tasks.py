"""The built-in tasks: data generated offline, models that run on it, validation that passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autocompress.config import load_config
from autocompress.errors import ConfigError
from autocompress.tasks import TASKS, load_task, resolve_factory


def test_mnist1d_is_generated_offline_and_deterministic():
    a = load_task("mnist1d_cnn", {"width": 16})
    x, y = a.train
    assert tuple(x.shape) == (4000, 40) and tuple(a.test[0].shape) == (1000, 40)
    assert set(y.tolist()) == set(range(10))
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1.0) < 0.1  # standardized by make_dataset
    b = load_task("mnist1d_transformer", {"dim": 16, "depth": 1, "heads": 2})
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])  # same seed, same data
    other = load_task("mnist1d_cnn", {"width": 16, "seed": 7})
    assert not torch.equal(a.train[0], other.train[0])


@pytest.mark.parametrize(
    ("name", "options", "layers"),
    [
        ("mnist1d_cnn", {"width": 16}, {"Conv1d": 4, "Linear": 1}),
        ("mnist1d_transformer", {"dim": 16, "depth": 1, "heads": 2}, {"Linear": 8}),
        ("digits_resnet", {"width": 8}, {"Conv2d": 10, "Linear": 1}),
    ],
)
def test_builtin_task_models_run_on_their_data(name, options, layers):
    task = load_task(name, options)
    model = task.model_fn().eval()
    with torch.no_grad():
        out = model(task.test[0][:5])
    assert tuple(out.shape) == (5, 10)
    counts: dict[str, int] = {}
    for m in model.modules():
        counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    assert {k: counts.get(k, 0) for k in layers} == layers


def test_every_shipped_study_validates_and_names_a_task():
    from pathlib import Path

    studies = sorted(Path(__file__).resolve().parents[2].glob("autocompress/studies/*.yaml"))
    assert {p.stem for p in studies} >= {"quickstart", "mnist1d_cnn", "mnist1d_transformer", "digits_resnet"}
    for path in studies:
        cfg = load_config(path)
        # a built-in, or a user-style package.module:factory (the example tasks)
        assert cfg.task.name in TASKS.names() or callable(resolve_factory(cfg.task.name)), path


def test_bad_task_option_is_one_clear_error():
    with pytest.raises(
        ConfigError, match=r"task factory 'mnist1d_cnn' raised TypeError: .*unexpected keyword"
    ):
        load_task("mnist1d_cnn", {"widht": 16})


def test_digits_read_without_sklearn_and_split_as_sklearn_does():
    """The digits are read from scikit-learn's CSV without importing it; the shipped seed-0 split is the one
    scikit-learn's stratified train_test_split computes (any other seed is computed by it)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from autocompress.tasks.digits import load_digits_arrays, split_indices

    images, labels = load_digits_arrays()
    ref = load_digits()
    assert torch.equal(images, torch.tensor(ref.images, dtype=torch.float32))
    assert torch.equal(labels, torch.tensor(ref.target))
    for seed in (0, 3):
        train, test = split_indices(seed, labels)
        want_train, want_test = train_test_split(
            np.arange(len(labels)), test_size=0.2, random_state=seed, stratify=ref.target
        )
        assert np.array_equal(train, want_train) and np.array_equal(test, want_test), seed
    assert len(set(train) | set(test)) == 1797 and not set(train) & set(test)
