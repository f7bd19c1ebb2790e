"""``autocompress measure``: time any exported artifact on its own, with the shared protocol."""

from __future__ import annotations

from pathlib import Path

from .backends import BACKENDS, LatencyStats
from .backends.device_facts import environment
from .errors import AutoCompressError, BackendError, ConfigError


def time_artifact(
    path: str | Path,
    backend: str,
    device: str = "cpu",
    *,
    batch_size: int = 1,
    threads: int = 1,
    options: dict | None = None,
) -> tuple[LatencyStats, dict]:
    """Latency of the artifact at ``path`` on ``backend``/``device`` and the environment it ran in.

    The input shape is read from the artifact (batch axis repeated to ``batch_size``).

    Raises:
        ConfigError: unknown backend, unusable device or option, missing or foreign artifact.
        BackendError: the artifact could not be loaded or timed.
    """
    try:
        cls = BACKENDS.get(backend)
    except ConfigError as exc:
        raise exc.at("command line", "--backend") from None
    try:
        be = cls(device=device, batch_size=batch_size, threads=threads, **(options or {}))
    except AutoCompressError as exc:
        raise ConfigError(str(exc), source="command line", field="--device/--option") from None
    try:
        try:
            artifact = be.load_artifact(Path(path))
            inputs = be.example_inputs_for(artifact)  # reads the file: a foreign one fails here
        except BackendError as exc:
            raise ConfigError(str(exc), source=str(path)) from None
        stats = be.measure(artifact, inputs)
        return stats, environment(be)
    finally:
        be.close()


def format_stats(path: str | Path, stats: LatencyStats, env: dict) -> str:
    """One line: where it ran and median / p90 / IQR / count / relative CI."""
    return (
        f"{Path(path).name} on {env['backend']}/{env['device']} ({env['device_name']}), "
        f"batch {stats.batch_size}: median {stats.median_ms:.4f} ms | p90 {stats.p90_ms:.4f} ms | "
        f"IQR {stats.iqr_ms:.4f} ms | n {stats.n} | rel. CI of the median {stats.rel_ci:.1%}"
    )
