"""Empirical bias correction of static int8 convolutions: the quantized graph's per-channel output means
set back to the float graph's, on calibration samples.

Rounding weights and activations to int8 shifts the mean of a convolution's output channels, and the
shifts add up through a deep, narrow network (MobileNetV2's depthwise convs lose a point or more of
accuracy to it). Post-training toolkits correct it (NNCF's default ``quantize`` does: on the ImageNet
MobileNetV2 fine-tuned on MNIST, its accuracy drop with bias correction was a fifth of the drop
without). Here, in graph order, each static int8 ``Conv`` with a bias gets

    bias += mean_float(output) - mean_quantized(output)      (per output channel)

where the means run over the calibration samples and the spatial positions, the float figures come
from the float graph (with the weights before rounding, where a post-training plan rounded them in torch:
``ort_quantize._unrounded``), and the quantized ones from the quantized graph with every earlier correction
already in (so a layer corrects what its own rounding adds, not its inputs' shift again). Where ORT
folded a Relu / Relu6 into the activation's int8 range, the means compared are the clipped outputs
(what the next layer reads), and one step removes most but not all of the shift (the clip is not
linear); a second step measured no better on MobileNetV2.

The corrected biases are remembered (in the process, the last :data:`MEMO_SIZE` graphs) by the
quantized graph before correction, the float graph, the samples and the nodes: a trial that lowers
what the latency profile lowered (the one-shot int8 plan and the profile's whole-model row) writes them
back without measuring again (on MobileNetV2 the correction is 40 of a 47 s lowering).

The quantized graph is run with the corrected biases as graph inputs (one session for all the layers;
ORT then runs those convs unfused, dequantized, which computes the same values within float rounding),
and the final biases are written back as the int32 initializers that ``QLinearConv`` reads: the
artifact's kernels are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_rewrite import int32_grid

SAMPLES = 64  # calibration samples the means are taken over
MEMO_SIZE = 4  # corrected graphs remembered in the process
_MEMO: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()  # memo key -> {conv output: bias}


def _memo_key(qmodel: onnx.ModelProto, float_bytes: bytes, feeds, nodes) -> str:
    """What the corrected biases depend on: both graphs, the samples, the nodes corrected."""
    h = hashlib.sha256(qmodel.SerializeToString())
    h.update(hashlib.sha256(float_bytes).digest())
    for feed in feeds:
        for k in sorted(feed):
            h.update(k.encode())
            h.update(np.ascontiguousarray(feed[k]).tobytes())
    h.update(json.dumps(sorted(nodes)).encode())
    return h.hexdigest()


def _bias_sources(model: onnx.ModelProto, nodes: set[str]) -> dict[str, tuple[onnx.NodeProto, object]]:
    """``{conv output: (conv node, its bias: (int32 initializer, scale) or a float initializer)}`` of
    the Conv nodes named in ``nodes`` whose weight is dequantized int8 and whose bias is a constant."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, tuple[onnx.NodeProto, object]] = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name not in nodes or len(node.input) < 3:
            continue
        wq = producer.get(node.input[1])
        if wq is None or wq.op_type != "DequantizeLinear":
            continue
        if node.input[2] in inits:
            out[node.output[0]] = (node, ("float", inits[node.input[2]]))
            continue
        dq = producer.get(node.input[2])
        if (
            dq is not None
            and dq.op_type == "DequantizeLinear"
            and dq.input[0] in inits
            and dq.input[1] in inits
        ):
            out[node.output[0]] = (node, ("int32", inits[dq.input[0]], inits[dq.input[1]]))
    return out


