"""Latency cache: same structure on the same device and settings = same latency, measured once.

The key is the structural fingerprint of the artifact (graph, dtypes and shapes; never the weights'
values: a different sparsity pattern or different fine-tuned values on dense kernels takes the
same time) plus :meth:`Backend.timing_identity` (backend, device and its name, batch size,
threads, options, library versions).

Side-by-side ratios and the cache: a trial's latency is timed in alternating blocks with the
baseline's, and the speedup is the ratio of that one session. An entry therefore stores the pair,
keyed by both fingerprints, and a hit returns both stats and so the ratio *as it was measured at
the time* (never a cached numerator over a fresh denominator from another session). The entry's
``measured_at`` time is kept, and a hit is marked ``latency_cached: true`` in the trial's metrics.

The store is one SQLite file (safe with several processes, atomic writes): by default
``<run folder>/latency_cache.db``; ``backend.latency_cache`` in a study names another file,
``user`` (``~/.cache/autocompress/latency.db``, or ``$XDG_CACHE_HOME``) or ``off``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import onnx

from .base import Artifact, Backend, LatencyStats, stable_hash


def onnx_structure(path: Path) -> dict:
    """An ONNX model's structure without tensor values: nodes with attributes, initializer dtypes and
    shapes, graph inputs/outputs and opsets."""
    model = onnx.load(str(path))
    g = model.graph

    def attr(a: onnx.AttributeProto):
        if a.type == onnx.AttributeProto.TENSOR:
            return [a.name, a.t.data_type, list(a.t.dims)]  # a Constant's shape and type, not its values
        if a.type == onnx.AttributeProto.GRAPH:
            return [a.name, "graph"]
        return [a.name, str(onnx.helper.get_attribute_value(a))]

    def value_info(v: onnx.ValueInfoProto):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else "B" for d in t.shape.dim]
        return [v.name, t.elem_type, dims]

    return {
        "opsets": sorted((o.domain, o.version) for o in model.opset_import),
        "nodes": [
            [n.op_type, n.domain, list(n.input), list(n.output), [attr(a) for a in n.attribute]]
            for n in g.node
        ],
        "initializers": [[i.name, i.data_type, list(i.dims)] for i in g.initializer],
        "inputs": [value_info(v) for v in g.input],
        "outputs": [value_info(v) for v in g.output],
    }


def onnx_fingerprint(path: Path) -> str:
    return stable_hash(onnx_structure(path))


def cache_path(setting: str, run_dir: Path) -> Path | None:
    """Where the cache of a run lives: ``run`` (default), ``user``, ``off`` or a file path."""
    if setting == "off":
        return None
    if setting == "run":
        return Path(run_dir) / "latency_cache.db"
    if setting == "user":
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return base / "autocompress" / "latency.db"
    return Path(setting)


class LatencyCache:
    """A persistent map key -> measured latency stats (one SQLite file); counts hits and misses."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        with self._db() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS latency (key TEXT PRIMARY KEY, value TEXT NOT NULL, "
                "measured_at REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0)"
            )

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(str(self.path), timeout=60)

    @staticmethod
    def key(backend: Backend, fingerprints: list[str]) -> str:
        return stable_hash({"artifacts": fingerprints, **backend.timing_identity()})

    def get(self, key: str) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT value, measured_at FROM latency WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            db.execute("UPDATE latency SET hits = hits + 1 WHERE key = ?", (key,))
        self.hits += 1
        return {**json.loads(row[0]), "measured_at": row[1]}

    def put(self, key: str, value: dict) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO latency (key, value, measured_at, hits) VALUES (?, ?, ?, 0)",
                (key, json.dumps(value), time.time()),
            )

    def __len__(self) -> int:
        with self._db() as db:
            return db.execute("SELECT COUNT(*) FROM latency").fetchone()[0]


def timed_or_cached(
    backend: Backend,
    cache: LatencyCache | None,
    artifact: Artifact,
    reference: Artifact | None,
    example_inputs,
) -> tuple[LatencyStats, LatencyStats | None, bool]:
    """Latency of ``artifact`` (and of ``reference``, side by side), from the cache when it has them.

    Returns:
        (stats, reference stats or None, True when both came from the cache).
    """
    key = None
    if cache is not None:
        fps = [backend.fingerprint(a) for a in ([artifact, reference] if reference else [artifact])]
        if all(fps):
            key = cache.key(backend, fps)
            hit = cache.get(key)
            if hit is not None:
                ref = LatencyStats(**hit["reference"]) if hit.get("reference") else None
                return LatencyStats(**hit["stats"]), ref, True
    if reference is not None:
        lat, ref = backend.measure_pair(artifact, reference, example_inputs)
    else:
        lat, ref = backend.measure(artifact, example_inputs), None
    if key is not None:
        cache.put(key, {"stats": lat.to_dict(), "reference": ref.to_dict() if ref else None})
    return lat, ref, False
