"""The peers' one-call answers as a study's first trials: int8 everywhere, post-training.

What every quantization toolkit does first, in one call and without training: ONNX Runtime's
``quantize_static`` (QDQ, int8 weights per channel, activation ranges calibrated on data; NNCF's
``quantize`` and Olive's CPU post-training defaults do the same to a CNN, depthwise convs included) and
``quantize_dynamic`` (int8 weights, activations quantized at run time: MatMul/Gemm, and the embedding
tables' ``Gather``). A study runs them as its first trials, right after the baseline and before the
applicability check and the profile (:func:`one_shot_plans` without a profile, enqueued by
:mod:`.first_trials`), each marked post-training (the user attr :data:`POST_TRAINING`: the trial's plan
has 0 fine-tune steps), so that within minutes of the start the front holds what the one-liner would
give, measured on the device like every trial. The profile's plans (:func:`.planned_starts.make_plans`)
skip the structures these trials measured.

* ``int8 static everywhere``: every layer whose domain offers 8-bit static (convs, Linear layers, and
  the embedding tables where the backend stores them below float, weight-only) at 8 bits, static.
* ``int8 dynamic everywhere``: every Linear layer whose domain offers dynamic int8 at 8 bits, dynamic;
  embedding tables at 8 bits (weight-only, what ``quantize_dynamic`` does to a ``Gather``); convs stay
  float. Planned only where the dynamic layers carry at least :data:`LINEAR_SHARE` of the model's MACs
  (a Linear/MatMul-heavy model): on a CNN it would be the float model with an int8 classifier.

Planned from a profile, the profile's whole-model rows (``all 8-bit``, ``all 8-bit dynamic``:
:func:`uniform_layers` is both) are the plans' predictions; a plan whose row was not measured is
predicted as the float model (``unprofiled``). Planned first, before any profile, they have none.
"""

from __future__ import annotations

from .planner import Planned

POST_TRAINING = "post_training"  # user attr of an enqueued trial that compresses without fine-tuning
LINEAR_SHARE = 0.5  # dynamic int8 is planned where its layers carry at least this share of the MACs
STATIC, DYNAMIC = "int8 static everywhere", "int8 dynamic everywhere"
PROFILE_LABELS = {STATIC: "all 8-bit", DYNAMIC: "all 8-bit dynamic"}  # the profile's whole-model rows


def _int8(space, info, mode: str) -> dict | None:
    """The layer's int8 fields in ``mode`` (``static`` or ``dynamic``), None where its domain has none."""
    params = space.layer_params(info)
    if 8 not in {int(v) for v in params["bits"].values()}:
        return None
    if mode not in [str(v) for v in params["quant_mode"].values()]:
        return None
    grid = space.allowed_by_kind.get("quant_granularity", {}).get(info.kind, ())
    extra = {"quant_granularity": grid[0]} if grid and "channel" not in grid else {}
    return {"bits": 8, **({"quant_mode": "dynamic"} if mode == "dynamic" else {}), **extra}


def uniform_layers(space, inventory) -> list[tuple[str, dict[str, dict]]]:
    """``(name, {layer: fields})`` of the static and the dynamic int8-everywhere plans the domains allow
    (the dynamic one only where some layer takes dynamic int8)."""
    static = {i.name: f for i in inventory if (f := _int8(space, i, "static"))}
    dynamic = {
        i.name: f
        for i in inventory
        if (f := _int8(space, i, "static" if i.kind == "Embedding" else "dynamic"))
    }
    out = [(STATIC, static)] if static else []
    if any(f.get("quant_mode") == "dynamic" for f in dynamic.values()):
        out.append((DYNAMIC, dynamic))
    return out


def linear_heavy(inventory, layers: dict[str, dict]) -> bool:
    """Whether the dynamic int8 layers of ``layers`` carry :data:`LINEAR_SHARE` of the model's MACs."""
    total = sum(i.macs for i in inventory if i.kind != "Embedding")
    dynamic = sum(i.macs for i in inventory if layers.get(i.name, {}).get("quant_mode") == "dynamic")
    return total > 0 and dynamic >= LINEAR_SHARE * total


def whole_row(profile: dict, name: str) -> dict | None:
    """The profile's measured whole-model row of the one-shot plan ``name`` (None: not measured)."""
    row = next(
        (r for r in profile.get("rows", []) if r["layer"] == "*" and r["setting"] == PROFILE_LABELS[name]),
        None,
    )
    return row if row is not None and row.get("status") == "ok" and row.get("speedup") else None


def _predicted(row: dict | None, baseline: dict) -> dict:
    """The plan's prediction: its whole-model profile row, or the float model when none was measured."""
    if row is not None:
        keys = ("metric_drop", "speedup", "size_ratio", "latency_ms", "size_bytes")
        return {**{k: row[k] for k in keys}, "budget": None}
    return {
        "metric_drop": 0.0,
        "speedup": 1.0,
        "size_ratio": 1.0,
        "latency_ms": baseline["latency_ms"],
        "size_bytes": baseline["size_bytes"],
        "budget": None,
        "unprofiled": True,
    }


def one_shot_plans(space, inventory, profile: dict | None = None) -> list[Planned]:
    """The post-training int8-everywhere plans (static, then dynamic where the model is Linear-heavy).

    ``profile``: the latency profile, whose whole-model rows predict the plans; None (the study's first
    trials, planned before any profile): no prediction (``predicted`` is empty)."""
    out = []
    for name, layers in uniform_layers(space, inventory):
        if name == DYNAMIC and not linear_heavy(inventory, layers):
            continue
        predicted = _predicted(whole_row(profile, name), profile["baseline"]) if profile is not None else {}
        choices = [f"{name} ({len(layers)} layers), post-training"]
        out.append(
            Planned(name, {k: dict(v) for k, v in layers.items()}, predicted, choices, post_training=True)
        )
    return out
