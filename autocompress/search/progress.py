"""The progress line of a run: one per trial with its metrics, the front, elapsed time and ETA (and
the time left of ``trials.timeout_s``, which counts from the run's start)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import optuna

from ..backends import LatencyCache
from ..deadline import run_remaining
from ..units import fmt_bytes
from .costs import _fmt_s


class Progress:
    """One line per trial: n/N, the trial's metrics, the front, elapsed time and ETA."""

    def __init__(self, n_target: int, done: int, log: Callable[[str], None]):
        self.n_target, self.start_done, self.log = n_target, done, log
        self.t0 = time.perf_counter()
        self.cache: LatencyCache | None = None  # set by the loop: its hit count is shown

    def trial(
        self,
        study: optuna.Study,
        done: int,
        number: int,
        m: dict | None,
        reason: str = "",
        pruned: bool = False,
    ) -> None:
        elapsed = time.perf_counter() - self.t0
        ran = done - self.start_done
        eta = elapsed / ran * (self.n_target - done) if ran else math.nan
        if m is None:
            what = f"PRUNED: {reason}" if pruned else f"FAILED: {reason}"
        else:
            what = (
                f"{m.get('metric_name', 'metric')} {m['metric']:.4f} | {m['latency_ms']:.4f} ms ({m.get('speedup', 1):.2f}x) | "
                f"{fmt_bytes(m['size_bytes'])} ({m.get('size_ratio', 1):.1f}x smaller)"
            )
            if m.get("latency_cached"):
                hits = f", {self.cache.hits} hits" if self.cache is not None else ""
                what += f" [latency from cache{hits}]"
        front = study.best_trials
        best = ""
        if front:
            fastest = min(front, key=lambda t: t.values[1])
            name = fastest.user_attrs.get("metric_name") or (m or {}).get("metric_name", "metric")
            best = (
                f" | front {len(front)} | fastest feasible {fastest.user_attrs.get('speedup', 1):.2f}x "
                f"@ {name} {fastest.values[0]:.4f}"
            )
        eta_s = _fmt_s(eta) if eta == eta else "?"
        left = run_remaining()
        left_s = f", {_fmt_s(max(left, 0.0))} of the budget left" if left is not None else ""
        self.log(
            f"[{done}/{self.n_target}] trial {number}: {what}{best} | elapsed {_fmt_s(elapsed)}, ETA {eta_s}"
            f"{left_s}"
        )
