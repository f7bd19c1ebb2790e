"""The measured latency profile: per layer (or group of the space's ``groups``, its members changed
together) and per setting the space offers, the whole artifact's latency, size and metric when only
that layer or group changes.

Each (layer, setting) is applied to the teacher alone through :func:`~autocompress.pipeline.compress`
(no fine-tuning), lowered by the study's backend and scored on the eval split (the accuracy profile:
the same drop ``autocompress inspect`` measures). Artifacts of the same structure (the backend's
fingerprint: a rank ratio that cannot reduce the MACs, two sparsity levels rounding to the same
widths) are timed once; a structure equal to the baseline's is not timed at all (speedup 1). New
structures are timed side by side with the baseline artifact in short shared sessions
(:meth:`Backend.measure_group`), and every pair goes to the run's latency cache (a trial of the same
structure reuses it, and a profile of the same model on the same device finds its pairs there).

Settings (from the layer's domains, after the applicability exclusions): every bit width below float
(8-bit static, and dynamic where ``quant_mode`` allows it), structured sparsity at :data:`LEVELS` inside
the sparsity domain, the rank ratio at :data:`LEVELS` inside its domain (the space's first rank mode),
weight sharing at the fewest shared values the space allows, each depthwise-separable multiplier on the
standard convs with a kernel above 1x1, plus the uniform plans "every layer 8-bit" (static, dynamic):
int8 pays only where activations stay int8 between layers, which no single-layer row can show.
Unstructured and 2:4 masks keep the dense kernels: not profiled. Every unit's 8-bit row (its int8
sensitivity) comes first; one-unit rows are lowered without bias correction, whole-model rows with it.

Identical blocks are profiled once: a row whose change is the same setting on the same structural role
(:mod:`.roles`: the same part of identical blocks, e.g. every encoder layer's ``intermediate.dense``; for
a group, each member's role) as a row measured before is not lowered again but copies that row's
figures (``role_of`` names it): the latency and size are the structure's; the metric drop is the first
member's, an estimate for the others (the planned trials measure theirs). The profile's cost grows with
the model's distinct structure, not its depth, and its budget covers every role sooner.

Cost: wall seconds and trial-equivalents (seconds / the run's per-trial estimate). Layers go largest
first (MACs); the profile stops at ``budget_trials`` trial-equivalents (the rows not measured say so). The result is ``latency_profile.json`` in the run folder, keyed by the teacher's
weights, the backend's timing identity and the eval subset: rows already there are reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..context import RunContext
from ..deadline import setup_over
from ..faults import crash_point
from ..pipeline import compress
from ..plan import LayerPlan, Plan
from ..rundir import LATENCY_PROFILE, write_json
from ..scratch import scratch_dir
from .costs import profile_line
from .profile_settings import LEVELS, _items, layer_settings, uniform_settings, units  # noqa: F401
from .roles import role_key, structural_roles

CHUNK = 8  # artifacts timed side by side with the baseline in one session
TIMING = {"warmup_s": 0.05, "min_s": 0.15, "max_s": 0.6, "target_rel_ci": 0.03}
BUDGET_TRIALS = 2.0  # the profile stops past this many trial-equivalents
# what a row of one structural role copies from the row measured for it (.roles)
SHARED = (
    "status",
    "note",
    "fingerprint",
    "metric",
    "metric_drop",
    "size_bytes",
    "size_ratio",
    "speedup",
    "latency_ms",
)


def profile_key(ctx: RunContext) -> str:
    """The model, the device's timing identity and the eval subset: what makes a row reusable."""
    from ..tasks.base import weights_hash

    blob = {
        "teacher": weights_hash(ctx.teacher),
        "timing": ctx.backend.timing_identity(),
        "capabilities": ctx.backend.capabilities(),
        "eval_samples": ctx.eval_limit(),
        "inputs": [list(x.shape) for x in ctx.task.example_inputs()],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _row_head(layer: str, label: str, layers: dict[str, dict]) -> dict:
    """What names a profile row: its unit (a layer, a group or ``*``), setting and values; a group's row
    also lists its ``members`` (changed as one)."""
    row = {"layer": layer, "setting": label, "values": layers.get(layer, layers)}
    if layer != "*" and layer not in layers:
        row["members"] = sorted(layers)
    return row


class _Profiler:
    """One profiling pass: lower each item, group equal structures, time new ones in shared sessions."""

    def __init__(self, ctx: RunContext, tmp: Path, log):
        self.ctx, self.tmp, self.log = ctx, tmp, log
        self.base_art = ctx.baseline_artifact()
        self.base_fp = ctx.backend.fingerprint(self.base_art)
        self.known: dict[str, dict] = {}  # fingerprint -> latency fields already measured or cached
        self.pending: list[tuple[dict, object, str]] = []  # rows waiting for their timing session
        self.lowerings = self.timed = self.cache_hits = 0

    def row(self, layer: str, label: str, layers: dict[str, dict]) -> dict:
        ctx = self.ctx
        plan = Plan(layers={k: LayerPlan(**v) for k, v in layers.items()}, epochs=0, seed=ctx.config.seed)
        row = _row_head(layer, label, layers)
        try:
            out = compress(
                ctx.task,
                ctx.teacher,
                plan,
                reduce_range=ctx.backend.reduce_range,
                round_to=ctx.backend.preferred_channel_multiple,
            )
            # one-unit rows: no bias correction (a full-graph pass per int8 conv and calibration batch)
            spec = out.lowering if layer == "*" else replace(out.lowering, bias_correction=False)
            art = ctx.lower(out.model, self.tmp / f"{len(self.pending)}-{self.lowerings}", spec)
        except Exception as exc:  # the applicability check let it through: the profile says why
            return {**row, "status": "fails", "note": f"{type(exc).__name__}: {str(exc)[:200]}"}
        self.lowerings += 1
        fp = ctx.backend.fingerprint(art)
        base = ctx.baseline
        metric = ctx.score(art)
        row.update(
            status="ok",
            note="; ".join(f"{k}: {out.notes[k]}" for k in layers if k in out.notes)[:300]
            if layer not in layers
            else out.notes.get(layer, ""),
            fingerprint=fp,
            metric=metric,
            metric_drop=(base["metric"] - metric) * ctx.metric.sign,
            size_bytes=art.size_bytes,
            size_ratio=base["size_bytes"] / art.size_bytes,
        )
        if fp is not None and fp == self.base_fp:
            row.update(speedup=1.0, latency_ms=base["latency_ms"], timed="same structure as the baseline")
        elif fp is not None and fp in self.known:
            row.update(self.known[fp], timed="same structure as an earlier row")
        elif (hit := self._cached(fp)) is not None:
            self.known[fp] = hit
            row.update(hit, timed="latency cache")
        else:
            self.pending.append((row, art, fp))
            if len({p[2] for p in self.pending}) >= CHUNK:
                self.flush()
            return row
        shutil.rmtree(art.path.parent, ignore_errors=True)
        return row

    def _key(self, fp: str | None) -> str | None:
        cache = self.ctx.latency_cache
        if cache is None or fp is None or self.base_fp is None:
            return None
        return cache.key(self.ctx.backend, [fp, self.base_fp])

    def _cached(self, fp: str | None) -> dict | None:
        key = self._key(fp)
        hit = self.ctx.latency_cache.get(key) if key is not None else None
        if hit is None or not hit.get("reference"):
            return None
        self.cache_hits += 1
        return self._fields(hit["stats"]["median_ms"], hit["reference"]["median_ms"])

    def _fields(self, median_ms: float, ref_ms: float) -> dict:
        speedup = ref_ms / median_ms
        return {"speedup": speedup, "latency_ms": self.ctx.baseline["latency_ms"] / speedup}

    def flush(self) -> None:
        """Time the pending structures (one artifact per fingerprint) beside the baseline."""
        if not self.pending:
            return
        ctx = self.ctx
        first: dict = {}
        for _, art, fp in self.pending:
            first.setdefault(fp or id(art), art)
        arts = list(first.values())
        pairs = ctx.backend.measure_group(arts, self.base_art, ctx.task.example_inputs(), **TIMING)
        self.timed += len(arts)
        for fp, (stats, ref) in zip(first, pairs, strict=True):
            self.known[fp] = self._fields(stats.median_ms, ref.median_ms)
            key = self._key(fp if isinstance(fp, str) else None)
            if key is not None:
                ctx.latency_cache.put(key, {"stats": stats.to_dict(), "reference": ref.to_dict()})
        for row, art, fp in self.pending:
            row.update(self.known[fp or id(art)], timed="measured")
            shutil.rmtree(art.path.parent, ignore_errors=True)
        self.pending = []


def _cached_rows(path: Path, key: str) -> dict[tuple[str, str], dict]:
    """The rows of ``latency_profile.json`` measured for ``key``, by (layer, setting); {} if none."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("key") != key:
        return {}
    return {(r["layer"], r["setting"]): r for r in data.get("rows", [])}


def _copy_role_rows(members: list[tuple[dict, dict]]) -> None:
    """Give each later member of a structural role its role's measured figures (after the flush: the
    measured rows have their timings)."""
    for row, measured in members:
        row.update({k: measured[k] for k in SHARED if k in measured}, role_of=measured["layer"])
        row["timed"] = f"same structure and setting as {measured['layer']} (one structural role)"


def _over_budget(spent: float, trial_s: float | None, budget_trials: float) -> str | None:
    """Why no further row is measured (None: go on): the run's trials.timeout_s counts set-up too (leave
    the trials the rest), and the profile has a budget of its own in trial-equivalents."""
    if setup_over():
        return "over the run's set-up share of trials.timeout_s"
    if trial_s and spent > budget_trials * trial_s:
        return "over the profile's budget"
    return None


def _roles(ctx: RunContext) -> dict[str, str]:
    """Layer -> structural role (:mod:`.roles`) of the run's inventory."""
    names = [i.name for i in ctx.inventory]
    return structural_roles(ctx.teacher, names, ctx.task.example_inputs(), ctx.task.io)


