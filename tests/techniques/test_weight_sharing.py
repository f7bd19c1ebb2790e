"""Weight sharing (codebook + indices, trained centroids) and sparse storage (nonzeros + positions):
the clustering, the paper's gradient rule, the ONNX rewrite ORT folds at load, its exact stored bytes,
and the refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.backends.onnx_compact import (
    decode_relative,
    decode_rice,
    pack_bits,
    relative_entries,
    rice_streams,
    unpack_bits,
)
from autocompress.errors import BackendError, ConfigError
from autocompress.lowering import LayerLowering, LoweringSpec, SharedWeight
from autocompress.plan import LayerPlan, Plan, Schedule
from autocompress.registry import TECHNIQUES
from autocompress.techniques.weight_sharing import SharedParam, cluster_point, kmeans_1d, share_weight

FOLD_OPS = {
    "Gather",
    "ScatterElements",
    "BitShift",
    "ReduceSum",
    "CumSum",
    "Where",
    "ConstantOfShape",
    "NonZero",
    "Not",
}


@pytest.fixture(scope="module")
def backend():
    be = OnnxRuntimeBackend(isolate=False)
    yield be
    be.close()


class TwoLinear(nn.Module):
    def __init__(self, n_in: int = 64, hidden: int = 32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_in, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _run(backend, art, x: torch.Tensor) -> np.ndarray:
    return np.asarray(backend.runner(art)((x.numpy(),)))


def _layer_bytes(path, k: int) -> int:
    """Bytes of the initializers written for the k-th compacted weight (``cw<k>.*``; not shared constants)."""
    graph = onnx.load(str(path)).graph
    return sum(numpy_helper.to_array(i).nbytes for i in graph.initializer if i.name.startswith(f"cw{k}."))


def _optimized_ops(backend, art, tmp_path) -> set[str]:
    return set(backend._kernels(art.path, tmp_path / "optimized.onnx"))


# -- clustering ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["linear", "density", "forgy"])
def test_kmeans_recovers_separated_clusters(init):
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([-1.0, -0.3, 0.2, 0.9])
    values = centres[torch.randint(0, 4, (4000,), generator=gen)] + 0.01 * torch.randn(4000, generator=gen)
    c, idx = kmeans_1d(values, 4, init)
    assert torch.allclose(c.sort().values, centres, atol=0.01)
    assert float((c[idx] - values).abs().max()) < 0.05


def test_codebook_gradient_is_the_sum_of_its_members():
    """The paper's rule: each centroid's gradient is the sum of the gradients of the weights in its cluster."""
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    w[w.abs() < 0.3] = 0.0  # pruned weights: no cluster, no gradient
    p = SharedParam(w, 3, "linear")
    g = torch.randn(8, 16)
    (p(w) * g).sum().backward()
    want = torch.zeros(8).index_add_(0, p.index[w != 0], g[w != 0])
    assert torch.allclose(p.codebook.grad, want, atol=1e-6)
    assert bool((p(w)[w == 0] == 0).all()) and len(torch.unique(p(w)[w != 0])) <= 8


def test_cluster_point_follows_the_pruning_schedule():
    shared = {"fc1": LayerPlan(share_bits=4)}
    assert cluster_point(Plan(layers=shared), total=100) == 0.0  # nothing pruned: share from the start
    pruned = {"fc1": LayerPlan(share_bits=4, sparsity=0.9)}
    assert cluster_point(Plan(layers=pruned, schedule=Schedule("cubic", 0.0, 0.5)), 100) == 0.75
    assert cluster_point(Plan(layers=pruned), total=0) == 1.0  # post-training: at the end


# -- bit streams and the relative index -----------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_pack_bits_round_trips(bits):
    v = np.random.default_rng(bits).integers(0, 2**bits, 1001)
    packed = pack_bits(v, bits)
    assert packed.size == (1001 * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(packed, 1001, bits), v)


def test_relative_index_with_fillers():
    positions = np.array([0, 3, 40, 41])
    entries = relative_entries(positions, 3)  # filler 7: the gap of 36 zeros is 7+7+7+7+7 then 1
    assert entries.tolist() == [0, 2, 7, 7, 7, 7, 7, 1, 0]
    np.testing.assert_array_equal(decode_relative(entries, 3), positions)


# -- the ORT lowering ---------------------------------------------------------------------------------
def _shared_spec(model: nn.Module, bits: int, sparsity: float = 0.0) -> LoweringSpec:
    layers = {}
    for name in ("fc1", "fc2"):
        m = model.get_submodule(name)
        if sparsity:
            cut = m.weight.abs().flatten().kthvalue(int(sparsity * m.weight.numel())).values
            with torch.no_grad():
                m.weight[m.weight.abs() <= cut] = 0.0
        shared = share_weight(m, bits)
        record = shared.record()
        torch.nn.utils.parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
        layers[name] = LayerLowering(shared=record, sparse=sparsity > 0)
    return LoweringSpec(layers)


@pytest.mark.parametrize("bits,sparsity", [(4, 0.0), (3, 0.8), (8, 0.5)])
def test_shared_artifact_matches_torch_and_folds_at_load(backend, tmp_path, bits, sparsity):
    """ORT vs torch within 1e-5 (the same float32 weights rebuilt); after ORT's optimizer no rebuild op is
    left: the weights were folded into dense constants at session load."""
    torch.manual_seed(0)
    model = TwoLinear().eval()
    spec = _shared_spec(model, bits, sparsity)
    x = torch.randn(16, 64)
    art = backend.lower(model, (x[:1],), spec, tmp_path / "a")
    np.testing.assert_allclose(_run(backend, art, x), model(x).detach().numpy(), atol=1e-5, rtol=1e-5)
    assert not _optimized_ops(backend, art, tmp_path) & FOLD_OPS
    assert set(art.meta["compact_weights"]) == {"fc1", "fc2"}
    assert art.meta["entropy_coded_bytes_lzma"] > 0


def test_shared_dense_bytes_match_hand_computation(backend, tmp_path):
    """fc1 (64 x 32 = 2048 weights), 4-bit indices: 2048 * 4 / 8 = 1024 bytes + 16 float32 values."""
    torch.manual_seed(0)
    model = TwoLinear().eval()
    spec = _shared_spec(model, 4)
    art = backend.lower(model, (torch.randn(1, 64),), spec, tmp_path / "a")
    assert _layer_bytes(art.path, 0) == 2048 * 4 // 8 + 16 * 4
    assert art.meta["compact_weights"]["fc1"] == {
        "format": "dense",
        "index_bits": 0,
        "stored_bytes": 1088,
        "dense_bytes": 8192,
    }


def test_sparse_bitmask_bytes_match_hand_computation(backend, tmp_path):
    """A 2:4 pattern (half the weights): bitmask 2048 / 8 = 256 bytes + 1024 float32 nonzeros."""
    model = TwoLinear().eval()
    with torch.no_grad():
        model.fc1.weight.view(-1, 4)[:, :2] = 0.0
    spec = LoweringSpec({"fc1": LayerLowering(sparse=True)})
    art = backend.lower(model, (torch.randn(1, 64),), spec, tmp_path / "a")
    assert art.meta["compact_weights"]["fc1"]["format"] == "bitmask"
    assert _layer_bytes(art.path, 0) == 2048 // 8 + 1024 * 4
    x = torch.randn(8, 64)
    np.testing.assert_allclose(_run(backend, art, x), model(x).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_sparse_position_bytes_match_hand_computation(backend, tmp_path):
    """95% sparse: the smaller of the relative index at its best width r (entries counted by hand, fillers
    included) and the Golomb-Rice code at its best k (a unary bit per 2**k of each gap, a terminating bit,
    k low bits) + the nonzeros; at this sparsity the Rice code is the smaller."""
    torch.manual_seed(1)
    model = TwoLinear(512, 256).eval()
    with torch.no_grad():
        model.fc1.weight[torch.rand(256, 512) < 0.95] = 0.0
    flat = model.fc1.weight.detach().numpy().ravel()
    nnz = int((flat != 0).sum())
    gaps = np.diff(np.concatenate([[-1], np.flatnonzero(flat)])) - 1

    def relative(r: int) -> int:  # by hand: each gap g costs g // (2**r - 1) fillers + one entry
        return (int(len(gaps) + (gaps // (2**r - 1)).sum()) * r + 7) // 8

    def rice(k: int) -> int:
        return (int((gaps >> k).sum()) + nnz + 7) // 8 + (nnz * k + 7) // 8

    r = min(range(1, 9), key=relative)
    k = min(range(1, 9), key=rice)
    assert rice(k) < relative(r) < flat.size // 8
    spec = LoweringSpec({"fc1": LayerLowering(sparse=True)})
    art = backend.lower(model, (torch.randn(1, 512),), spec, tmp_path / "a")
    stored = art.meta["compact_weights"]["fc1"]
    assert stored["format"] == "rice" and stored["index_bits"] == k
    assert _layer_bytes(art.path, 0) == rice(k) + nnz * 4
    x = torch.randn(8, 512)
    np.testing.assert_allclose(_run(backend, art, x), model(x).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_rice_code_by_hand_and_round_trip():
    """Positions 0, 5, 6, 40 at k = 2: gaps 0, 4, 0, 33 -> high parts 0, 1, 0, 8 in unary (ones, then a
    zero), low parts 0, 0, 0, 1."""
    unary, low = rice_streams(np.array([0, 5, 6, 40]), 2)
    assert unary.tolist() == [0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    assert low.tolist() == [0, 0, 0, 1]
    rng = np.random.default_rng(0)
    for k in range(1, 9):
        positions = np.flatnonzero(rng.random(3000) < 0.07)
        np.testing.assert_array_equal(decode_rice(*rice_streams(positions, k), k), positions)


def test_95_percent_sparse_layer_is_5x_smaller_than_its_dense_twin(backend, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512)).eval()
    with torch.no_grad():
        model[0].weight[torch.rand(512, 512) < 0.95] = 0.0
    x = (torch.randn(1, 512),)
    dense = backend.lower(model, x, {}, tmp_path / "dense")
    sparse = backend.lower(model, x, LoweringSpec({"0": LayerLowering(sparse=True)}), tmp_path / "sparse")
    assert dense.size_bytes >= 5 * sparse.size_bytes, (dense.size_bytes, sparse.size_bytes)


def test_sparse_storage_is_kept_dense_where_it_would_not_pay(backend, tmp_path):
    model = TwoLinear().eval()  # no zeros: the float32 weight is the smallest
    art = backend.lower(
        model, (torch.randn(1, 64),), LoweringSpec({"fc1": LayerLowering(sparse=True)}), tmp_path
    )
    assert art.meta["compact_weights"]["fc1"]["format"] == "dense"
    assert not [i for i in onnx.load(str(art.path)).graph.initializer if i.name.startswith("cw")]


# -- refusals -----------------------------------------------------------------------------------------
def test_bits_and_weight_sharing_on_one_layer_are_refused():
    with pytest.raises(
        ConfigError, match=r"layers\.fc1\.share_bits: share_bits 4 needs bits 32 .* got bits 8"
    ):
        LayerPlan(bits=8, share_bits=4).validate("layers.fc1")


class Doubled(nn.Module):
    """A Linear whose weight the graph computes (2 * w): no initializer holds the shared weight itself."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return nn.functional.linear(x, 2 * self.fc.weight, self.fc.bias)


