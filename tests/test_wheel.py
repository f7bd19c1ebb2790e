"""The installed package runs anywhere: the built wheel, installed (not editable) into a fresh virtual
environment, runs a short hands-off study from an empty folder to an exported front, with the default
search space and the bundled studies found inside the installed package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

# a hands-off study: no space (the bundled default), no sampler, the run folder under the working folder;
# tiny settings (a width-8 CNN, 2 trials, short timing rounds) so that it takes about a minute
STUDY = """\
name: wheel
task: {name: digits, options: {width: 8, teacher_epochs: 2}}
finetune: {epochs: 1, threads: 1}
backend: {name: onnxruntime, options: {timing: {warmup_s: 0.05, min_s: 0.1, max_s: 0.5}}}
budgets: {max_metric_drop: 0.05}
trials: {n: 2, warm_start: [{bits: 8}]}
"""


def _run(cmd: list, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _wheel(tmp_path: Path, env: dict) -> Path:
    """The wheel, built from a copy of the sources (the build writes build/ and egg-info beside them)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "autocompress", src / "autocompress", ignore=shutil.ignore_patterns("__pycache__"))
    # a path, never a bare name (pip would look "src" up on an index); nothing is downloaded
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    cmd += ["-w", str(tmp_path / "dist"), str(src)]
    _run(cmd, tmp_path, env, 300)
    (wheel,) = (tmp_path / "dist").glob("autocompress-*.whl")
    return wheel


def test_the_wheel_installed_in_a_fresh_venv_runs_a_study_from_an_empty_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    wheel = _wheel(tmp_path, env)
    venv = tmp_path / "venv"
    # torch, optuna, onnxruntime, ... come from this interpreter's site-packages, and so does pip
    _run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
        tmp_path,
        env,
        120,
    )
    python = venv / "bin" / "python"
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], tmp_path, env, 300)

    work = tmp_path / "empty"
    work.mkdir()
    probe = (
        "import autocompress; from autocompress.config import resolve_space_file; "
        "cfg = autocompress.load_config('quickstart'); "
        "print(autocompress.__file__, cfg.source, resolve_space_file(cfg))"
    )
    where, quickstart, space = _run([python, "-c", probe], work, env, 120).stdout.split()
    site = Path(where).resolve().parent
    assert site.is_relative_to(venv.resolve()), f"not the wheel's autocompress: {where}"
    assert Path(quickstart) == site / "studies" / "quickstart.yaml"
    assert Path(space) == site / "search_spaces" / "default.yaml"
    assert list(work.iterdir()) == []  # loading a study writes nothing

    (work / "study.yaml").write_text(STUDY)
    _run([venv / "bin" / "autocompress", "run", "study.yaml"], work, env, 600)
    run = work / "runs" / "wheel"
    front = json.loads((run / "pareto" / "front.json").read_text())["front"]
    assert front, "an empty front"
    for r in front:
        assert (run / r["folder"] / "model.onnx").is_file()
    assert (run / "report.html").is_file() and (run / "study.db").is_file()
