"""Checks made before anything is written: the storage can be opened, the run folder can be made,
and the budgets can be met by at least one plan.

Budget rule (sound: a budget that some plan can meet is never rejected):

* ``max_size_bytes``: every artifact stores the weight of every compressible layer, at no fewer bits
  than the lowest bit width the space allows for that layer, and with no fewer elements than its
  factorization at the lowest rank ratio the space allows (or the dense weight, if that is smaller).
  Biases, scales, the graph and the other parameters only add bytes. A budget below that sum
  (:func:`min_artifact_bytes`) cannot be met.
* ``max_latency_ms``: every artifact does at least what a one-operator artifact does per call: the
  runtime's call overhead and reading the input. That trivial artifact (``Flatten`` of the input) is
  lowered and timed by the same backend at the same batch size; a budget below half its median
  latency (:data:`LATENCY_MARGIN` absorbs timing noise from a busy machine) cannot be met.
* ``max_metric_drop``: cannot be decided before fine-tuning; any value within the metric's range is
  accepted (above it, for a bounded metric such as accuracy, the budget would allow anything: refused).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..backends import Backend
from ..config import StudyConfig
from ..errors import AutoCompressError, ConfigError
from ..inventory import LayerInfo, build_inventory
from ..registry import TECHNIQUES
from ..space import SearchSpace
from ..tasks import Task

LATENCY_MARGIN = 0.5
SQLITE_HEADER = b"SQLite format 3\x00"
# the largest drop a bounded built-in metric can show: accuracy, top-k and F1 lie in [0, 1], fidelity
# (a cosine) in [-1, 1]; a max_metric_drop above it allows anything (a percentage written as 5, not 0.05)
METRIC_SPAN = {"accuracy": 1.0, "topk": 1.0, "f1": 1.0, "fidelity": 2.0}


def check_storage(cfg: StudyConfig) -> None:
    """Raise ConfigError if the storage URL cannot be opened; create nothing.

    SQLite and journal files: the file's folder must exist (or be the run folder, which the run creates)
    and be writable, and an existing SQLite file must be an SQLite database. Other databases: a connection is opened (5 s
    timeout) and closed.
    """
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from ..redact import mask_url
    from .storage import journal_path

    url = cfg.storage_url()
    shown = mask_url(url)

    def fail(rule: str) -> ConfigError:
        return ConfigError(rule, source=cfg.source, field="storage")

    if url.startswith("journal://"):  # Optuna's journal file: its folder must exist (or be the run folder)
        journal = journal_path(url)
        _check_file_folder(str(journal), journal, cfg, fail)
        return
    try:
        u = make_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: e.g. a port that is not a number
        raise fail(f"{shown!r} is not a database URL (e.g. sqlite:///runs/x/study.db): {exc}") from None
    try:
        u.get_dialect()
    except NoSuchModuleError:
        raise fail(
            f"cannot open {shown!r}: unknown database dialect {u.drivername!r} "
            "(known to SQLAlchemy: sqlite, postgresql, mysql, mariadb, oracle, mssql)"
        ) from None
    except ImportError as exc:  # the dialect is known, its driver is not installed
        raise fail(
            f"cannot open {shown!r}: the driver of {u.drivername!r} is not installed ({exc}); "
            'for PostgreSQL: pip install "autocompress[postgres]"'
        ) from None
    if u.get_backend_name() == "sqlite":
        _check_sqlite(u.database, cfg, fail)
        return
    args = {"connect_timeout": 5} if u.get_backend_name() in ("postgresql", "mysql", "mariadb") else {}
    try:
        engine = create_engine(url, connect_args=args)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # the driver's own words: no server, wrong password, no driver...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise fail(f"cannot open {shown!r}: {type(exc).__name__}: {first}") from None


def _check_sqlite(database: str | None, cfg: StudyConfig, fail) -> None:
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        raise fail("an in-memory SQLite storage would lose the study when the process ends; give a file")
    path = Path(database)
    if not _check_file_folder(database, path, cfg, fail):
        return
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise fail(f"cannot open {database!r}: the file is not readable and writable")
        # the file's header, not a connection: opening a database in WAL mode, even read-only, leaves
        # its -wal and -shm files behind, and a refused run must not write a byte
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
        if head and head != SQLITE_HEADER:  # an empty file is an empty database to SQLite
            raise fail(f"cannot open {database!r}: file is not a database")


def _check_file_folder(shown: str, path: Path, cfg: StudyConfig, fail) -> bool:
    """The folder of a storage file exists and is writable, or is the run folder (or inside it), which
    the run creates (False then: there is no file yet to check)."""
    folder = path.parent.resolve()
    run_dir = cfg.output_dir().resolve()
    if not folder.exists():
        if folder == run_dir or run_dir in folder.parents:
            _check_creatable(run_dir, cfg)
            return False
        raise fail(f"cannot open {shown!r}: folder {str(path.parent)!r} does not exist")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise fail(f"cannot open {shown!r}: folder {str(path.parent)!r} is not writable")
    return True


def _check_creatable(folder: Path, cfg: StudyConfig) -> None:
    """The nearest existing ancestor of ``folder`` must be a writable directory."""
    p = folder
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot create run folder {str(folder)!r}: {str(p)!r} is not a writable folder",
            source=cfg.source,
            field="output",
        )


def check_output(cfg: StudyConfig) -> None:
    """Raise ConfigError if the run folder can neither be used nor created."""
    out = cfg.output_dir().resolve()
    if out.exists():
        if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(
                f"run folder {str(out)!r} is not a writable folder", source=cfg.source, field="output"
            )
        return
    _check_creatable(out, cfg)


def min_artifact_bytes(space: SearchSpace, inventory: list[LayerInfo]) -> int:
    """A lower bound on the size of any artifact the space can produce (see the module docstring).

    Per compressible layer: its weight elements after the most the space allows of structured pruning
    (a fraction of output channels removed, and as much of the input channels, which the previous layer
    may lose) and of factorization (SVD at the lowest rank ratio; with another rank mode, rank 1: at
    least one element per input and per output channel), times the lowest allowed bit width.
    """
    total = 0.0
    specs = [t for t in TECHNIQUES.specs() if t.size_floor is not None]
    for info in inventory:
        params = space.layer_params(info)
        fan_in = info.in_features // info.groups * int(torch.tensor(info.kernel).prod())
        floor = {"elements": info.out_features * fan_in, "keep": 1.0, "fan_in": fan_in, "bits": 32}
        for t in specs:  # pipeline order: structured pruning narrows what low rank then factorizes
            t.size_floor(params, info, floor)
        total += floor["elements"] * floor["bits"] / 8
    return int(total)


def latency_floor_ms(task: Task, backend: Backend) -> float:
    """Median latency of a one-operator artifact (Flatten of the input), lowered and timed by ``backend``."""
    with tempfile.TemporaryDirectory(prefix="ac-floor-") as tmp:
        artifact = backend.lower(_FirstInput().eval(), task.example_inputs(), {}, Path(tmp), io=task.io)
        return backend.measure(artifact, task.example_inputs()).median_ms


class _FirstInput(nn.Module):
    """The cheapest model of the task's inputs: its first input, flattened (one operator or two)."""

    def forward(self, *inputs):
        x = inputs[0]
        return x.flatten(1) if x.is_floating_point() else x.flatten(1).float()


