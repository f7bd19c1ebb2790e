"""The run folder: its paths, atomic writes, the study in it, its teacher, its baseline, the backend.

One run folder (``output:`` of a study) holds::

    study.yaml                 the study file the run was started with
    study.db                   the Optuna storage (unless ``storage:`` names a shared one)
    teacher.json               the teacher's spec and weights' SHA-256
    teacher.safetensors        a ``model_fn`` teacher trained once for this folder
    baseline/                  the uncompressed model lowered by the same backend + metrics.json
    trials/NNNNN/              one folder per completed trial (artifact, plan.json, metrics.json, weights)
    pareto/                    the exported front (one folder per model + front.json)
    trials.csv, pareto.png, report.html (+ projections.png, layers.png, hypervolume.png)
    applicability.json, coverage.json, sensitivity.json, latency_cache.db
    run.lock, setup.lock, ask.lock

Every folder is written under a dot-name (``trials/.00012.tmp``, ``.baseline.tmp``, ``.pareto.tmp``)
and renamed into place whole; every file is written to a temp name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .errors import AutoCompressError, ConfigError
from .tasks import Task
from .tasks.base import weights_hash

if TYPE_CHECKING:
    import optuna

    from .backends import Backend
    from .config import StudyConfig

STUDY_YAML = "study.yaml"
STUDY_DB = "study.db"
TEACHER_META = "teacher.json"
TEACHER_WEIGHTS = "teacher.safetensors"
BASELINE = "baseline"
METRICS = "metrics.json"
TRIALS = "trials"
PARETO = "pareto"
FRONT = "front.json"
REBUILT = "rebuilt"
TRIALS_CSV = "trials.csv"
PARETO_PNG = "pareto.png"
REPORT_HTML = "report.html"
APPLICABILITY = "applicability.json"
COVERAGE = "coverage.json"
SENSITIVITY = "sensitivity.json"
LATENCY_PROFILE = "latency_profile.json"
RUN_LOCK, SETUP_LOCK, ASK_LOCK = "run.lock", "setup.lock", "ask.lock"
RAY = "ray"


def trial_dir(run_dir: Path, number: int) -> Path:
    """``trials/NNNNN``: the folder of trial ``number``."""
    return Path(run_dir) / TRIALS / f"{number:05d}"


def trial_tmp_dir(trial_folder: Path) -> Path:
    """``trials/.NNNNN.tmp``: where a trial's folder is written before it is renamed into place."""
    return trial_folder.with_name(f".{trial_folder.name}.tmp")


def pareto_folder_name(number: int) -> str:
    """``pareto/trial-NNNNN``, relative to the run folder."""
    return f"{PARETO}/trial-{number:05d}"


def rebuilt_dir(run_dir: Path, number: int) -> Path:
    """``rebuilt/trial-NNNNN``: where ``autocompress rebuild`` writes by default."""
    return Path(run_dir) / REBUILT / f"trial-{number:05d}"


def baseline_metrics_file(run_dir: Path) -> Path:
    return Path(run_dir) / BASELINE / METRICS


# --- atomic writes ----------------------------------------------------------------------------------


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``; ``tmp`` keeps the suffix (``.x.csv.tmp.csv``), so
    writers that choose the format by it (pandas, matplotlib) see the right one."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file atomically (temp file + rename): readers see the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=float))


def finalize_dir(tmp: Path, final: Path) -> None:
    """Move a fully written folder into place; an older folder of the same name is replaced."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


# --- the study, the baseline and the backend of a run ------------------------------------------------


def open_study(run_dir: Path, storage: str | None = None, study_name: str | None = None) -> optuna.Study:
    """The Optuna study of an existing run folder (its ``study.db``, or ``storage``).

    Raises:
        ConfigError: no such folder, no storage, or the storage holds none / several studies.
    """
    import optuna

    from .search.storage import make_storage, study_names

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError("run folder does not exist", source=str(run_dir))
    url = storage or f"sqlite:///{run_dir / STUDY_DB}"
    if storage is None and not (run_dir / STUDY_DB).exists():
        raise ConfigError(
            f"no {STUDY_DB} in the run folder (pass --storage for a shared storage)", source=str(run_dir)
        )
    names = study_names(url)
    if study_name is None:
        if len(names) != 1:
            raise ConfigError(f"storage holds studies {names}; choose one with --study", source=url)
        study_name = names[0]
    elif study_name not in names:
        raise ConfigError(f"no study {study_name!r} in the storage (has: {', '.join(names)})", source=url)
    return optuna.load_study(study_name=study_name, storage=make_storage(url))


def read_baseline(run_dir: Path) -> dict | None:
    """The baseline's ``metrics.json`` (None before it is measured)."""
    path = baseline_metrics_file(run_dir)
    return json.loads(path.read_text()) if path.exists() else None


