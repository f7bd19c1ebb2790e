"""The shared timing loop: latency statistics, the per-device lock, side-by-side rounds.

Split out of :mod:`.base` (which re-exports every name here); backends call :func:`time_callables`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock


@dataclass
class LatencyStats:
    """Latency of one artifact on one device, in milliseconds per call at ``batch_size``."""

    median_ms: float
    p90_ms: float
    iqr_ms: float
    mean_ms: float
    n: int
    rel_ci: float  # half width of the median's ~95% confidence interval, relative to the median
    batch_size: int
    device: str
    # the lowest median of one block of consecutive calls: the latency with the least interference
    # from other processes (reported beside the median, never instead of it)
    best_block_ms: float | None = None
    # share of timing rounds set aside as disturbed (see time_callables), and the median of every call
    disturbed: float = 0.0
    median_all_ms: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class TimedInRounds:
    """``Backend.measure`` / ``measure_pair`` for a backend whose ``_time(artifacts, example_inputs)``
    times a list of artifacts side by side (one :func:`time_callables` call) and returns their stats.
    Put it before ``Backend`` in the bases."""

    def _time(self, artifacts: list, example_inputs) -> list[LatencyStats]:
        raise NotImplementedError

    def measure(self, artifact, example_inputs) -> LatencyStats:
        return self._time([artifact], example_inputs)[0]

    def measure_pair(self, artifact, reference, example_inputs) -> tuple[LatencyStats, LatencyStats]:
        a, b = self._time([artifact, reference], example_inputs)
        return a, b

    def measure_group(self, artifacts, reference, example_inputs, **limits):
        ref, *stats = self._time([reference, *artifacts], example_inputs)
        return [(s, ref) for s in stats]


def lock_dir() -> Path:
    d = Path(os.environ.get("AUTOCOMPRESS_LOCK_DIR", Path(tempfile.gettempdir()) / "autocompress-locks"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def device_lock(device: str, timeout_s: float = 3600) -> Iterator[None]:
    """Hold the machine-wide lock of ``device`` so concurrent trials never time at the same time."""
    safe = "".join(c if c.isalnum() else "_" for c in device)
    with FileLock(str(lock_dir() / f"{safe}.lock"), timeout=timeout_s):
        yield


def time_callable(
    fn: Callable[[], object],
    *,
    device: str,
    batch_size: int,
    sync: Callable[[], None] | None = None,
    **limits,
) -> LatencyStats:
    """Time one callable with :func:`time_callables` (warm-up, repeat until the CI is small)."""
    return time_callables([fn], device=device, batch_size=batch_size, sync=sync, **limits)[0]


MIN_CALLS = 10  # the fewest undisturbed calls a median is reported from (slow calls, short caps aside)


def time_callables(
    fns: list[Callable[[], object]],
    *,
    device: str,
    batch_size: int,
    sync: Callable[[], None] | None = None,
    timer: Callable[[Callable[[], object]], float] | None = None,
    warmup_min: int = 10,
    warmup_s: float = 0.2,
    block: int = 50,
    block_s: float = 0.02,
    min_block: int = 3,
    min_repeats: int = 100,
    max_repeats: int = 3000,
    max_s: float = 3.0,
    min_s: float = 0.5,
    target_rel_ci: float = 0.02,
    disturbed_above: float = 0.05,
) -> list[LatencyStats]:
    """Warm up, then time ``fns`` in alternating blocks until every median's relative CI is small.

    Alternating blocks means several artifacts (e.g. a candidate and the baseline) see the same
    machine state, so their ratio is measured side by side. A block is ``block`` consecutive calls, or
    fewer for slow calls (about ``block_s`` seconds, at least ``min_block``); one block of every callable
    is a round.

    Rounds in which some callable's block median is more than a threshold above that callable's best
    block median (relative to the calmest round) are set aside as disturbed, except that the calmest
    rounds holding :data:`MIN_CALLS` (10) calls are always kept: on a shared machine
    another process (or another VM on the host) takes the core for hundreds of milliseconds at a time,
    and those stretches measure the neighbour, not the artifact. The threshold is ``disturbed_above``
    (5%), or four times the calm noise of one block median where that is larger (slow calls have few
    calls per block: a 3-call block of a call that jitters by 3% jitters by about 2%, and the best block
    is itself a low draw; see :func:`_threshold`). The 5% is below the gap between the two speeds this
    project's VMs alternate between (about 8% apart, independently of the artifact): with 15% the median
    depended on which speed a process happened to see more of (``python benchmarks/measurement.py``:
    5-process spread 3.1%), with 5% it is the calm speed's (0.3%). The reported median, p90, IQR, count
    and CI are those of the undisturbed rounds (``disturbed`` says which share was set aside;
    ``median_all_ms`` is the median of every call). The CI half width uses the notch rule
    ``1.57 * IQR / sqrt(n)``.

    Timing stops when every CI is at most ``target_rel_ci`` after at least ``min_s`` seconds (which
    spreads the samples over time) and, for each callable, at least ``min_repeats`` undisturbed calls
    or as many as take ``min_s`` at its speed (at least 10: a 26 ms call needs 20, not 100); or at
    ``max_repeats`` calls or ``max_s`` seconds.

    Time bound: warm-up gives each of the ``k`` callables ``warmup_s / k`` seconds (at least
    ``warmup_min`` calls, or 3 when ``warmup_min`` would take more than twice its share), and the
    timed rounds stop at the first round end past ``max_s``. So a call returns within
    ``2 * warmup_s + max_s + (3 + b) * T`` seconds (:func:`timing_bound_s`), ``T`` the time of one call
    of every callable and ``b`` the block size (``min_block`` = 3 for calls over ``block_s / 3``): with
    the defaults, a 26 ms artifact timed beside a 40 ms baseline within 3.8 s, two 100 ms artifacts
    within 4.6 s (``tests/backends/test_timing.py`` checks it on a real ORT artifact). On a calm machine such a
    pair reaches the 2% CI in about 1.6 s (20 calls of the 26 ms one); before, the fixed 100-call
    minimum could not be met within ``max_s`` and every slow artifact ran to the cap.

    On accelerators pass ``sync`` (the device's synchronize: a call is timed until its work is done)
    or ``timer`` (times one call on the device, e.g. with start/end events, and returns seconds).
    """
    sync = sync or (lambda: None)
    per_call = [_warm_up(fn, sync, warmup_s / len(fns), warmup_min) for fn in fns]
    block = _block_size(per_call, block, block_s, min_block)
    need = [min(min_repeats, max(MIN_CALLS, math.ceil(min_s / max(t, 1e-9)))) for t in per_call]
    min_kept = math.ceil(min(MIN_CALLS, min_repeats) / block)  # rounds kept however disturbed
    rounds: list[list[list[float]]] = []  # rounds[r][f] = one block of callable f
    summaries: list[np.ndarray] = []  # summaries[r] = [median, relative spread] of each block of round r
    start = time.perf_counter()
    deadline = start + max_s
    while True:
        this_round = [_time_block(fn, block, sync, timer) for fn in fns]
        rounds.append(this_round)
        summaries.append(_block_summary(this_round))  # once per round: the statistics reuse it
        stats = _round_stats(rounds, len(fns), device, batch_size, disturbed_above, min_kept, summaries)
        long_enough = time.perf_counter() - start >= min_s
        if long_enough and all(
            st.n >= n and st.rel_ci <= target_rel_ci for st, n in zip(stats, need, strict=True)
        ):
            return stats
        if len(rounds) * block >= max_repeats or time.perf_counter() > deadline:
            return stats


def timing_bound_s(call_s: list[float], **limits: float) -> float:
    """The most seconds :func:`time_callables` takes for callables of ``call_s`` seconds per call under
    the same ``limits`` (its keyword arguments ``warmup_s``, ``max_s``, ``block``, ``block_s``,
    ``min_block``; its defaults where not given): ``2 * warmup_s + max_s + (3 + b) * T``,
    ``T = sum(call_s)``, ``b`` the block size."""
    defaults = inspect.signature(time_callables).parameters
    lim = {
        k: limits.get(k, defaults[k].default) for k in ("warmup_s", "max_s", "block", "block_s", "min_block")
    }
    b = _block_size(call_s, int(lim["block"]), lim["block_s"], int(lim["min_block"]))
    return 2 * lim["warmup_s"] + lim["max_s"] + (3 + b) * sum(call_s)


def _block_size(call_s: list[float], block: int, block_s: float, min_block: int) -> int:
    """Calls per block: ``block``, or as many as take ``block_s`` seconds of the slowest callable (at least
    ``min_block``)."""
    return max(min_block, min(block, int(block_s / max(max(call_s), 1e-9))))


def _time_block(
    fn: Callable[[], object],
    block: int,
    sync: Callable[[], None],
    timer: Callable[[Callable[[], object]], float] | None,
) -> list[float]:
    """Seconds of each of ``block`` consecutive calls of ``fn`` (by ``timer`` when given)."""
    if timer is not None:
        return [timer(fn) for _ in range(block)]
    out: list[float] = []
    for _ in range(block):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def _warm_up(fn: Callable[[], object], sync: Callable[[], None], share_s: float, calls: int) -> float:
    """Run ``fn`` for ``share_s`` seconds and at least ``calls`` times, or 3 times when ``calls`` would
    take more than twice ``share_s``; returns the median seconds per call (the first call, which
    allocates, left out)."""
    times: list[float] = []
    t_start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        sync()
        now = time.perf_counter()
        times.append(now - t0)
        elapsed, i = now - t_start, len(times)
        if elapsed >= share_s and (i >= calls or (i >= 3 and elapsed / i * calls > 2 * share_s)):
            return float(np.median(times[1:] or times))


def _block_summary(blocks: list[list[float]]) -> np.ndarray:
    """``[2, k]``: each block's median and its relative per-call spread (IQR / 1.35 / median)."""
    med = np.asarray([np.median(b) for b in blocks])
    spread = np.asarray([np.subtract(*np.percentile(b, [75, 25])) / 1.35 for b in blocks])
    return np.stack([med, spread / np.maximum(med, 1e-12)])


def _threshold(rel: np.ndarray, block: int, disturbed_above: float) -> float:
    """How far above its best block a round may be and still count as calm.

    ``disturbed_above``, or four times the relative noise of one block median in calm rounds where that
    is larger: the best block is about two of those noise widths below a calm block's centre and a calm
    block reaches about two above it. The per-call noise ``rel[round, callable]`` is read from the spread
    inside blocks (IQR / 1.35, the standard deviation of a normal sample) in the calmest quarter of the
    rounds, so disturbed rounds do not widen it; one block median of ``block`` calls has
    ``1.25 / sqrt(block)`` of it.
    """
    if block < 3 or len(rel) < 4:
        return disturbed_above
    calm = np.percentile(rel, 25, axis=0).max()
    return max(disturbed_above, 4.0 * 1.25 * calm / math.sqrt(block))


def _round_stats(
    rounds: list[list[list[float]]],
    k: int,
    device: str,
    batch_size: int,
    disturbed_above: float,
    min_rounds: int = 1,
    summaries: list[np.ndarray] | None = None,
) -> list[LatencyStats]:
    """Statistics of the undisturbed rounds (see :func:`time_callables`)."""
    summary = np.asarray(summaries if summaries is not None else [_block_summary(r) for r in rounds])
    med, rel = summary[:, 0], summary[:, 1]  # [round, callable]
    best = med.min(axis=0)
    worst = (med / best).max(axis=1)  # each round's slowest callable, relative to its best block
    threshold = _threshold(rel, len(rounds[0][0]), disturbed_above)
    # never empty: the calmest round is kept, and the calmest ``min_rounds`` when the whole stretch
    # was disturbed (on a loaded machine a slow call rarely runs undisturbed twice in a row)
    floor = np.sort(worst)[min(min_rounds, len(worst)) - 1]
    clean = worst <= max(worst.min() * (1.0 + threshold), floor)
    disturbed = float(1.0 - clean.mean())
    out = []
    for f in range(k):
        kept = [x for r, ok in zip(rounds, clean, strict=True) if ok for x in r[f]]
        everything = [x for r in rounds for x in r[f]]
        st = _stats(kept, device, batch_size, best_ms=float(best[f]) * 1e3)
        st.disturbed = disturbed
        st.median_all_ms = float(np.median(everything)) * 1e3
        out.append(st)
    return out


def _stats(samples: list[float], device: str, batch_size: int, best_ms: float | None = None) -> LatencyStats:
    a = np.asarray(samples) * 1e3
    med = float(np.median(a))
    q1, q3 = np.percentile(a, [25, 75])
    rel_ci = float(1.57 * (q3 - q1) / np.sqrt(len(a)) / med) if med > 0 else 0.0
    return LatencyStats(
        median_ms=med,
        p90_ms=float(np.percentile(a, 90)),
        iqr_ms=float(q3 - q1),
        mean_ms=float(a.mean()),
        n=len(a),
        rel_ci=rel_ci,
        batch_size=batch_size,
        device=device,
        best_block_ms=best_ms if best_ms is not None else med,
    )
