"""autocompress: automatic, measured compression of PyTorch models.

The public API: :func:`run_study` runs a study (a :class:`StudyConfig` from :func:`configure` or
:func:`load_config`, a study file, or a bundled study's name) and returns a :class:`StudyResult`;
:func:`load_result` reads one back from a run folder. See the README for the command line.
"""

from __future__ import annotations

from . import (
    metrics,
    techniques,  # noqa: F401, I001 - first: the built-in techniques fill the registry
)
from .api import load_result, run_study
from .backends import BACKENDS, Artifact, Backend, LatencyStats
from .config import StudyConfig, configure, load_config
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
from .result import FrontModel, StudyResult
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
    "FrontModel",
    "LatencyStats",
    "LayerInfo",
    "LayerPlan",
    "Metric",
    "MissingDependencyError",
    "Plan",
    "Schedule",
    "SearchSpace",
    "StudyConfig",
    "StudyResult",
    "Task",
    "TechniqueError",
    "TrialFailed",
    "build_inventory",
    "compress",
    "configure",
    "load_config",
    "load_result",
    "load_run",
    "metrics",
    "run_study",
    "train_teacher",
]


def load_run(run_dir: str, storage: str | None = None, study: str | None = None):
    """The Optuna study of a run folder (for notebooks: ``load_run('runs/quickstart').trials``).

    :func:`load_result` gives the same run as objects (the front, the baseline, ``pick``, ``load``).
    """
    from .rundir import open_study

    return open_study(run_dir, storage, study)
