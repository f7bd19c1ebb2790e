"""autocompress: automatic, measured compression of PyTorch models.

The public API; see the README for the command line.
"""

from __future__ import annotations

from . import (
    metrics,
    techniques,  # noqa: F401, I001 - first: the built-in techniques fill the registry
)
from .backends import BACKENDS, Artifact, Backend, LatencyStats
from .config import StudyConfig, load_config
from .errors import (
    AutoCompressError,
    BackendError,
    ConfigError,
    MissingDependencyError,
    TechniqueError,
    TrialFailed,
)
from .inventory import LayerInfo, build_inventory
from .metrics import Metric
from .pipeline import Compressed, compress, train_teacher
from .plan import LayerPlan, Plan, Schedule
from .search import run_study
from .space import SearchSpace
from .tasks import TASKS, Task

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "TASKS",
    "Artifact",
    "AutoCompressError",
    "Backend",
    "BackendError",
    "Compressed",
    "ConfigError",
    "LatencyStats",
    "LayerInfo",
    "LayerPlan",
    "Metric",
    "MissingDependencyError",
    "Plan",
    "Schedule",
    "SearchSpace",
    "StudyConfig",
    "Task",
    "TechniqueError",
    "TrialFailed",
    "build_inventory",
    "compress",
    "load_config",
    "load_run",
    "metrics",
    "run_study",
    "train_teacher",
]


def load_run(run_dir: str, storage: str | None = None, study: str | None = None):
    """The Optuna study of a run folder (for notebooks: ``load_run('runs/quickstart').trials``)."""
    from .rundir import open_study

    return open_study(run_dir, storage, study)
