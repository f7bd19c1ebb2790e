"""Real pretrained models on real data, as tasks (``module:factory`` of a study file), read from the
folder ``benchmarks/real_models.py --setup`` fills (nothing here downloads):

* :func:`mnist_classifier`: the ImageNet MobileNetV2 (torchvision's weights) or EfficientNet-Lite0
  fine-tuned once on full MNIST at 3 x 96 x 96 (grey replicated to RGB, each model's own input
  normalization); top-1 accuracy on the 10,000-image test split.
* :func:`mpnet_bbc`: the all-mpnet-base-v2 sentence encoder (``transformers``' ``MPNetModel`` + masked
  mean pooling + L2 normalization, as its ``modules.json`` says) on BBC News articles (sequence 128);
  scored by fidelity (cosine to the float model's sentence embeddings).

The cache folder (``root``) holds ``mnist.npz``, ``<arch>_mnist.safetensors`` (+ ``.json``),
``all-mpnet-base-v2/`` and ``bbc_news.json``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..errors import ConfigError
from ..tasks.base import Task
from ._offline import hub_offline
from ._real_data import MnistRGB, stratified_split
from .resnet18 import images, labels

ARCHS = ("mobilenet_v2", "efficientnet_lite0")
NORMALIZATION = {
    "mobilenet_v2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
    "efficientnet_lite0": ((0.498,) * 3, (0.502,) * 3),
}
MPNET = "all-mpnet-base-v2"


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(
            f"{path} does not exist ({what}): run `python benchmarks/real_models.py --setup` first",
            field="task.options.root",
        )
    return path


def build_classifier(arch: str, num_classes: int = 10, image_size: int = 96) -> nn.Module:
    """An untrained ``arch`` (``mobilenet_v2`` / ``efficientnet_lite0``) with ``num_classes`` outputs."""
    if arch == "mobilenet_v2":
        from .mobilenet_v2 import MobileNetV2

        return MobileNetV2(num_classes)
    if arch == "efficientnet_lite0":
        from .efficientnet_lite import efficientnet_lite0

        return efficientnet_lite0(num_classes, image_size)
    raise ConfigError(f"arch {arch!r} is not one of {', '.join(ARCHS)}", field="task.options.arch")


def load_classifier(path: str | Path) -> nn.Module:
    """A fine-tuned classifier from its safetensors file and the ``.json`` record beside it."""
    path = Path(path)
    arch = json.loads(_need(path.with_suffix(".json"), "the checkpoint's record").read_text())
    model = build_classifier(arch["arch"], arch["num_classes"], arch["image_size"])
    model.load_state_dict(load_file(str(_need(path, "the fine-tuned checkpoint"))))
    return model.eval()


def mnist_splits(root: str | Path, arch: str, image_size: int = 96) -> dict[str, MnistRGB]:
    """``{"train", "valid", "test"}`` of the cached MNIST as ``arch``'s RGB inputs."""
    data = np.load(_need(Path(root) / "mnist.npz", "MNIST arrays"), allow_pickle=False)
    mean, std = NORMALIZATION[arch]
    return {
        s: MnistRGB(data[f"{s}_images"], data[f"{s}_labels"], image_size, mean, std)
        for s in ("train", "valid", "test")
    }


def _head(dataset, n: int | None):
    return dataset if n is None or n >= len(dataset) else Subset(dataset, range(n))


def mnist_classifier(
    arch: str = "mobilenet_v2",
    root: str = "runs/_checkpoints",
    image_size: int = 96,
    train_samples: int | None = None,
    eval_samples: int | None = None,
    batch_size: int = 64,
    calibration_samples: int = 128,
) -> Task:
    """The Task of an ImageNet backbone fine-tuned on MNIST (``root/<arch>_mnist.safetensors``).

    Args:
        arch: ``mobilenet_v2`` or ``efficientnet_lite0``.
        root: the cache folder of ``benchmarks/real_models.py --setup``.
        image_size: the images' side (the checkpoint was fine-tuned at it).
        train_samples: fine-tuning / calibration images taken from the 50,000 of the train split.
        eval_samples: test images scored (default: all 10,000).
        batch_size: the DataLoaders' batch size.
        calibration_samples: images the int8 layers are calibrated on.
    """
    if arch not in ARCHS:
        raise ConfigError(f"arch {arch!r} is not one of {', '.join(ARCHS)}", field="task.options.arch")
    splits = mnist_splits(root, arch, image_size)
    model = load_classifier(Path(root) / f"{arch}_mnist.safetensors")
    return Task(
        name=f"{arch}_mnist",
        model=model,
        train=DataLoader(_head(splits["train"], train_samples), batch_size=batch_size, shuffle=False),
        eval=DataLoader(_head(splits["test"], eval_samples), batch_size=batch_size, shuffle=False),
        inputs=images,
        targets=labels,
        metric="accuracy",
        batch_size=batch_size,
        calibration_samples=calibration_samples,
        description=f"{arch} (ImageNet weights) fine-tuned on MNIST at 3x{image_size}x{image_size}",
    )