def backend_class(cfg: StudyConfig) -> type[Backend]:
    """The registered backend class the study names.

    Raises:
        ConfigError: unknown backend (naming the study file and ``backend.name``).
    """
    from .backends import BACKENDS

    try:
        return BACKENDS.get(cfg.backend.name)
    except ConfigError as exc:
        raise exc.at(cfg.source, "backend.name") from None


def build_backend(cfg: StudyConfig) -> Backend:
    """The backend of the study's ``backend:`` section.

    Raises:
        ConfigError: unknown backend, bad option or unusable device (naming the study file and field).
    """
    backend_cls = backend_class(cfg)
    b = cfg.backend
    try:
        return backend_cls(device=b.device, batch_size=b.batch_size, threads=b.threads, **b.options)
    except TypeError as exc:
        raise ConfigError(f"bad backend option: {exc}", source=cfg.source, field="backend.options") from None
    except AutoCompressError as exc:
        raise ConfigError(str(exc), source=cfg.source, field="backend.device") from None


# --- the baseline ---------------------------------------------------------------------------------------


# --- the teacher --------------------------------------------------------------------------------------


def teacher_for_run(
    task: Task, cfg: StudyConfig, run_dir: Path, log: Callable[[str], None]
) -> torch.nn.Module:
    """The run's teacher.

    A trained model (``task.model``) is used as it is: its weights' SHA-256 is recorded in
    ``teacher.json`` and a run folder holding another checkpoint's trials is refused. A ``model_fn``
    teacher is trained once per run folder; later runs load it (safetensors, no pickle).
    """
    meta_path, weights = run_dir / TEACHER_META, run_dir / TEACHER_WEIGHTS
    if task.pretrained:
        return _pretrained_teacher(task, cfg, meta_path)
    spec = {
        "task": cfg.task.name,
        "options": cfg.task.options,
        "seed": cfg.seed,
        "epochs": task.teacher_epochs,
    }
    if meta_path.exists() and weights.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") != spec:
            raise ConfigError(
                f"run folder {run_dir} holds a teacher for {meta.get('spec')}, not {spec}; "
                "use another output folder",
                source=cfg.source,
                field="output",
            )
        model = task.model_fn()
        model.load_state_dict(load_file(str(weights)))
        return model.eval()
    from .training import train_teacher

    log(f"training the teacher ({task.teacher_epochs} epochs, cached in {run_dir})")
    model = train_teacher(task, seed=cfg.seed)
    tmp = run_dir / ".teacher.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    write_json(meta_path, {"spec": spec, "weights_sha256": weights_hash(model)})
    return model


def load_teacher(task: Task, run_dir: Path, source: str | None = None) -> torch.nn.Module:
    """The teacher of an existing run folder: the task's trained model (its weights checked against
    ``teacher.json``) or the ``model_fn`` model with the folder's ``teacher.safetensors``."""
    meta_path, weights = run_dir / TEACHER_META, run_dir / TEACHER_WEIGHTS
    if task.pretrained:
        model = task.teacher()
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if meta.get("weights_sha256") not in (None, weights_hash(model)):
            raise ConfigError(
                f"the task's model is not the checkpoint the run folder {run_dir} was searched with "
                "(weights sha256 differ)",
                source=source,
                field="task.model",
            )
        return model
    if not weights.is_file():
        raise ConfigError(
            f"the run folder {run_dir} has no teacher.safetensors", source=source, field="output"
        )
    model = task.model_fn()
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def _pretrained_teacher(task: Task, cfg: StudyConfig, meta_path: Path) -> torch.nn.Module:
    model = task.teacher()
    digest = weights_hash(model)
    spec = {"task": cfg.task.name or task.name, "options": cfg.task.options, "pretrained": True}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("weights_sha256") != digest:
            raise ConfigError(
                f"run folder {meta_path.parent} holds trials of a teacher with weights sha256 "
                f"{str(meta.get('weights_sha256'))[:12]}..., this task's model has {digest[:12]}...; "
                "a different checkpoint needs another output folder",
                source=cfg.source,
                field="output",
            )
    else:
        write_json(meta_path, {"spec": spec, "weights_sha256": digest})
    return model
