"""What several benchmarks do alike: run a study into a fresh folder with the study's own teacher."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER_FILES = ("teacher.safetensors", "teacher.json")


def copy_teacher(src: Path, dst: Path) -> bool:
    """Copy a run folder's trained teacher into ``dst`` (files already there are kept); False if none."""
    if not (src / TEACHER_FILES[0]).exists():
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for name in TEACHER_FILES:
        if not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
    return True


def fresh_run(study: str, prefix: str, overrides: dict | None = None):
    """``(config, folder)``: the study (a path relative to the repository) writing into a new temporary
        folder, without its wall-time budget, with the teacher of the study's own run folder when it has
        one (training it is not a trial's cost); ``overrides`` (dotted keys, as ``load_config`` takes) change
    other fields. The caller removes ``folder``."""
    from autocompress.config import load_config

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    study_file = ROOT / study
    cfg = load_config(
        study_file, {"output": str(folder / "run"), "trials.timeout_s": None, **(overrides or {})}
    )
    copy_teacher(ROOT / load_config(study_file).output, folder / "run")
    return cfg, folder