class MeanPooledEncoder(nn.Module):
    """A ``transformers`` encoder + masked mean pooling (+ L2 normalization): a sentence embedding."""

    def __init__(self, encoder: nn.Module, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled


def load_sentence_encoder(folder: str | Path) -> MeanPooledEncoder:
    """The encoder of a local sentence-transformers folder (``MPNetModel``, never the hub)."""
    import transformers

    folder = _need(Path(folder).resolve(), "the sentence-transformers folder")
    modules = json.loads(_need(folder / "modules.json", "its modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    if not pooling.get("pooling_mode_mean_tokens"):
        raise ConfigError(f"{folder}: pooling is not mean pooling ({pooling})", field="task.options.root")
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # the checkpoint's unused pooler is left out on purpose
    try:
        with hub_offline():
            encoder = transformers.MPNetModel.from_pretrained(
                folder, add_pooling_layer=False, local_files_only=True, attn_implementation="eager"
            )
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    return MeanPooledEncoder(encoder.eval(), normalize="Normalize" in kinds).eval()


def tokenize(folder: str | Path, texts: list[str], seq_len: int) -> list[dict[str, torch.Tensor]]:
    """``texts`` as single samples ``{input_ids, attention_mask}`` padded / truncated to ``seq_len``."""
    import transformers

    folder = _need(Path(folder).resolve(), "the tokenizer's folder")
    with hub_offline():
        tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i]}
        for i in range(len(texts))
    ]


def bbc_samples(root: str | Path, seq_len: int = 128) -> tuple[list[dict], list[dict], list[int], list[int]]:
    """``(train samples, eval samples, train labels, eval labels)`` of the cached BBC News, tokenized."""
    root = Path(root)
    bbc = json.loads(_need(root / "bbc_news.json", "BBC News articles").read_text())
    train_i, eval_i = stratified_split(bbc["labels"])
    samples = tokenize(root / MPNET, bbc["texts"], seq_len)
    return (
        [samples[i] for i in train_i],
        [samples[i] for i in eval_i],
        [bbc["labels"][i] for i in train_i],
        [bbc["labels"][i] for i in eval_i],
    )


def sentence_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The batch adapter of :func:`mpnet_bbc`: the encoder's two inputs, by name."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def mpnet_bbc(
    root: str = "runs/_checkpoints",
    seq_len: int = 128,
    train_samples: int | None = None,
    eval_samples: int | None = None,
    batch_size: int = 16,
    calibration_samples: int = 32,
) -> Task:
    """The Task of all-mpnet-base-v2 on BBC News: sentence embeddings scored by fidelity.

    Args:
        root: the cache folder of ``benchmarks/real_models.py --setup``.
        seq_len: tokens per article (padded / truncated).
        train_samples / eval_samples: articles of the train (4 in 5 of each class) / eval split used.
        batch_size: the DataLoaders' batch size.
        calibration_samples: articles the static int8 layers are calibrated on.
    """
    train, evaluation, _, _ = bbc_samples(root, seq_len)
    return Task(
        name="mpnet_bbc",
        model=functools.partial(load_sentence_encoder, Path(root) / MPNET),
        train=DataLoader(train[:train_samples], batch_size=batch_size, shuffle=False),
        eval=DataLoader(evaluation[:eval_samples], batch_size=batch_size, shuffle=False),
        inputs=sentence_inputs,
        targets=None,
        metric="fidelity",
        loss="cosine",
        batch_size=batch_size,
        calibration_samples=calibration_samples,
        description=f"all-mpnet-base-v2 (MPNetModel 12x768, mean pooling) on BBC News, sequence {seq_len}",
    )
