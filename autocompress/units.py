"""Numbers with units and sensible digits, as the report and the progress lines show them: latency in
ms with 3 significant digits, speedups as ``x`` with 2 decimals, sizes in B / kB / MB (SI), accuracy-like
metrics as percentages and their changes in percentage points."""

from __future__ import annotations

import math
import re


def significant(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits and no exponent (0.0278, 40.1), whole units kept (1235)."""
    if x is None or not math.isfinite(x):
        return "n/a"
    if x == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(x)))
    if decimals <= 0:  # 1235, not 1230: whole units are kept
        return f"{x:.0f}"
    rounded = round(x, decimals)
    if rounded and math.floor(math.log10(abs(rounded))) != math.floor(math.log10(abs(x))):
        decimals -= 1  # 9.996 -> 10.0, not 10.00
    return f"{rounded:.{max(decimals, 0)}f}"


def fmt_ms(ms: float | None) -> str:
    """A latency in milliseconds, 3 significant digits: ``0.0278 ms``, ``40.1 ms``."""
    return "n/a" if ms is None else f"{significant(ms)} ms"


def fmt_speedup(x: float | None) -> str:
    """A speedup against the baseline, 2 decimals: ``1.85x``."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def fmt_bytes(n: float | None) -> str:
    """A size in bytes with SI units and 3 significant digits: ``812 B``, ``45.2 kB``, ``23.1 MB``."""
    if n is None:
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{significant(n / scale)} {unit}"
    return f"{int(n)} B"


def is_fraction_metric(name: str | None) -> bool:
    """Metrics in [0, 1] shown as percentages (accuracy, top-K, F1); others keep their own units."""
    return bool(name) and re.fullmatch(r"accuracy|f1|top\d+", str(name)) is not None


def fmt_metric(value: float | None, name: str | None) -> str:
    """The metric's value: ``97.12%`` for accuracy-like metrics, else 4 significant digits."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value * 100:.2f}%" if is_fraction_metric(name) else significant(value, 4)


def fmt_drop(drop: float | None, drop_rel: float | None, name: str | None) -> str:
    """How much worse than the baseline: ``0.52 pts worse (0.53%)``, ``0.10 pts better``, ``same``.

    Accuracy-like metrics in percentage points; others in their own units; the relative change in %."""
    if drop is None or not math.isfinite(drop):
        return "n/a"
    if abs(drop) < 5e-7:
        return "same as baseline"
    word = "worse" if drop > 0 else "better"
    size = f"{abs(drop) * 100:.2f} pts" if is_fraction_metric(name) else significant(abs(drop))
    rel = f" ({abs(drop_rel) * 100:.2f}%)" if drop_rel is not None and math.isfinite(drop_rel) else ""
    return f"{size} {word}{rel}"


def fmt_size_ratio(ratio: float | None) -> str:
    """Baseline bytes / model bytes: ``3.91x smaller``."""
    if ratio is None or not math.isfinite(ratio):
        return "n/a"
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