def test_a_weight_the_backend_cannot_fold_is_refused_with_one_line(backend, tmp_path):
    model = Doubled().eval()
    record = SharedWeight(2, np.linspace(-1, 1, 4).astype(np.float32), np.zeros((4, 8), np.int64))
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(record.weight()))
    spec = LoweringSpec({"fc": LayerLowering(shared=record)})
    with pytest.raises(BackendError, match=r"^layer 'fc': its weight is not a constant initializer") as err:
        backend.lower(model, (torch.randn(1, 8),), spec, tmp_path)
    assert "\n" not in str(err.value)


def test_a_backend_without_shared_weights_is_refused_before_the_first_trial(tmp_path):
    from autocompress.backends import BACKENDS
    from autocompress.search.run_setup import _check_shared_weights
    from autocompress.space import SearchSpace

    space = SearchSpace.from_dict({"bits": {"fixed": 32}, "share_bits": {"choices": [0, 4]}}, "s.yaml")
    _check_shared_weights(space, BACKENDS.get("onnxruntime"))  # accepted
    with pytest.raises(
        ConfigError, match=r"^s\.yaml: share_bits: 4 is not allowed by backend 'torch'"
    ) as err:
        _check_shared_weights(space, BACKENDS.get("torch"))
    assert "\n" not in str(err.value)


