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
    "TrialTimeout",
    "NonFiniteLoss",
    "ExportError",
    "RuntimeLoadError",
    "TimingError",
    "RunFolderUnwritable",
    "StorageUnavailable",
    "unwritable_errno",
    "failure_category",
]


class AutoCompressError(Exception):
    """Root of every error autocompress raises on purpose.

    ``category`` names the kind of failure in reports (``autocompress report`` groups failed trials
    by it); subclasses refine it.
    """

    category = "error"

    def __str__(self) -> str:
        from .redact import mask_secrets

        return mask_secrets(super().__str__())  # a storage URL's password never reaches a message


class ConfigError(AutoCompressError, ValueError):
    """Bad user input: a study file, a search space, a task, a CLI flag.

    The message states where (file and field) and the rule that was broken, on one line.
    """

    category = "bad input"

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        from .redact import mask_secrets

        self.rule = message = mask_secrets(message)
        parts = [p for p in (source, field) if p]
        super().__init__(": ".join([*parts, message]))

    def at(self, source: str | None = None, field: str | None = None) -> ConfigError:
        """The same rule, located in ``source`` (and ``field`` where this error had none)."""
        return ConfigError(self.rule, source=source or self.source, field=self.field or field)


class TechniqueError(AutoCompressError, ValueError):
    """A compression technique was asked for something it cannot do (e.g. rank 0)."""

    category = "technique error"


class BackendError(AutoCompressError, RuntimeError):
    """A backend could not lower, load, evaluate or time an artifact."""

    category = "backend error"


class MissingDependencyError(AutoCompressError, ImportError):
    """An optional dependency (ray, torch_npu, CANN) is not installed."""

    category = "missing dependency"


class TrialFailed(AutoCompressError, RuntimeError):
    """A trial could not produce valid metrics (NaN loss, export failure...); the study goes on."""

    category = "invalid metrics"


class TrialTimeout(TrialFailed):
    """A trial ran past ``trials.trial_timeout_s``."""

    category = "timeout"


class NonFiniteLoss(TrialFailed):
    """The fine-tuning loss became NaN or infinite."""

    category = "non-finite loss"


class ExportError(BackendError):
    """Lowering the compressed model to an artifact failed (e.g. ``torch.onnx.export``)."""

    category = "export failed"


class RuntimeLoadError(BackendError):
    """The runtime (e.g. ONNX Runtime) could not load the artifact."""

    category = "runtime load failed"


class TimingError(BackendError):
    """The latency measurement failed (e.g. the timing worker died)."""

    category = "timing failed"


class RunFolderUnwritable(AutoCompressError, OSError):
    """A trial could not write its folder: the disk is full or the folder is read-only.

    Not the plan's fault, and every later trial would fail the same way: the study stops with this
    one line, and the same command resumes once space is freed (or the folder is writable again).
    """

    category = "run folder not writable"


class StorageUnavailable(AutoCompressError, ConnectionError):
    """The study's database stayed unreachable for longer than the retry window."""

    category = "storage unavailable"


WRITE_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG"}


def unwritable_errno(exc: BaseException) -> int | None:
    """The errno of a failed write (disk full, quota, read-only, permission) in ``exc`` or its causes.

    Libraries that wrap the ``OSError`` (an exporter, safetensors' ``I/O error: ... (os error 28)``) are
    looked through, so the trial's reason names the real cause.
    """
    import errno as _errno
    import re

    codes = {getattr(_errno, name) for name in WRITE_ERRNOS if hasattr(_errno, name)}
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in codes:
            return e.errno
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m and int(m.group(1)) in codes:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def failure_category(exc: BaseException) -> str:
    """A short, stable name for why a trial failed (for grouping failures in reports)."""
    if isinstance(exc, AutoCompressError):
        return exc.category
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"exception ({type(exc).__name__})"
