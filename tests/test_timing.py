"""The shared timing protocol: disturbed stretches are set aside, side-by-side ratios survive them."""

from __future__ import annotations

import time

import pytest

from autocompress.backends.base import time_callables


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_disturbed_rounds_are_set_aside_and_the_ratio_survives():
    calls = {"n": 0}

    def slowed(base: float):
        def fn():
            calls["n"] += 1
            # a "neighbour" takes the core for a stretch of calls: everything runs 3x slower
            _spin(base * (3.0 if (calls["n"] // 400) % 3 == 1 else 1.0))

        return fn

    fast, slow = slowed(2e-4), slowed(4e-4)
    a, b = time_callables(
        [fast, slow], device="cpu", batch_size=1, block=20, min_s=0.6, max_s=1.5, target_rel_ci=0.02
    )
    assert 0.05 < a.disturbed < 0.8 and a.disturbed == b.disturbed  # rounds are judged for both at once
    assert a.median_ms == pytest.approx(0.2, rel=0.3) and b.median_ms == pytest.approx(0.4, rel=0.3)
    assert b.median_ms / a.median_ms == pytest.approx(2.0, rel=0.2)
    assert a.median_all_ms >= a.median_ms and a.p90_ms < 0.4  # the 3x stretch is not in the kept calls


def test_undisturbed_timing_keeps_every_round():
    st = time_callables([lambda: _spin(1e-4)], device="cpu", batch_size=1, min_s=0.2, max_s=1.0)[0]
    assert st.disturbed < 0.2 and st.median_ms == pytest.approx(0.1, rel=0.2)
    assert st.n >= 100 and st.rel_ci <= 0.02


def test_callables_are_timed_in_alternating_blocks():
    order: list[int] = []
    fns = [lambda i=i: (order.append(i), _spin(5e-5)) for i in range(3)]
    stats = time_callables(
        fns, device="cpu", batch_size=1, warmup_min=10, warmup_s=0.0, block=7, min_s=0.05, max_s=0.3
    )
    assert order[:30] == [0] * 10 + [1] * 10 + [2] * 10  # warm-up: 10 calls each
    timed = order[30:]
    assert len(timed) >= 3 * 21 and len(timed) % 21 == 0
    rounds = [timed[i : i + 21] for i in range(0, len(timed), 21)]
    assert all(r == [0] * 7 + [1] * 7 + [2] * 7 for r in rounds)  # one block of each, in turn
    assert len({st.n for st in stats}) == 1
