"""A BERT-family sentence encoder compressed as a user would: a ``transformers`` checkpoint in a local
folder, DataLoaders of tokenized dict batches, token embeddings scored by fidelity to the teacher.

Study file: ``task: {name: autocompress.examples.bert_encoder:bert_encoder}`` (the bundled study ``bert_encoder``).
From Python::

    task = bert_encoder(checkpoint="my_encoder/")   # a folder written by save_pretrained
    autocompress.run_study("bert_encoder", task=task)

The checkpoint: on first use the folder is created from a ``BertConfig`` (the size of the small sentence
encoders people deploy: 6 layers, hidden 384, 12 heads, FFN 1536, BERT's 30,522-token vocabulary),
initialized with a fixed seed and written with ``save_pretrained``; from then on (and for any folder a
user points to) the model is loaded with ``BertModel.from_pretrained(folder)``. The teacher is that
config-initialized model, not a pre-trained one: nothing downloads, and what the search measures (the
artifact's outputs against the teacher's, latency, size) does not depend on what the weights learned.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..errors import ConfigError, MissingDependencyError
from ..tasks.base import Task
from ._offline import hub_offline
from ._text import encode, stdlib_sentences

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            "the bert_encoder example needs transformers: pip install 'autocompress[hf]'"
        ) from exc
    transformers.utils.logging.disable_progress_bar()  # no bars in a study's log lines
    return transformers


def bert_config(layers: int, hidden: int, heads: int, intermediate: int, vocab_size: int, seq_len: int):
    """The ``BertConfig`` of the encoder (eager attention: it exports to ONNX with any sequence length)."""
    tf = _transformers()
    if hidden % heads:
        raise ConfigError(f"hidden {hidden} is not a multiple of heads {heads}", field="task.options.heads")
    return tf.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max(512, seq_len),
        attn_implementation="eager",
    )


def ensure_checkpoint(folder: Path, config, seed: int) -> Path:
    """Write a config-initialized ``BertModel`` to ``folder`` (``save_pretrained``) unless it holds one."""
    if (folder / "config.json").exists():
        return folder
    tf = _transformers()
    torch.manual_seed(seed)
    model = tf.BertModel(config, add_pooling_layer=False).eval()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    model.save_pretrained(tmp)  # safetensors
    tmp.replace(folder)
    return folder


def load_encoder(folder: str | Path) -> torch.nn.Module:
    """The encoder of a local ``save_pretrained`` folder (what a user's loader does); never the hub.

    A name that is not a local folder with a ``config.json`` is refused here rather than handed to
    ``from_pretrained`` (which would read it as a hub repository id); the hub is also switched off
    (``HF_HUB_OFFLINE``) while loading, so nothing is downloaded.
    """
    folder = Path(folder).resolve()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{folder} is not a save_pretrained folder (no config.json)", field="task.options.checkpoint"
        )
    tf = _transformers()
    with hub_offline():
        return tf.BertModel.from_pretrained(folder, add_pooling_layer=False, local_files_only=True).eval()


def model_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """The batch adapter: the three int64 inputs a BERT encoder takes, by name."""
    return {k: batch[k] for k in INPUT_NAMES}


def _check_folder(folder: Path, config) -> None:
    """A folder holding another model's config is refused (naming what differs), never loaded half."""
    have = json.loads((folder / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    diff = {k: (have.get(k), getattr(config, k)) for k in keys if have.get(k) != getattr(config, k)}
    if diff:
        shown = ", ".join(f"{k} {a} (options ask {b})" for k, (a, b) in diff.items())
        raise ConfigError(
            f"checkpoint folder {folder} holds another encoder: {shown}; use another folder",
            field="task.options.checkpoint",
        )


def bert_encoder(
    checkpoint: str = "runs/_checkpoints/bert_encoder",
    layers: int = 6,
    hidden: int = 384,
    heads: int = 12,
    intermediate: int = 1536,
    vocab_size: int = 30522,
    seq_len: int = 128,
    train_samples: int = 256,
    eval_samples: int = 256,
    batch_size: int = 16,
    calibration_samples: int = 32,
    seed: int = 0,
) -> Task:
    """A Task for a BERT encoder loaded from ``checkpoint`` (created there on first use).

    Args:
        checkpoint: a ``save_pretrained`` folder (created with the sizes below if it does not exist).
        layers / hidden / heads / intermediate / vocab_size: the encoder's ``BertConfig``.
        seq_len: every batch is padded to this length (the deployed shape; the export keeps it dynamic).
        train_samples / eval_samples: paragraphs of stdlib docstrings for fine-tuning + calibration and for
            evaluation (disjoint).
        batch_size: the DataLoaders' batch size.
        calibration_samples: samples the static int8 layers are calibrated on.
        seed: the initialization seed of a new checkpoint.
    """
    config = bert_config(layers, hidden, heads, intermediate, vocab_size, seq_len)
    folder = Path(checkpoint)
    ensure_checkpoint(folder, config, seed)
    _check_folder(folder, config)
    texts = stdlib_sentences(train_samples + eval_samples)
    if len(texts) < train_samples + eval_samples:
        raise ConfigError(
            f"only {len(texts)} paragraphs of stdlib docstrings are available; ask for fewer samples",
            field="task.options.eval_samples",
        )
    samples = encode(texts, vocab_size, seq_len)
    train = DataLoader(samples[:train_samples], batch_size=batch_size, shuffle=False)
    evaluation = DataLoader(samples[train_samples:], batch_size=batch_size, shuffle=False)
    return Task(
        name="bert_encoder",
        model=functools.partial(load_encoder, folder),
        train=train,
        eval=evaluation,
        inputs=model_inputs,
        targets=None,  # fidelity compares to the teacher: no labels
        output="last_hidden_state",  # token embeddings [batch, sequence, hidden]
        metric="fidelity",
        loss="cosine",
        batch_size=batch_size,
        calibration_samples=calibration_samples,
        description=f"BertModel {layers}x{hidden} ({heads} heads, FFN {intermediate}), sequence {seq_len}",
    )