def _first_pass(earlier: dict | None) -> dict:
    """The counts a first pass (``earlier``) adds to the full one; ``made``: the rows it made (not those
    it reused), which the full pass reads back from the file."""
    if earlier is None:
        return {"seconds": 0.0, "lowerings": 0, "timed": 0, "cache_hits": 0, "made": 0}
    made = sum(r.get("status") != "not measured" for r in earlier["rows"]) - earlier["reused"]
    return {**{k: earlier[k] for k in ("seconds", "lowerings", "timed", "cache_hits")}, "made": made}


def _profile_rows(ctx: RunContext, log, old: dict, settings: set[str] | None, roles: dict, over):
    """Each item's row (:func:`measure_profile`): reused from ``old``, copied from its structural role,
    not measured (``over()`` says why), or measured; ``(rows, reused, skipped, role members, profiler)``."""
    rows, reused, skipped = [], 0, 0
    first: dict[str, dict] = {}  # role key -> the row measured for it
    members: list[tuple[dict, dict]] = []  # (a later member's row, its role's measured row)
    with scratch_dir("ac-profile-") as tmp:
        prof = _Profiler(ctx, Path(tmp), log)
        for layer, label, layers in _items(ctx):
            if settings is not None and (
                (layer, label) not in old if layer == "*" else label not in settings
            ):
                continue  # a first pass: these settings' unit rows, and the whole-model rows already known
            prior = old.get((layer, label))
            if prior is not None and prior.get("status") != "not measured":
                rows.append(prior)
                reused += 1
                continue
            role = role_key(roles, layers) if layer != "*" else None
            if role in first:  # the same change on the same structure: the role's row, copied below
                rows.append(_row_head(layer, label, layers))
                members.append((rows[-1], first[role]))
                continue
            why = over()
            if why:
                rows.append({**_row_head(layer, label, layers), "status": "not measured", "note": why})
                skipped += 1
                continue
            rows.append(prof.row(layer, label, layers))
            crash_point("profile")  # dies with the profile's artifacts in its scratch folder
            if role is not None:
                first[role] = rows[-1]
        prof.flush()
    return rows, reused, skipped, members, prof


