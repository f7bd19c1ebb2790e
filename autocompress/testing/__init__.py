"""Test support shipped with autocompress: reference models and reusable conformance suites.

* :mod:`autocompress.testing.models` - tiny reference models (plain CNN, ResNet-style,
  MobileNet-style, two transformer encoders, an LSTM), each with ``example_inputs()``; re-exported here.
* :mod:`autocompress.testing.backend_suite` - the checks every backend must pass (lowering, agreement
  with torch, artifact size, latency under the device lock, side-by-side timing, fingerprints, reloading).
* :mod:`autocompress.testing.technique_suite` - a technique (a plan) applied to a reference model,
  compressed, lowered and checked layer by layer and against the lowered artifact.

The two suite modules import pytest (a test dependency); importing ``autocompress.testing`` does not.
A third-party backend runs the backend suite from its own test file (pytest collects the ``Test`` class)::

    from autocompress.testing.backend_suite import BackendConformance

    class TestMyBackend(BackendConformance):
        def make_backend(self):
            return MyBackend(device="cpu", batch_size=1, threads=1)

or without pytest's collection, one call that raises ``AssertionError`` on the first failed check:
``run_backend_suite(lambda: MyBackend(), workdir)``. A technique: subclass
:class:`~autocompress.testing.technique_suite.TechniqueConformance` (set ``techniques`` / override
``plan_for``), or call ``run_technique_suite(PlainCNN, my_plan_fn, backend, workdir)``.
"""

from __future__ import annotations

from .models import (
    REFERENCE_MODELS,
    Attention,
    BasicBlock,
    BertClassifier,
    DepthwiseSeparable,
    EncoderLayer,
    LSTMClassifier,
    MobileNetStyle,
    PlainCNN,
    ResNetStyle,
    TinyTransformer,
    TorchTransformer,
    live_objects,
)

__all__ = [
    "REFERENCE_MODELS",
    "Attention",
    "BasicBlock",
    "BertClassifier",
    "DepthwiseSeparable",
    "EncoderLayer",
    "LSTMClassifier",
    "MobileNetStyle",
    "PlainCNN",
    "ResNetStyle",
    "TinyTransformer",
    "TorchTransformer",
    "live_objects",
]
