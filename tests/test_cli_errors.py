"""Bad input: one line naming the file, the field and the rule; exit code 2; nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, cli_env

BASE = {
    "name": "bad",
    "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 1}},
    "space": {"file": str(ROOT / "search_spaces/default.yaml")},
    "trials": {"n": 1},
}


def _run(tmp_path, study_text: str):
    study = tmp_path / "study.yaml"
    study.write_text(study_text)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "autocompress.cli", "run", str(study), "--output", str(out)],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=120,
    )
    return proc, out


def _with(**changes) -> str:
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is _DELETE:
            node.pop(last)
        else:
            node[last] = value
    return yaml.safe_dump(data)


_DELETE = object()

CASES = [
    ("name: [unclosed\n", r"study.yaml: line \d+: not valid YAML"),
    ("- just\n- a list\n", r"study.yaml: a study file must be a YAML mapping"),
    (_with(trails={"n": 3}), r"study.yaml: trails: unknown key \(did you mean 'trials'\?\)"),
    (_with(trials__n="many"), r"study.yaml: trials.n: Input should be a valid integer"),
    (_with(trials__n=0), r"study.yaml: trials.n: Input should be greater than or equal to 1"),
    (
        _with(budgets__max_accuracy_drop=2),
        r"study.yaml: budgets.max_accuracy_drop: Input should be less than or equal to 1",
    ),
    (_with(task=_DELETE), r"study.yaml: task: required field is missing"),
    (
        _with(task__name="digitz"),
        r"study.yaml: task.name: unknown task 'digitz' \(did you mean 'digits'\?\); known: digits",
    ),
    (
        _with(task__name="no_such_module:f"),
        r"study.yaml: task.name: cannot import task module 'no_such_module'",
    ),
    (
        _with(task={"name": "tiny_tasks:raises"}),
        r"study.yaml: task: task factory 'tiny_tasks:raises' raised RuntimeError: dataset server unreachable",
    ),
    (
        _with(task={"name": "tiny_tasks:wrong_output"}),
        r"study.yaml: task: task model output \(2, 2\) does not match the data",
    ),
    (
        _with(backend__name="tensorrt"),
        r"study.yaml: backend.name: unknown backend 'tensorrt'; known: ascend, onnxruntime, torch",
    ),
    (_with(backend__device="cuda:0"), r"study.yaml: backend.device: .*device 'cuda:0' is not supported"),
    (
        _with(sampler__name="tpee"),
        r"study.yaml: sampler.name: unknown sampler 'tpee' \(did you mean 'tpe'\?\)",
    ),
    (_with(sampler__options={"n_startup": 3}), r"study.yaml: sampler.options: bad option for sampler 'tpe'"),
    (
        _with(space__file="nowhere.yaml"),
        r"study.yaml: space.file: search space file 'nowhere.yaml' does not exist",
    ),
    (_with(space__overrides={"bits": {"choices": [7, 8]}}), r"bits: 7 is not an allowed bit width"),
    (_with(space__overrides={"sparsity": {"low": 0.2, "high": 1.5}}), r"sparsity: 1.5 is outside \[0, 1\)"),
    (_with(name="has space"), r"study.yaml: name: String should match pattern"),
    (_with(storage="not a url"), r"study.yaml: storage: 'not a url' is not a database URL"),
]


@pytest.mark.parametrize(("text", "match"), CASES, ids=range(len(CASES)))
def test_bad_study_file(tmp_path, text, match):
    proc, out = _run(tmp_path, text)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    import re

    assert re.search(match, lines[0]), lines[0]
    assert not out.exists()


def test_missing_study_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "autocompress.cli", "run", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: study file does not exist"
