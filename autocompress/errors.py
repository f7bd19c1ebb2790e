"""Exception hierarchy.

Every error raised on purpose by autocompress derives from :class:`AutoCompressError`; each one
also subclasses the builtin a caller would naturally catch (``ValueError``, ``RuntimeError``,
``ImportError``), so ``except ValueError`` keeps working for code that does not know us.
"""

from __future__ import annotations

__all__ = [
    "AutoCompressError",
    "ConfigError",
    "TechniqueError",
    "BackendError",
    "MissingDependencyError",
    "TrialFailed",
]


class AutoCompressError(Exception):
    """Root of every error autocompress raises on purpose."""


class ConfigError(AutoCompressError, ValueError):
    """Bad user input: a study file, a search space, a task, a CLI flag.

    The message states where (file and field) and the rule that was broken, on one line.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        self.rule = message
        parts = [p for p in (source, field) if p]
        super().__init__(": ".join([*parts, message]))

    def at(self, source: str | None = None, field: str | None = None) -> ConfigError:
        """The same rule, located in ``source`` (and ``field`` where this error had none)."""
        return ConfigError(self.rule, source=source or self.source, field=self.field or field)


class TechniqueError(AutoCompressError, ValueError):
    """A compression technique was asked for something it cannot do (e.g. rank 0)."""


class BackendError(AutoCompressError, RuntimeError):
    """A backend could not lower, load, evaluate or time an artifact."""


class MissingDependencyError(AutoCompressError, ImportError):
    """An optional dependency (ray, torch_npu, CANN) is not installed."""


class TrialFailed(AutoCompressError, RuntimeError):
    """A trial could not produce valid metrics (NaN loss, export failure...); the study goes on."""
