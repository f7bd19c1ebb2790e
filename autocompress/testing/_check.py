"""The suites' one assertion: ``check(condition, message)`` raises :class:`AssertionError` like ``assert``,
but is not stripped by ``python -O`` (a conformance suite must be able to fail wherever it runs)."""

from __future__ import annotations


def check(condition: object, message: object = None) -> None:
    """Raise :class:`AssertionError` (with ``message``) unless ``condition`` is true."""
    if not condition:
        raise AssertionError(message) if message is not None else AssertionError()
