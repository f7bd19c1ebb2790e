"""The best float artifact ONNX Runtime makes for a model: its transformer fusions where they apply and pay.

Every ORT session of this backend already runs ORT's full graph optimizations
(``ORT_ENABLE_ALL``: constant folding, Conv/BN/activation fusion, GEMM fusion, the NCHWc layout, ...).
For transformer encoders ORT has more in its offline ``onnxruntime.transformers.optimizer``:
``Attention`` (Q/K/V projections, scores, softmax and context in one kernel), ``SkipLayerNormalization``
(residual Add + LayerNorm), ``BiasGelu`` / ``FastGelu``, ``EmbedLayerNormalization``. They are not
always faster (the issue "Real-sized models" measured ORT's optimizer followed by ``quantize_dynamic``
at 1.44x where ``quantize_dynamic`` alone gave 1.50x), so :func:`optimize_float` applies them, checks
that the fused graph computes the same outputs, times it side by side with the unfused one (all fusions,
Attention alone, all but Attention), and keeps the fastest, reporting what each found, what was kept
and every latency.

Exports of Hugging Face models made with ``attn_implementation="sdpa"`` (the default of transformers 5)
keep SkipLayerNormalization / BiasGelu fusable but not Attention: export with
``attn_implementation="eager"`` for the Attention fusion. Pass ``num_heads`` and ``hidden_size`` (the
model's config has them); without them ORT tries to read them from the graph and often cannot.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from .base import LatencyStats, device_lock, time_callables
from .ort_session import make_session

MODEL_TYPES = ("bert",)  # the transformer optimizer's model types this helper offers (BERT-family encoders)
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "BiasGelu",
    "FastGelu",
    "Gelu",
    "LayerNormalization",
)


@contextlib.contextmanager
def quiet(*names: str):
    """Tools that log through their own loggers and print (ORT's transformer optimizer; the benchmarks'
    quantizers): the root logger and ``names`` at ERROR and stdout swallowed while inside."""
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def transformer_like(graph: onnx.GraphProto) -> bool:
    """True when the graph has attention (Softmax between MatMuls) and a layer norm (the op, or the
    ReduceMean / Sqrt pattern the exporter writes for older opsets): worth trying the fusions on."""
    ops = {n.op_type for n in graph.node}
    norm = "LayerNormalization" in ops or {"ReduceMean", "Sqrt"} <= ops
    return "Softmax" in ops and "MatMul" in ops and norm


def dummy_feed(path: str | Path, seq_len: int = 128) -> dict[str, np.ndarray]:
    """Inputs for every graph input: the fixed dims as stored, dynamic ones 1 (the first axis, the batch)
    or ``seq_len``; integer inputs 0 (token ids), 1 for those named like a mask."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    feed = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (1 if k == 0 else seq_len)
            for k, d in enumerate(v.type.tensor_type.shape.dim)
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.integer):
            feed[v.name] = np.full(dims, 1 if "mask" in v.name.lower() else 0, dtype=dtype)
        else:
            feed[v.name] = np.random.default_rng(0).standard_normal(dims).astype(dtype)
    return feed


def _local_timing(paths: list[Path], feed: dict[str, np.ndarray], threads: int) -> list[LatencyStats]:

    sessions = [make_session(p, threads) for p in paths]
    fns = [lambda s=s: s.run(None, feed) for s in sessions]
    with device_lock("cpu"):
        return time_callables(fns, device="cpu", batch_size=1)


def _same_outputs(a: Path, b: Path, feed: dict[str, np.ndarray], threads: int) -> bool:

    outs_a = make_session(a, threads).run(None, feed)
    outs_b = make_session(b, threads).run(None, feed)
    for x, y in zip(outs_a, outs_b, strict=False):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape or not np.allclose(x, y, rtol=1e-3, atol=1e-3 * max(1.0, np.abs(x).max())):
            return False
    return True


# the fusion sets tried: all of them, attention alone, all but attention (on this 2-core AVX2 VM a
# 6-layer hidden-384 encoder ran slower with all fusions than without, faster with Attention alone)
VARIANTS: dict[str, dict[str, bool]] = {
    "all": {},
    "attention only": {
        "enable_skip_layer_norm": False,
        "enable_bias_skip_layer_norm": False,
        "enable_bias_gelu": False,
        "enable_gelu": False,
        "enable_embed_layer_norm": False,
    },
    "all but attention": {"enable_attention": False},
}


def _fuse(path: Path, model_type: str, num_heads: int, hidden_size: int, options: dict[str, bool]):
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fusion_options = FusionOptions(model_type)
    for name, value in options.items():
        setattr(fusion_options, name, value)
    with quiet("onnxruntime", "onnxruntime.transformers"):
        return optimize_model(
            str(path),
            model_type=model_type,
            num_heads=num_heads,
            hidden_size=hidden_size,
            optimization_options=fusion_options,
            opt_level=0,  # the offline fusions only: ORT's own graph optimizations run in every session
        )


