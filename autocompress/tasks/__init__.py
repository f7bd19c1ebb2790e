"""Tasks: built-ins by name, user tasks as ``package.module:factory``."""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from ..registry import Registry
from .base import METRICS, Task, accuracy, validate_task, weights_hash
from .data import MEAN_POOLING, IOSpec, Split, deployable, mean_pooling, select_output
from .digits import digits, digits_resnet
from .mnist1d import mnist1d_cnn, mnist1d_transformer

TASKS: Registry = Registry("task")
TASKS.add("digits", digits)
TASKS.add("digits_resnet", digits_resnet)
TASKS.add("mnist1d_cnn", mnist1d_cnn)
TASKS.add("mnist1d_transformer", mnist1d_transformer)

__all__ = [
    "TASKS",
    "METRICS",
    "IOSpec",
    "Split",
    "Task",
    "accuracy",
    "deployable",
    "load_task",
    "MEAN_POOLING",
    "mean_pooling",
    "resolve_factory",
    "select_output",
    "validate_task",
    "weights_hash",
]


def resolve_factory(spec: str, where: str = "task.name"):
    """Return the factory callable for a built-in name or ``package.module:factory``."""
    if ":" not in spec:
        try:
            return TASKS.get(spec)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (or give 'package.module:factory')", field=where) from None
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{spec!r} is not 'package.module:factory'", field=where)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import task module {module_name!r}: {exc}", field=where) from None
    except Exception as exc:  # the module itself is broken: a syntax error, raising at import
        first = (str(exc).strip().splitlines() or [""])[0]  # a SyntaxError's names the file and line
        raise ConfigError(
            f"task module {module_name!r} failed to import: {type(exc).__name__}: {first}", field=where
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"module {module_name!r} has no callable {attr!r}", field=where)
    return factory


def load_task(spec: str, options: dict | None = None, where: str = "task") -> Task:
    """Build and validate a task; any failure of the user's factory becomes a ConfigError."""
    factory = resolve_factory(spec, f"{where}.name")
    try:
        task = factory(**(options or {}))
    except ConfigError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"task factory {spec!r} raised {type(exc).__name__}: {first}", field=where) from exc
    return validate_task(task, where)
