"""Offline text for the encoder example: docstrings that ship with Python, tokenized by a hashed
word-piece scheme into BERT-style ids (``[CLS] ... [SEP]``, padded, with an attention mask)."""

from __future__ import annotations

import importlib
import inspect
import re
import zlib

import torch

PAD, UNK, CLS, SEP = 0, 100, 101, 102
FIRST_ID = 1000  # ids below are reserved for specials, as in BERT's vocabulary
MODULES = (
    "json", "os", "re", "collections", "functools", "itertools", "pathlib", "argparse", "logging",
    "subprocess", "threading", "asyncio", "datetime", "decimal", "fractions", "statistics", "string",
    "textwrap", "typing", "dataclasses", "inspect", "shutil", "tempfile", "zipfile", "tarfile", "csv",
    "sqlite3", "email", "http.client", "urllib.parse", "socket", "heapq", "bisect", "random", "math",
)  # fmt: skip
WORD = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")


def stdlib_sentences(limit: int) -> list[str]:
    """Up to ``limit`` paragraphs of stdlib docstrings (modules, classes, functions), in a fixed order."""
    out: list[str] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stripped-down Python: skip what is missing
            continue
        docs = [module.__doc__ or ""]
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if not attr.startswith("_") and (inspect.isclass(obj) or inspect.isroutine(obj)):
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for para in re.split(r"\n\s*\n", doc):
                para = " ".join(para.split())
                if len(para) >= 20:
                    out.append(para)
                    if len(out) >= limit:
                        return out
    return out


def _piece_id(piece: str, vocab_size: int) -> int:
    return FIRST_ID + zlib.crc32(piece.encode()) % (vocab_size - FIRST_ID)


def tokenize(text: str, vocab_size: int, max_len: int) -> list[int]:
    """``[CLS]`` + hashed word pieces (words cut into pieces of at most 6 characters, continuations
    marked ``##`` as in WordPiece) + ``[SEP]``, cut to ``max_len``."""
    ids = [CLS]
    for word in WORD.findall(text.lower()):
        for i in range(0, len(word), 6):
            ids.append(_piece_id(("##" if i else "") + word[i : i + 6], vocab_size))
    return ids[: max_len - 1] + [SEP]


def encode(texts: list[str], vocab_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """One dict of int64 ``input_ids`` / ``attention_mask`` / ``token_type_ids`` [seq_len] per text."""
    samples = []
    for text in texts:
        ids = tokenize(text, vocab_size, seq_len)
        n = len(ids)
        input_ids = torch.full((seq_len,), PAD, dtype=torch.int64)
        input_ids[:n] = torch.tensor(ids, dtype=torch.int64)
        mask = torch.zeros(seq_len, dtype=torch.int64)
        mask[:n] = 1
        samples.append(
            {
                "input_ids": input_ids,
                "attention_mask": mask,
                "token_type_ids": torch.zeros(seq_len, dtype=torch.int64),
            }
        )
    return samples
