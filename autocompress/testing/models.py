"""Tiny reference models for tests and examples, each with ``example_inputs()``.

They cover the architectures a compression tool meets in practice: a plain CNN, residual blocks,
depthwise-separable blocks, a Linear-heavy transformer encoder (plain Linear layers, one built from
torch's ``nn.TransformerEncoder``, a tiny transformers BERT) and an LSTM classifier.
"""

from __future__ import annotations

import gc
import math

import torch
from torch import nn


class PlainCNN(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.classifier(self.features(x))

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 3, 16, 16),)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetStyle(nn.Module):
    """A small ResNet: stem, two stages of residual blocks, global pool, classifier."""

    def __init__(self, width: int = 16, classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 3, 32, 32),)


class DepthwiseSeparable(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return torch.relu(self.bn2(self.pw(torch.relu(self.bn1(self.dw(x))))))


class MobileNetStyle(nn.Module):
    """Stem conv, depthwise-separable blocks, classifier."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(
            DepthwiseSeparable(width, 2 * width, stride=2), DepthwiseSeparable(2 * width, 2 * width)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 3, 16, 16),)


class Attention(nn.Module):
    """Multi-head self-attention written with plain Linear layers (so each one is compressible)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads

        def split(z):
            return z.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEncoder(nn.Module):
    """A 1-D signal cut into patches, embedded, encoded and pooled into class logits.

    Subclasses build the encoder in :meth:`_build_encoder` (between the embedding and the head, so
    that each module's weights are drawn in that order from the seed).
    """

    def __init__(
        self,
        length: int = 40,
        patch: int = 4,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        classes: int = 10,
    ):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, dim)
        self._build_encoder(length, dim, depth, heads)
        self.head = nn.Linear(dim, classes)

    def _build_encoder(self, length: int, dim: int, depth: int, heads: int) -> None:
        raise NotImplementedError

    def _patches(self, x: torch.Tensor) -> torch.Tensor:  # [batch, length] -> [batch, tokens, patch]
        return x.reshape(x.shape[0], -1, self.patch)

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 40),)


class TinyTransformer(_PatchEncoder):
    """A small transformer encoder over a 1-D signal cut into patches (Linear-heavy)."""

    def _build_encoder(self, length: int, dim: int, depth: int, heads: int) -> None:
        self.pos = nn.Parameter(torch.zeros(1, length // self.patch, dim))
        self.layers = nn.Sequential(*[EncoderLayer(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # x: [batch, length]
        tokens = self.embed(self._patches(x)) + self.pos
        return self.head(self.norm(self.layers(tokens)).mean(dim=1))


def torch_encoder(dim: int, heads: int, ffn: int, depth: int) -> nn.TransformerEncoder:
    """torch's ``nn.TransformerEncoder`` of ``depth`` post-norm layers (batch first, no dropout), each
    layer with weights of its own (the encoder clones one layer: they are drawn again)."""
    layer = nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
    for m in encoder.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
        elif isinstance(m, nn.MultiheadAttention):
            m._reset_parameters()
    return encoder


class TorchTransformer(_PatchEncoder):
    """A transformer encoder built from torch's own ``nn.TransformerEncoder`` (``nn.MultiheadAttention``
    reads ``out_proj.weight`` by attribute, and the encoder layer's inference fast path reads
    ``linear1.weight`` / ``linear2.weight``: a technique that replaces those modules breaks them)."""

    def _build_encoder(self, length: int, dim: int, depth: int, heads: int) -> None:
        self.encoder = torch_encoder(dim, heads, 2 * dim, depth)

    def forward(self, x):  # x: [batch, length]
        return self.head(self.encoder(self.embed(self._patches(x))).mean(dim=1))


class BertClassifier(nn.Module):
    """A tiny transformers ``BertModel`` (built from a ``BertConfig``: nothing downloads; eager attention)
    over token ids, mean-pooled into class logits: BERT's ``attention.self.query/key/value`` and
    ``attention.output.dense`` layers, its ``encoder.layer`` list. Needs ``transformers`` (``[hf]``)."""

    def __init__(self, vocab: int = 64, dim: int = 32, depth: int = 2, heads: int = 4, classes: int = 10):
        super().__init__()
        import transformers

        config = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=dim,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=2 * dim,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
        self.bert = transformers.BertModel(config, add_pooling_layer=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):  # ids: [batch, tokens] int64
        return self.head(self.bert(input_ids=ids).last_hidden_state.mean(dim=1))

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, 64, (batch, 12)),)


class LSTMClassifier(nn.Module):
    def __init__(self, features: int = 8, hidden: int = 32, classes: int = 10):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):  # x: [batch, time, features]
        out, _ = self.lstm(x)
        return self.head(out[:, -1])

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 12, 8),)


# the backend conformance suite's models (autocompress.testing.backend_suite)


class Tiny(nn.Module):
    """Conv + ReLU + pooling + Linear on 1x8x8 inputs (every backend must run this)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


class Heavy(nn.Module):
    """Three 128-channel 3x3 convolutions on 1x8x8 inputs (19M MACs): much slower than Tiny on a CPU."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1),
        )

    def forward(self, x):
        return self.convs(x).mean((2, 3))


REFERENCE_MODELS: dict[str, type[nn.Module]] = {
    "plain_cnn": PlainCNN,
    "resnet": ResNetStyle,
    "mobilenet": MobileNetStyle,
    "transformer": TinyTransformer,
    "torch_transformer": TorchTransformer,
    "bert": BertClassifier,
    "lstm": LSTMClassifier,
}


def live_objects() -> tuple[int, int]:
    """(live ``torch.nn.Module`` objects, live ONNX Runtime sessions) after a full collection.

    What :func:`autocompress.search.housekeeping.frozen_heap` froze (everything alive once a run was set
    up, teacher included) is out of the collector's view, so during a run this counts what trials
    created and left behind.
    """
    import onnxruntime as ort

    gc.collect()
    objs = gc.get_objects()
    return (
        sum(isinstance(o, torch.nn.Module) for o in objs),
        sum(isinstance(o, ort.InferenceSession) for o in objs),
    )