def _as_consumed(model: onnx.ModelProto, outputs: list[str]) -> dict[str, str]:
    """``{conv output: the tensor its consumers read}``: the output of the QuantizeLinear ->
    DequantizeLinear pair after it where there is one. ORT's quantizer drops a Relu / Clip after a
    quantized Conv (the activation's uint8 range clips instead) and gives the Conv the activation's
    output name, so the float graph's tensor of that name is clipped and the Conv's own output is not:
    the pair's output is."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out = {}
    for name in outputs:
        out[name] = name
        q = [n for n in consumers.get(name, []) if n.op_type == "QuantizeLinear"]
        if len(q) == 1:
            dq = [n for n in consumers.get(q[0].output[0], []) if n.op_type == "DequantizeLinear"]
            if len(dq) == 1:
                out[name] = dq[0].output[0]
    return out


def _float_bias(source) -> np.ndarray:
    if source[0] == "float":
        return numpy_helper.to_array(source[1]).astype(np.float32)
    q, scale = numpy_helper.to_array(source[1]), numpy_helper.to_array(source[2])
    return (q.astype(np.float64) * scale).astype(np.float32)


def _channel_means(outputs: Sequence[np.ndarray]) -> np.ndarray:
    """Per-channel (axis 1) mean over every sample and position."""
    stacked = np.concatenate([o.reshape(o.shape[0], o.shape[1], -1) for o in outputs], axis=0)
    return stacked.mean(axis=(0, 2))


def _session(model: onnx.ModelProto, outputs: list[str]):
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    for name in outputs:
        if name not in known:
            m.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def correct_biases(
    qmodel: onnx.ModelProto, float_path: Path, feeds: list[dict[str, np.ndarray]], nodes
) -> int:
    """Correct, in place, the biases of the static int8 Conv nodes ``nodes`` of ``qmodel`` (see the
    module doc) on ``feeds`` (one dict of graph inputs per sample batch); the number corrected.

    A Conv whose output the float graph does not have under the same name is left as it is.
    """
    float_bytes = Path(float_path).read_bytes()
    float_model = onnx.load_from_string(float_bytes)
    float_names = {o for n in float_model.graph.node for o in n.output}
    sources = {k: v for k, v in _bias_sources(qmodel, set(nodes)).items() if k in float_names}
    if not sources or not feeds:
        return 0
    key = _memo_key(qmodel, float_bytes, feeds, nodes)
    if key in _MEMO:  # this graph was corrected before in the process: the same biases
        _MEMO.move_to_end(key)
        for name, bias in _MEMO[key].items():
            _write_bias(sources[name][1], bias)
        return len(_MEMO[key])
    biases = _measure(qmodel, float_model, sources, feeds)
    for name, bias in biases.items():
        _write_bias(sources[name][1], bias)
    _MEMO[key] = biases
    while len(_MEMO) > MEMO_SIZE:
        _MEMO.popitem(last=False)
    return len(biases)


def _measure(qmodel: onnx.ModelProto, float_model: onnx.ModelProto, sources: dict, feeds) -> dict:
    """``{conv output: corrected float bias}`` of ``sources``, layer by layer in graph order."""
    order = list(sources)  # graph order: a correction is measured with every earlier one in
    seen = _as_consumed(qmodel, order)
    f_sess = _session(float_model, order)
    f_runs = [f_sess.run(order, feed) for feed in feeds]
    float_means = {name: _channel_means([r[i] for r in f_runs]) for i, name in enumerate(order)}
    del f_sess, f_runs

    # one session: every corrected bias is a graph input
    trial = onnx.ModelProto()
    trial.CopyFrom(qmodel)
    biases: dict[str, np.ndarray] = {}
    for i, name in enumerate(order):
        node = next(n for n in trial.graph.node if n.output and n.output[0] == name)
        feed_name = f"bias_correction_{i}"
        biases[feed_name] = _float_bias(sources[name][1])
        node.input[2] = feed_name
        trial.graph.input.append(
            helper.make_tensor_value_info(feed_name, onnx.TensorProto.FLOAT, [len(biases[feed_name])])
        )
    q_sess = _session(trial, [seen[n] for n in order])
    for i, name in enumerate(order):
        key = f"bias_correction_{i}"
        outs = [q_sess.run([seen[name]], {**feed, **biases})[0] for feed in feeds]
        delta = float_means[name] - _channel_means(outs)
        if delta.shape == biases[key].shape:
            biases[key] = (biases[key] + delta).astype(np.float32)
    return {name: biases[f"bias_correction_{i}"] for i, name in enumerate(order)}


def _write_bias(source, bias: np.ndarray) -> None:
    """Store ``bias`` where the Conv reads it: the float initializer, or the int32 one at its scale."""
    if source[0] == "float":
        source[1].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), source[1].name))
        return
    scale = numpy_helper.to_array(source[2])
    q = int32_grid(bias, scale)  # saturates where a corrected bias no longer fits (not seen in practice)
    source[1].CopyFrom(numpy_helper.from_array(q, source[1].name))