def measure_profile(
    ctx: RunContext,
    log: Callable[[str], None] = print,
    *,
    trial_s: float | None = None,
    budget_trials: float = BUDGET_TRIALS,
    use_cache: bool = True,
    share_roles: bool = True,
    given: dict | None = None,
    settings: set[str] | None = None,
    earlier: dict | None = None,
) -> dict:
    """The latency + accuracy profile of the run's teacher (see the module doc); written to the run folder.

    Args:
        trial_s: the estimated seconds of one trial (the cost's unit; no budget when None).
        budget_trials: stop profiling new rows past this many trial-equivalents.
        use_cache: reuse the rows of ``latency_profile.json`` measured for the same key.
        share_roles: a row of the same setting on the same structural role as a measured one copies it
            (the module doc); False measures every row itself.
        given: rows measured elsewhere, by (layer, setting): the study's first trials ran the whole-model
            int8 plans (:mod:`.first_trials`), so their rows are not lowered again.
        settings: a first pass: only these settings' unit rows, and the whole-model rows already known
            (:mod:`.first_trials`: the mixed int8 plan's ``8-bit`` rows); the full pass reuses them.
        earlier: that first pass's result: its cost counts here, its rows are not counted as reused.

    Returns:
        ``{"key", "rows", "seconds", "trial_s", "trial_equivalents", "lowerings", "timed", "reused",
        "cache_hits", "skipped"}``; a row: layer (``*`` for a whole-model row), setting, values, status,
        metric, metric_drop, size_bytes, size_ratio, speedup, latency_ms, fingerprint, timed, note.
    """
    path = ctx.run_dir / LATENCY_PROFILE
    key = profile_key(ctx)
    given = given or {}
    old = {**(_cached_rows(path, key) if use_cache else {}), **given}  # the first trials' rows first
    before = _first_pass(earlier)
    t0 = time.perf_counter()
    roles = _roles(ctx) if share_roles else {}

    def over() -> str | None:
        return _over_budget(before["seconds"] + time.perf_counter() - t0, trial_s, budget_trials)

    rows, reused, skipped, members, prof = _profile_rows(ctx, log, old, settings, roles, over)
    _copy_role_rows(members)
    seconds = before["seconds"] + time.perf_counter() - t0
    result = {
        "key": key,
        "rows": rows,
        "baseline": {k: ctx.baseline[k] for k in ("metric", "latency_ms", "size_bytes")},
        "seconds": seconds,
        "trial_s": trial_s,
        "trial_equivalents": seconds / trial_s if trial_s else None,
        "lowerings": before["lowerings"] + prof.lowerings,
        "timed": before["timed"] + prof.timed,
        "reused": reused - before["made"],
        "from_trials": sum((r["layer"], r["setting"]) in given for r in rows),
        "cache_hits": before["cache_hits"] + prof.cache_hits,
        "skipped": skipped,
        "shared": len(members),
        "roles": len(set(roles.values())) if roles else len(ctx.inventory),
    }
    write_json(path, result)
    log(profile_line(result))
    return result
