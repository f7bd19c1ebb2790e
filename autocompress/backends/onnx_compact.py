"""Compact weight storage in ONNX: shared weights (packed codebook indices) and sparse weights (nonzeros
plus their positions), rebuilt by ops whose every input is an initializer, so ONNX Runtime folds them
into a dense constant at session load and inference runs the dense kernels.

Formats (all bit streams are little-endian: value ``i`` occupies bits ``i*b .. i*b+b-1``):

- shared, dense: ``ceil(n * b / 8)`` bytes of ``b``-bit indices (uint8) + the float32 codebook (``2**b``
  values); rebuilt by unpacking (BitShift, Mod, ReduceSum) and ``Gather(codebook, index)``;
- sparse, ``bitmask``: ``ceil(n / 8)`` bytes, one bit per weight (1: stored), + the nonzeros;
- sparse, ``relative``: ``r``-bit gaps, Deep Compression's relative index: an entry ``g < 2**r - 1`` skips
  ``g`` zeros and places the next nonzero, the entry ``2**r - 1`` is a filler that skips that many zeros
  and places nothing; ``r`` (1 to 8) is the one giving the fewest bytes;
- the nonzeros: float32 values, or (a shared layer) ``b``-bit indices into the codebook.

Per layer the smallest of dense, bitmask, relative and rice is written; ``ScatterElements`` puts the nonzeros
into a ``ConstantOfShape`` zero tensor. Pure functions over ``onnx`` protos (no session).
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import BackendError
from ..lowering import LoweringSpec, SharedWeight

INT64 = TensorProto.INT64


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (integers in ``[0, 2**bits)``) as a little-endian bit stream of ``bits`` each, in bytes."""
    v = np.asarray(values, dtype=np.int64).ravel()
    if v.size and (v.min() < 0 or v.max() >= 2**bits):
        raise BackendError(f"cannot pack values outside [0, {2**bits}) in {bits} bits")
    stream = ((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8).ravel()
    return np.packbits(stream, bitorder="little")


def unpack_bits(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (numpy; the graph does the same with ONNX ops)."""
    stream = np.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits).astype(np.int64)
    return (stream << np.arange(bits)).sum(1)


def relative_entries(positions: np.ndarray, r: int) -> np.ndarray:
    """Deep Compression's relative index of sorted ``positions`` in ``r``-bit entries (fillers included)."""
    filler = 2**r - 1
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    fills = gaps // filler
    out = np.full(len(gaps) + int(fills.sum()), filler, dtype=np.int64)
    real = np.arange(len(gaps)) + np.cumsum(fills)  # each real entry comes after its fillers
    out[real] = gaps - fills * filler
    return out


def decode_relative(entries: np.ndarray, r: int) -> np.ndarray:
    """Positions of the nonzeros from relative entries (the graph does the same)."""
    filler = 2**r - 1
    real = entries != filler
    steps = np.where(real, entries + 1, filler)
    return (np.cumsum(steps) - 1)[real]


def rice_streams(positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Golomb-Rice code of the gaps of sorted ``positions``: (unary stream of 0/1 flags, ``k``-bit low parts)."""
    gaps = np.diff(np.concatenate([[-1], positions])) - 1
    high, low = gaps >> k, gaps & (2**k - 1)
    unary = np.ones(int(high.sum()) + len(gaps), dtype=np.int64)
    unary[np.cumsum(high + 1) - 1] = 0  # each gap's terminating zero
    return unary, low


def decode_rice(unary: np.ndarray, low: np.ndarray, k: int) -> np.ndarray:
    """Positions of the nonzeros from Golomb-Rice streams (the graph does the same): the ``i``-th nonzero
    sits at ``2**k * (ones before the i-th zero) + sum(low[:i+1] + 1) - 1``."""
    zeros = np.flatnonzero(unary == 0)
    ones_before = np.cumsum(unary)[zeros]
    return (ones_before << k) + np.cumsum(low + 1) - 1


@dataclass
class Stored:
    """How one weight was written: ``format`` (``dense``, ``bitmask``, ``relative``), the bytes of each part."""

    layer: str
    format: str
    index_bits: int  # relative: bits per entry; rice: its parameter k; else 0
    positions_bytes: int
    values_bytes: int
    codebook_bytes: int
    dense_bytes: int  # the float32 weight it replaces

    @property
    def total_bytes(self) -> int:
        return self.positions_bytes + self.values_bytes + self.codebook_bytes


class _Builder:
    """Nodes and initializers rebuilding weights: tensor names are short (``cw<k>.<j>``) and small constants
    are one initializer per graph (``cw.<value>``), so the graph costs a few hundred bytes per weight."""

    def __init__(self):
        self.nodes, self.inits, self._consts, self._count, self.prefix = [], [], {}, 0, ""

    def start(self, k: int) -> None:
        self.prefix, self._count = f"cw{k}", 0

    def const(self, array: np.ndarray) -> str:
        a = np.asarray(array)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            name = f"cw.{len(self._consts)}"
            self.inits.append(numpy_helper.from_array(a, name))
            self._consts[key] = name
        return self._consts[key]

    def init(self, array: np.ndarray) -> str:
        name = f"{self.prefix}.{self._count}"
        self._count += 1
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        if out is None:
            out = f"{self.prefix}.{self._count}"
            self._count += 1
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def unpack(self, packed: np.ndarray, n: int, bits: int) -> str:
        """Nodes turning a packed stream into ``n`` int64 values (``bits`` 1: uint8 0/1)."""
        if bits == 8:
            return self.op("Cast", [self.init(packed.astype(np.uint8))], to=INT64)
        col = self.init(packed.astype(np.uint8).reshape(-1, 1))  # one byte a row: shifted along columns
        whole = 8 % bits == 0  # 1, 2, 4 bits: whole values in each byte, read directly
        step = bits if whole else 1
        shifts = self.const(np.arange(0, 8, step, dtype=np.uint8))
        shifted = self.op("BitShift", [col, shifts], direction="RIGHT")
        part = self.op("Mod", [shifted, self.const(np.array(2**step, np.uint8))])
        flat = self.op("Reshape", [part, self.const(np.array([-1], np.int64))])
        count = n if whole else n * bits
        stream = flat
        if count != packed.size * 8 // step:  # padding bits at the end
            stream = self.op(
                "Slice", [flat, self.const(np.array([0], np.int64)), self.const(np.array([count]))]
            )
        if bits == 1:
            return stream
        if whole:
            return self.op("Cast", [stream], to=INT64)
        rows = self.op("Reshape", [stream, self.const(np.array([n, bits], np.int64))])
        wide = self.op("Cast", [rows], to=TensorProto.FLOAT)  # exact: sums below 2**8
        weighted = self.op("Mul", [wide, self.const((1 << np.arange(bits)).astype(np.float32))])
        total = self.op("ReduceSum", [weighted, self.const(np.array([1], np.int64))], keepdims=0)
        return self.op("Cast", [total], to=INT64)

    def nth(self, flags_i64: str) -> str:
        """For each position, the count of set flags before it: the index of its value if it is set."""
        return self.op("CumSum", [flags_i64, self.const(np.array(0, np.int64))], exclusive=1)


def _values(
    b: _Builder, flat: np.ndarray, codes: np.ndarray | None, shared: SharedWeight | None
) -> tuple[str, int, int]:
    """The stored values (float32, or codebook indices): (tensor, values bytes, codebook bytes)."""
    if shared is None:
        return b.init(flat.astype(np.float32)), flat.size * 4, 0
    packed = pack_bits(codes, shared.bits)
    index = b.unpack(packed, codes.size, shared.bits)
    book = b.init(shared.codebook.astype(np.float32))
    return b.op("Gather", [book, index]), packed.size, shared.codebook.size * 4


def _position_candidates(keep: np.ndarray) -> list[tuple[str, int, tuple[np.ndarray, ...]]]:
    """Per position format, (format, relative bits or rice parameter or 0, the stored streams) at its
    fewest bytes: the bitmask, the relative index at its best ``r``, the Rice code at its best ``k``."""
    positions = np.flatnonzero(keep)
    out = [("bitmask", 0, (np.packbits(keep.astype(np.uint8), bitorder="little"),))]
    r = min(range(1, 9), key=lambda r: len(relative_entries(positions, r)) * r)
    out.append(("relative", r, (pack_bits(relative_entries(positions, r), r),)))
    k = min(range(1, 9), key=lambda k: len(rice_streams(positions, k)[0]) + len(positions) * k)
    unary, low = rice_streams(positions, k)
    out.append(("rice", k, (pack_bits(unary, 1), pack_bits(low, k))))
    return out


def _best_positions(array, keep, shared, index) -> tuple[str, int, tuple[np.ndarray, ...]]:
    """The position format of the fewest bytes, its streams and the nodes rebuilding it counted (each
    built once in a scratch graph: the Rice code's rebuild takes a few hundred bytes more than the
    relative index's, more than it saves on a small layer)."""

    def cost(candidate) -> int:
        scratch = _Builder()
        scratch.start(0)
        _sparse(scratch, "w", array, keep, *candidate, shared, index)
        return sum(part.size for part in candidate[2]) + sum(node.ByteSize() for node in scratch.nodes)

    return min(_position_candidates(keep), key=cost)


def rebuild_nodes(
    b: _Builder,
    name: str,
    array: np.ndarray,
    shared: SharedWeight | None,
    index: np.ndarray | None,
    sparse: bool,
) -> Stored | None:
    """Add to ``b`` the nodes and initializers producing the tensor ``name`` (the weight ``array``, ONNX
    layout); None when the plain float32 weight is the smallest (nothing added).

    ``shared``/``index``: a shared layer's codebook and its indices in the ONNX layout. A shared layer with
    pruned weights is stored sparse (its codes cannot hold the zeros); a sparse float layer is stored
    sparse only where that is smaller than the float32 weight; the position format is the smaller.
    """
    flat, n = array.ravel(), array.size
    keep = flat != 0
    pruned = shared.keep is not None if shared is not None else sparse
    if pruned and keep.any():
        fmt, r, stream = _best_positions(array, keep, shared, index)
        nnz = int(keep.sum())
        sparse_bytes = sum(part.size for part in stream) + (nnz * (shared.bits if shared else 32) + 7) // 8
        if shared is not None or sparse_bytes < n * 4:
            return _sparse(b, name, array, keep, fmt, r, stream, shared, index)
    if shared is None:  # sparse storage would not be smaller: the plain float weight
        return None
    out, vb, cb = _values(b, flat, index.ravel(), shared)
    b.op("Reshape", [out, b.const(np.array(array.shape, np.int64))], out=name)
    return Stored(name, "dense", 0, 0, vb, cb, n * 4)


def _sparse(b: _Builder, name: str, array, keep, fmt: str, r: int, stream, shared, index) -> Stored:
    """dense[i] = values[nth(i)] where position i is stored, else 0 (static shapes only: ORT folds it)."""
    flat, n = array.ravel(), array.size
    codes = index.ravel()[keep] if shared is not None else None
    values, vb, cb = _values(b, flat[keep], codes, shared)
    zero = b.const(np.array(0, np.float32))
    if fmt == "bitmask":
        mask = b.unpack(stream[0], n, 1)
        nth = b.nth(b.op("Cast", [mask], to=INT64))  # past the last nonzero: nnz, clamped (not read)
        last = b.const(np.array(int(keep.sum()) - 1, np.int64))
        gathered = b.op("Gather", [values, b.op("Min", [nth, last])])
        dense = b.op("Where", [b.op("Cast", [mask], to=TensorProto.BOOL), gathered, zero])
    else:
        if fmt == "relative":
            positions, values = _relative_positions(b, stream[0], np.flatnonzero(keep), r, values, zero)
        else:
            positions = _rice_positions(b, stream, np.flatnonzero(keep), r)
        zeros = b.op(
            "ConstantOfShape",
            [b.const(np.array([n], np.int64))],
            value=numpy_helper.from_array(np.zeros(1, np.float32)),
        )
        dense = b.op("ScatterElements", [zeros, positions, values], axis=0)
    b.op("Reshape", [dense, b.const(np.array(array.shape, np.int64))], out=name)
    return Stored(name, fmt, r, sum(part.size for part in stream), vb, cb, n * 4)


def _int64(b: _Builder, unpacked: str, bits: int) -> str:
    """One-bit streams unpack as uint8 flags: as int64 like the wider ones."""
    return b.op("Cast", [unpacked], to=INT64) if bits == 1 else unpacked


def _relative_positions(b: _Builder, stream, positions, r: int, values: str, zero: str) -> tuple[str, str]:
    """(position of each entry, its value): a filler's position is a pruned weight's, its value 0."""
    entries = _int64(b, b.unpack(stream, len(relative_entries(positions, r)), r), r)
    real = b.op("Less", [entries, b.const(np.array(2**r - 1, np.int64))])  # else a filler
    real_i64 = b.op("Cast", [real], to=INT64)
    steps = b.op("Add", [entries, real_i64])  # a real entry g moves g + 1, a filler 2**r - 1
    cum = b.op("CumSum", [steps, b.const(np.array(0, np.int64))])
    where = b.op("Sub", [cum, b.const(np.array(1, np.int64))])
    gathered = b.op("Gather", [values, b.nth(real_i64)])
    return where, b.op("Where", [real, gathered, zero])


def _rice_positions(b: _Builder, streams, positions, k: int) -> str:
    """The nonzeros' positions from the Golomb-Rice streams (as :func:`decode_rice`). The ``i``-th zero
    flag's count of ones before it is moved to slot ``i`` by a scatter over a permutation (the one flags
    go to the slots after the ``nnz`` first, which are cut off): ORT folds it, which it does not for
    ``NonZero``."""
    unary, low = rice_streams(positions, k)
    nnz = len(positions)
    flags = b.op("Cast", [b.unpack(streams[0], unary.size, 1)], to=INT64)
    axis, one = b.const(np.array(0, np.int64)), b.const(np.array(1, np.int64))
    ones = b.op("CumSum", [flags, axis])  # at a zero flag: the ones before it; at a one: itself included
    nth_zero = b.op("CumSum", [b.op("Sub", [one, flags]), axis], exclusive=1)
    after = b.op("Add", [ones, b.const(np.array(nnz - 1, np.int64))])
    slot = b.op("Where", [b.op("Cast", [flags], to=TensorProto.BOOL), after, nth_zero])
    blank = b.op(
        "ConstantOfShape",
        [b.const(np.array([unary.size], np.int64))],
        value=numpy_helper.from_array(np.zeros(1, np.int64)),
    )
    placed = b.op("ScatterElements", [blank, slot, ones], axis=0)
    head = b.op("Slice", [placed, b.const(np.array([0], np.int64)), b.const(np.array([nnz], np.int64))])
    high = b.op("Mul", [head, b.const(np.array(2**k, np.int64))])
    lows = _int64(b, b.unpack(streams[1], low.size, k), k)
    cum = b.op("CumSum", [b.op("Add", [lows, one]), axis])
    return b.op("Sub", [b.op("Add", [high, cum]), one])


def _find(graph: onnx.GraphProto, layer: str, weight: np.ndarray) -> tuple[TensorProto, bool] | None:
    """The initializer holding ``weight`` (by name, else by value) and whether it is stored transposed."""
    by_name = {i.name: i for i in graph.initializer}
    named = by_name.get(f"{layer}.weight")
    candidates = [named] if named is not None else list(graph.initializer)
    for init in candidates:
        if tuple(init.dims) == weight.shape and np.array_equal(numpy_helper.to_array(init), weight):
            return init, False
        square = weight.ndim == 2 and tuple(init.dims) == weight.T.shape
        if square and np.array_equal(numpy_helper.to_array(init), weight.T):
            return init, True
    return None


def compact_weights(model: onnx.ModelProto, torch_model, spec: LoweringSpec) -> list[Stored]:
    """Rewrite, in place, every weight the spec shares or stores sparse (see the module docstring).

    Raises:
        BackendError: a shared layer's weight is not a constant initializer of the graph (nothing to fold).
    """
    graph, stored, b = model.graph, [], _Builder()
    for layer, lay in spec.layers.items():
        if lay.shared is None and not lay.sparse:
            continue
        weight = torch_model.get_submodule(layer).weight.detach().numpy()
        found = _find(graph, layer, weight)
        if found is None:
            if lay.shared is not None:
                raise BackendError(
                    f"layer {layer!r}: its weight is not a constant initializer of the exported graph, so "
                    "the shared weight cannot be rebuilt at load; keep share_bits 0 on it"
                )
            continue  # sparse storage only where the weight is a plain initializer (else dense)
        init, transposed = found
        array = numpy_helper.to_array(init)
        index = None
        if lay.shared is not None:
            index = lay.shared.index.T if transposed else lay.shared.index
            rebuilt = lay.shared.weight()
            if not np.allclose(rebuilt.T if transposed else rebuilt, array, atol=1e-6):
                raise BackendError(f"layer {layer!r}: the shared weight's codebook does not give its weight")
        b.start(len(stored))
        record = rebuild_nodes(b, init.name, array, lay.shared, index, lay.sparse)
        if record is None:
            record = Stored(init.name, "dense", 0, 0, array.size * 4, 0, array.size * 4)
        else:
            graph.initializer.remove(init)
            for i, v in enumerate(graph.input):
                if v.name == init.name:
                    del graph.input[i]
                    break
        record.layer = layer
        stored.append(record)
    if b.nodes:
        graph.initializer.extend(b.inits)
        rest = list(graph.node)
        del graph.node[:]
        graph.node.extend(b.nodes + rest)
    return stored


def entropy_coded_bytes(path: str | Path) -> int:
    """Bytes of the file compressed by LZMA (xz, preset 9e): the labelled stand-in for the paper's
    Huffman stage. Never the size objective: the artifact's own bytes on disk are."""
    return len(lzma.compress(Path(path).read_bytes(), preset=9 | lzma.PRESET_EXTREME))


def compact_artifact(path: Path, torch_model, spec: LoweringSpec) -> dict:
    """Compact the ONNX file at ``path`` in place as the spec says; what goes into the artifact's extra:
    per layer the format and bytes written, and the file's entropy-coded bytes (labelled)."""
    if not any(lay.shared is not None or lay.sparse for lay in spec.layers.values()):
        return {}
    model = onnx.load(str(path))
    stored = compact_weights(model, torch_model, spec)
    onnx.save(model, str(path))
    return {
        "compact_weights": {
            s.layer: {
                "format": s.format,
                "index_bits": s.index_bits,
                "stored_bytes": s.total_bytes,
                "dense_bytes": s.dense_bytes,
            }
            for s in stored
        },
        "entropy_coded_bytes_lzma": entropy_coded_bytes(path),
    }