def check_budgets(cfg: StudyConfig, task: Task, space: SearchSpace, backend: Backend) -> None:
    """Raise ConfigError for a budget that no plan of the space can meet, or a metric budget larger than
    the metric's whole range (see the module docstring)."""
    b = cfg.budgets
    metric = task.metric_obj
    span = METRIC_SPAN.get(metric.kind)
    if b.max_metric_drop is not None and span is not None and b.max_metric_drop > span:
        raise ConfigError(
            f"{b.max_metric_drop:g} can never be reached: {metric.name} spans {span:g} at most, so the budget "
            f"would allow anything (it is in the metric's units: {0.01 * span:g} is 1% of its range)",
            source=cfg.source,
            field="budgets.max_metric_drop",
        )
    if b.max_size_bytes is not None:
        model = task.teacher() if task.pretrained else task.model_fn().eval()
        floor = min_artifact_bytes(space, build_inventory(model, task.example_inputs(), task.io))
        if b.max_size_bytes < floor:
            raise ConfigError(
                f"{b.max_size_bytes} bytes cannot be met: every artifact of this search space holds at "
                f"least {floor} bytes (the compressible layers' weights at their lowest allowed bits "
                "and rank)",
                source=cfg.source,
                field="budgets.max_size_bytes",
            )
    if b.max_latency_ms is not None:
        try:
            floor_ms = latency_floor_ms(task, backend)
        except AutoCompressError as exc:
            raise ConfigError(
                f"cannot time a trivial artifact to check the budget: {exc}",
                source=cfg.source,
                field="budgets.max_latency_ms",
            ) from None
        if b.max_latency_ms < LATENCY_MARGIN * floor_ms:
            raise ConfigError(
                f"{b.max_latency_ms:g} ms cannot be met: a one-operator artifact already takes "
                f"{floor_ms:.4f} ms per call on {backend.name}/{backend.device} at batch {backend.batch_size} "
                f"(budgets below {LATENCY_MARGIN:g}x that are rejected)",
                source=cfg.source,
                field="budgets.max_latency_ms",
            )


