"""The run's teacher: a trained model checked against the run folder, or a ``model_fn`` model trained once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import StudyConfig
from ..errors import ConfigError
from ..objective import write_json
from ..tasks import Task
from ..tasks.base import weights_hash
from ..training import train_teacher


def teacher_for_run(
    task: Task, cfg: StudyConfig, run_dir: Path, log: Callable[[str], None]
) -> torch.nn.Module:
    """The run's teacher.

    A trained model (``task.model``) is used as it is: its weights' SHA-256 is recorded in
    ``teacher.json`` and a run folder holding another checkpoint's trials is refused. A ``model_fn``
    teacher is trained once per run folder; later runs load it (safetensors, no pickle).
    """
    meta_path, weights = run_dir / "teacher.json", run_dir / "teacher.safetensors"
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
    meta_path, weights = run_dir / "teacher.json", run_dir / "teacher.safetensors"
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
