"""Weight fake quantization with straight-through gradients (QAT), and learned step sizes (LSQ).

Grids (``bits`` from 2 to 8):

- ``symmetric``: integers in ``[-qmax, qmax]`` with ``qmax = 2**(bits-1) - 1``, zero point 0,
  scale ``amax / qmax`` (the rule ONNX Runtime uses for symmetric weights);
- ``asymmetric``: integers in ``[-2**(bits-1), 2**(bits-1) - 1]`` with an integer zero point,
  scale ``(max - min) / (qmax - qmin)`` over the range widened to include 0 (so 0 is exact).

Granularity ``channel`` gives one scale (and zero point) per output channel, ``tensor`` one for the
whole weight. ``reduce_range`` drops one bit of an 8-bit grid (CPUs without VNNI can saturate the
int16 accumulation of u8*s8 products; ORT's docs recommend it there).

Embedding tables (``nn.Embedding``) take ``bits``, ``quant_scheme`` and ``quant_granularity`` like the
matmul layers, weight-only: ``channel`` is one scale per row (axis 0, one token's vector), and the full
8-bit grid is kept (a lookup accumulates nothing, so ``reduce_range`` does not apply).

:func:`record_weight_quant` returns the integers, scales and zero points the fine-tuned weight
sits on (a :class:`~autocompress.lowering.WeightQuant`); the pipeline puts them in the lowering spec
and a backend writes exactly these into its artifact. With LSQ the scale is a trained parameter,
which cannot be recomputed from the weight afterwards: the record is the only faithful source.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, TechniqueError
from ..lowering import (  # noqa: F401 - re-exported: the grid helpers live in the neutral lowering module
    CALIBRATIONS,
    FLOAT_BITS,
    QUANT_MODES,
    LayerLowering,
    WeightQuant,
    channel_scale,
    qmax_for,
    quantize_weight,
)
from ..registry import LAYER_KINDS, TECHNIQUES, Dim, Probe, TechniqueSpec
from .fake_quant import (  # noqa: F401 - re-exported
    GRANULARITIES,
    SCHEMES,
    FakeHalf,
    FakeQuant,
    LSQFakeQuant,
    fake_quant,
    int_range,
    weight_qparams,
)

RECURRENT = (nn.LSTM, nn.GRU)


def add_fake_quant(
    module: nn.Module,
    bits: int,
    reduce_range: bool = False,
    scheme: str = "symmetric",
    granularity: str = "channel",
    lsq: bool = False,
) -> None:
    """Fake-quantize ``module.weight`` at ``bits`` (after any mask already registered).

    2 to 8 bits: integer grid of the given scheme and granularity (LSQ: learned scale); 16: float16.
    """
    if bits == 16:
        fq: nn.Module = FakeHalf()
    elif lsq:
        fq = LSQFakeQuant(module.weight.detach(), bits, reduce_range, scheme, granularity)
    else:
        fq = FakeQuant(bits, reduce_range, scheme, granularity)
    parametrize.register_parametrization(module, "weight", fq)


def record_weight_quant(module: nn.Module, keep_source: bool = False) -> WeightQuant | None:
    """The integer form of a fake-quantized weight (None: not integer-quantized); with ``keep_source``
    also the float weight it was rounded from (after any mask).

    Call before the parametrizations are removed.
    """
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations["weight"]
    last = plist[-1]
    if not isinstance(last, FakeQuant):
        return None
    with torch.no_grad():
        w = plist.original
        for p in list(plist)[:-1]:
            w = p(w)
        record = last.integers(w)
    return dataclasses.replace(record, source=w.detach().float().numpy().copy()) if keep_source else record


# -- the technique: per-layer fields, fake quantization (pipeline order 40), what the backend gets ----
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8, 16, FLOAT_BITS)  # 16 = float16; 32 = float


def _integer(values: dict) -> bool:  # float and float16 layers have no integer grid: not asked
    return int(values["bits"]) < 16


def check_layer(lp, where: str) -> None:
    if lp.quant_mode == "dynamic" and lp.bits != 8:
        raise ConfigError(
            f"quant_mode 'dynamic' needs bits 8 (int8 weights), got bits {lp.bits}",
            field=f"{where}.quant_mode",
        )


def check_space(model, source: str) -> None:
    if set(model.quant_mode.values()) == {"dynamic"} and 8 not in model.bits.values():
        raise ConfigError(
            "quant_mode 'dynamic' needs bits 8 (int8 weights)", source=source, field="quant_mode"
        )


def _fake_quantize(build) -> dict[str, str]:
    """Fake quantization of each layer below float bits (dynamic int8: Linear only; LSTM/GRU apart);
    returns module -> quant mode."""
    modes = {}
    for name, m in build.modules.items():
        layer = build.origin[name]
        lp, bits = build.plan.layer(layer), build.layer_bits[name]
        if lp.quant_mode == "dynamic" and not isinstance(m, nn.Linear):
            raise TechniqueError(
                f"layers.{layer}.quant_mode: dynamic quantization applies to Linear, LSTM and GRU "
                f"layers, not {type(m).__name__} ({name!r}); use quant_mode 'static'"
            )
        if bits < FLOAT_BITS:
            add_fake_quant(
                m,
                bits,
                reduce_range=build.reduce_range and bits == 8 and not isinstance(m, nn.Embedding),
                scheme=lp.quant_scheme,
                granularity=lp.quant_granularity,
                lsq=build.plan.lsq,
            )
            modes[name] = lp.quant_mode
    return modes


def _recurrent_dynamic(model: nn.Module, plan) -> dict[str, int]:
    """LSTM/GRU layers the plan quantizes (dynamic int8 only): name -> 8.

    Their weights are not fake-quantized during fine-tuning: the backend quantizes them (post-training).
    """
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, RECURRENT) or name not in plan.layers or plan.layers[name].bits == FLOAT_BITS:
            continue
        if plan.layers[name].quant_mode != "dynamic":
            raise TechniqueError(
                f"layers.{name}: {type(m).__name__} layers are quantized dynamically only "
                f"(quant_mode 'dynamic', bits 8) or kept float (bits 32)"
            )
        out[name] = 8
    return out


def _note_recurrent_skips(model: nn.Module, plan, notes: dict[str, str]) -> None:
    """Low rank and sparsity planned on an LSTM/GRU are not applied (its gates take dynamic int8 only):
    say so in the notes rather than ignore the plan silently."""
    for name, m in model.named_modules():
        lp = plan.layers.get(name) if isinstance(m, RECURRENT) else None
        if lp is None:
            continue
        skipped = ["low rank"] if lp.rank_ratio < 1.0 else []
        if lp.sparsity_kind == "2:4" or lp.sparsity > 0:
            skipped.append(f"{lp.sparsity_kind} sparsity")
        if skipped:
            notes[name] = (
                f"{' and '.join(skipped)} not applied: {type(m).__name__} layers take dynamic int8 only"
            )


def quantize_step(build) -> None:
    """Fake quantization for the fine-tune; at the end, the lowering spec of every layer (bits, static or
    dynamic, the integers the weight was trained on)."""
    plan = build.plan
    build.layer_bits.update({name: plan.layer(layer).bits for name, layer in build.layers().items()})
    modes = _fake_quantize(build)
    recurrent = _recurrent_dynamic(build.student, plan)
    _note_recurrent_skips(build.student, plan, build.notes)
    build.layer_bits.update(recurrent)
    build.calibration = plan.calibration

    def finish() -> None:
        for name, bits in build.layer_bits.items():
            mode = "dynamic" if name in recurrent else modes.get(name, "static")
            # post-training, the student's weights are the teacher's rounded: the backend's bias
            # correction (static 5-8-bit layers) compares against the weights before rounding, else it
            # cannot see the shift the rounding adds (docs/methodology.md: EfficientNet-Lite0 on MNIST,
            # int8 everywhere, 0.9397 against 0.9716 of 0.9735, python benchmarks/real_models.py)
            source = build.total == 0 and mode == "static" and 5 <= bits <= 8
            module = build.modules.get(name)
            record = record_weight_quant(module, source) if module is not None else None
            build.lowering[name] = LayerLowering(bits, mode, record)

    build.finish.append(finish)


BIT_NAMES = {16: "fp16", 8: "int8"}


def probes(params: dict, info, allowed: dict) -> list[Probe]:
    """Applicability: each bit width below float (on the grid the backend runs), and dynamic int8."""
    grid = allowed.get("quant_granularity", {}).get(info.kind, ())
    extra = {"quant_granularity": grid[0]} if grid and "channel" not in grid else {}
    bits = sorted({int(b) for b in params["bits"].values() if int(b) < FLOAT_BITS})
    out = [
        Probe(("bits", b), BIT_NAMES.get(b, f"int{b}"), "bits", b, f"bits {b}", {"bits": b, **extra})
        for b in bits
    ]
    if 8 in bits and "dynamic" in [str(v) for v in params["quant_mode"].values()]:
        layer = {"bits": 8, "quant_mode": "dynamic", **extra}
        out.append(
            Probe(("dynamic",), "dynamic int8", "quant_mode", "dynamic", "bits 8, quant_mode dynamic", layer)
        )
    return out


def size_floor(params: dict, info, floor: dict) -> None:
    floor["bits"] = min(int(b) for b in params["bits"].values())


SPEC = TechniqueSpec(
    "quantize",
    dims=(
        Dim(
            "bits",
            FLOAT_BITS,
            cast=int,
            choices=SUPPORTED_BITS,
            space_rule="is not an allowed bit width",
            order=10,
            kinds=LAYER_KINDS,  # embedding tables too (weight-only)
        ),
        Dim(
            "quant_scheme",
            "symmetric",
            short="qscheme",
            choices=SCHEMES,
            order=60,
            asked=_integer,
            report=False,
            kinds=LAYER_KINDS,
        ),
        Dim(
            "quant_granularity",
            "channel",
            short="qgranularity",
            choices=GRANULARITIES,
            order=70,
            asked=_integer,
            report=False,
            kinds=LAYER_KINDS,
        ),
        Dim(
            "quant_mode",
            "static",
            short="qmode",
            choices=QUANT_MODES,
            order=80,
            asked=lambda values: int(values["bits"]) == 8,  # dynamic needs int8 weights
            report=False,
            # dynamic int8 is a Linear layer's (ORT's MatMulInteger); a conv's int8 is static
            values_by_kind=(("Conv1d", ("static",)), ("Conv2d", ("static",))),
        ),
    ),
    settings=(Dim("calibration", "minmax", short="quant.calibration", choices=CALIBRATIONS),),
    steps=((40, quantize_step),),
    check_layer=check_layer,
    check_space=check_space,
    probes=probes,
    collapse={"bits": ("bits", FLOAT_BITS), "quant_mode": ("quant_mode", "static")},
    size_floor=size_floor,
)
TECHNIQUES.add(SPEC.name, SPEC)