def _write_candidates(
    path, graph, model_type, num_heads, hidden_size, out_dir, feed, threads, report
) -> dict:
    """Write each fusion set's distinct result; keep (name -> path) those computing the model's outputs."""
    before = Counter(n.op_type for n in graph.node)
    written: dict[str, Path] = {}
    seen: list[dict[str, int]] = []
    for k, (name, options) in enumerate(VARIANTS.items()):
        fused_model = _fuse(path, model_type, num_heads, hidden_size, options)
        after = Counter(n.op_type for n in fused_model.model.graph.node)
        stats = fused_model.get_fused_operator_statistics()
        # an op already in the export (a LayerNormalization) is not a fusion: count what the optimizer added
        found = {op: int(v) for op, v in stats.items() if v and after[op] > before[op]}
        if not found or found in seen:
            continue
        seen.append(found)
        target = out_dir / f"{path.stem}.fused-{k}.onnx"
        fused_model.save_model_to_file(str(target))
        match = _same_outputs(path, target, feed, threads)
        report["candidates"][name] = {"fusions": found, "latency_ms": None, "outputs_match": match}
        if match:
            written[name] = target
        else:
            target.unlink()
    return written


def optimize_float(
    path: str | Path,
    model_type: str | None = None,
    *,
    out_dir: str | Path | None = None,
    num_heads: int = 0,
    hidden_size: int = 0,
    feed: dict[str, np.ndarray] | None = None,
    threads: int = 1,
    measure: Callable[[list[Path]], list[LatencyStats]] | None = None,
) -> tuple[Path, dict]:
    """The fastest of the float ONNX model at ``path`` and its transformer-fused versions.

    Each fusion set of :data:`VARIANTS` that changes the graph (distinct results only) is written,
    checked to compute the model's outputs (rtol 1e-3), and timed side by side with the unfused model
    (interleaved, one call of ``measure``); the fastest is kept, the unfused one on a tie or a loss.

    Args:
        path: the float ONNX model (ORT's session-level graph optimizations run on it either way).
        model_type: ``"bert"``, or None to try ``"bert"`` when :func:`transformer_like` says the graph
            has attention and layer norms (anything else is returned as it is).
        out_dir: where the fused models are written (default: beside ``path``, ``<stem>.fused-N.onnx``);
            the ones not kept are removed.
        num_heads, hidden_size: the encoder's attention heads and width (0: ORT reads them from the graph).
        feed: the inputs to check and time with (default: :func:`dummy_feed`, sequence 128); pass the
            baseline's own timing inputs.
        threads: ORT intra-op threads of the checking / timing sessions.
        measure: times a list of artifact paths side by side and returns their stats, e.g. the backend's
            own timing worker under the device lock; default: :func:`time_callables` in this process
            under the ``cpu`` device lock.

    Returns:
        ``(kept_path, report)``: ``kept_path`` is ``path`` or one fused file; ``report`` holds
        ``model_type``; ``transformer_fusions``: fused op type -> count in the kept artifact (empty when
        the unfused model was kept); ``variant``: the kept fusion set (``none`` for the unfused model);
        ``decision``: ``not a transformer``, ``no fusion applies``, ``outputs differ`` (no fused
        version computed the model's outputs), ``fused is faster`` or ``fused is slower``; ``candidates``: per fusion set tried, its ``fusions``, ``latency_ms`` (None when its
        outputs differed) and ``outputs_match``; ``unfused_ms``: the unfused model's median.
    """
    path = Path(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    if model_type is None and transformer_like(graph):
        model_type = "bert"
    report: dict = {"model_type": model_type, "transformer_fusions": {}, "variant": "none", "candidates": {}}
    if model_type is None:
        report["decision"] = "not a transformer"
        return path, report
    if model_type not in MODEL_TYPES:
        raise ValueError(f"optimize_float: model_type {model_type!r} is not one of {MODEL_TYPES}")
    out_dir = Path(out_dir) if out_dir is not None else path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    feed = feed if feed is not None else dummy_feed(path)
    written = _write_candidates(
        path, graph, model_type, num_heads, hidden_size, out_dir, feed, threads, report
    )
    if not report["candidates"]:
        report["decision"] = "no fusion applies"
        return path, report
    if not written:
        report["decision"] = "outputs differ"
        return path, report
    timed = [path, *written.values()]
    stats = (measure or (lambda ps: _local_timing(ps, feed, threads)))(timed)
    kept, kept_name = path, "none"
    report["unfused_ms"] = best_ms = stats[0].median_ms
    for (name, target), st in zip(written.items(), stats[1:], strict=True):
        report["candidates"][name]["latency_ms"] = st.median_ms
        if st.median_ms < best_ms:
            kept, kept_name, best_ms = target, name, st.median_ms
    for target in written.values():
        if target != kept:
            target.unlink()
    report["variant"] = kept_name
    if kept_name == "none":
        report["decision"] = "fused is slower"
    else:
        report["decision"] = "fused is faster"
        report["transformer_fusions"] = report["candidates"][kept_name]["fusions"]
    return kept, report