# -- registration: probe, profile row, report column ----------------------------------------------------
def test_registered_with_probe_profile_row_and_report_column():
    from autocompress.inventory import build_inventory
    from autocompress.search.latency_profile import layer_settings
    from autocompress.space import SearchSpace

    spec = TECHNIQUES.get("weight_sharing")
    assert [d.prefix for d in spec.dims] == ["share", "share_init"]
    assert "share_bits" in [d.name for d in TECHNIQUES.dims() if d.report]
    space = SearchSpace.from_dict({"share_bits": {"choices": [0, 3, 5]}, "share_init": {"fixed": "density"}})
    model = TwoLinear()
    info = build_inventory(model, (torch.randn(1, 64),))[0]
    params = space.layer_params(info)
    (probe,) = spec.probes(params, info, {})
    assert (probe.dim, probe.value, probe.layer) == (
        "share_bits",
        3,
        {"share_bits": 3, "share_init": "density"},
    )
    assert ("shared 8 values", {"share_bits": 3, "share_init": "density"}) in layer_settings(space, info)


def test_sparse_relative_index_of_one_bit_loads_and_matches(backend, tmp_path):
    """Kept weights in one run (every gap 0): the relative index at r = 1 beats the bitmask and the Rice
    code, nodes counted; its one-bit stream unpacks as uint8 flags and must still compare as int64 (ORT
    refused the graph: 'Type parameter (T) of Optype (Less) bound to different types')."""
    torch.manual_seed(0)
    model = TwoLinear(512, 64).eval()
    with torch.no_grad():
        model.fc1.weight.view(-1)[20000:] = 0.0
    spec = LoweringSpec({"fc1": LayerLowering(sparse=True)})
    art = backend.lower(model, (torch.randn(1, 512),), spec, tmp_path / "a")
    stored = art.meta["compact_weights"]["fc1"]
    assert stored["format"] == "relative" and stored["index_bits"] == 1
    assert _layer_bytes(art.path, 0) == 20000 // 8 + 20000 * 4
    x = torch.randn(8, 512)
    np.testing.assert_allclose(_run(backend, art, x), model(x).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_a_small_layer_keeps_the_format_whose_rebuild_is_smaller(backend, tmp_path):
    """200 weights, 90% pruned: the Rice code's streams would be a few bytes smaller than the bitmask's 25,
    its rebuild nodes several hundred bytes larger: the bitmask is written."""
    torch.manual_seed(0)
    model = TwoLinear(20, 10).eval()
    with torch.no_grad():
        model.fc1.weight[torch.rand(10, 20) < 0.9] = 0.0
    spec = LoweringSpec({"fc1": LayerLowering(sparse=True)})
    art = backend.lower(model, (torch.randn(1, 20),), spec, tmp_path / "a")
    assert art.meta["compact_weights"]["fc1"]["format"] == "bitmask"