def check_override_patterns(cfg: StudyConfig, task: Task) -> None:
    """Raise ConfigError for a ``space.overrides`` layer or group pattern that matches no compressible
    layer of the task's model: a typo in a layer name would otherwise silently do nothing."""
    overrides = cfg.space.overrides
    patterns = []
    if isinstance(overrides.get("layers"), dict):
        patterns += [(f"space.overrides.layers.{p}", p) for p in overrides["layers"]]
    if isinstance(overrides.get("groups"), dict):
        patterns += [(f"space.overrides.groups.{g}", p) for g, p in overrides["groups"].items()]
    if not patterns:
        return
    model = task.teacher() if task.pretrained else task.model_fn().eval()
    names = [info.name for info in build_inventory(model, task.example_inputs())]
    for field, pattern in patterns:
        if not any(re.fullmatch(str(pattern), name) for name in names):
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} layers)" if len(names) > 8 else "")
            raise ConfigError(
                f"{pattern!r} matches no compressible layer of the model (a full match of the layer's name; "
                f"its layers: {shown})",
                source=cfg.source,
                field=field,
            )


def check_model_rules(cfg: StudyConfig, task: Task, space: SearchSpace) -> None:
    """The techniques' ``check_model`` rules: a space the model as a whole cannot use is refused
    (ConfigError naming the space file and the field). The model is built only when a rule asks for it."""
    built: list[nn.Module] = []

    def model() -> nn.Module:
        if not built:
            built.append(task.teacher() if task.pretrained else task.model_fn().eval())
        return built[0]

    for spec in TECHNIQUES.specs():
        if spec.check_model is not None:
            spec.check_model(space, model, space.source or cfg.source)


def trial_target(cfg: StudyConfig, n_trials: int | None) -> int:
    """The completed trials a run aims at: ``n_trials`` (an override) or the study's ``trials.n``.

    Raises:
        ConfigError: ``n_trials`` is not a count >= 1.
    """
    if n_trials is None:
        return cfg.trials.n
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ConfigError(
            f"{n_trials!r} is not a count of trials (>= 1)", source=cfg.source, field="n_trials"
        )
    return n_trials
