"""Property: any mutation of a valid study file (a wrong type, a value out of range, an unknown or
misspelt key, a bad URL, regex or path) is either accepted by the checks made before a run writes
anything, or refused with one ConfigError line naming the study file (``autocompress run``: exit 2,
that line, no traceback), and in both cases nothing is written: the study's folder, the run folder and
the temp folder are byte-identical to before."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from refusal_helpers import run_cli, snapshot

from autocompress.config import load_config
from autocompress.errors import ConfigError
from autocompress.search.run_setup import prepare

VALID = {
    "name": "mut",
    "task": {"name": "tiny_tasks:trained_mlp", "options": {"seed": 0, "hidden": 16}},
    "space": {
        "file": str(ROOT / "autocompress/search_spaces/default.yaml"),
        "overrides": {
            "sparsity": {"low": 0.0, "high": 0.5, "step": 0.1},
            "layers": {"2": {"bits": {"fixed": 8}}},
        },
    },
    "finetune": {"epochs": 1, "lr": 0.001, "batch_size": 64, "threads": 1},
    "backend": {"name": "onnxruntime", "device": "cpu", "threads": 1, "batch_size": 1},
    "budgets": {"max_metric_drop": 0.02, "max_metric_drop_rel": 0.05, "max_size_bytes": 100_000},
    "sampler": {"name": "tpe", "seed": 1},
    "trials": {"n": 3, "warm_start": [{"bits": 8}], "planned_starts": 0, "max_failures": 2, "keep": "all"},
    "workers": {"heartbeat_interval_s": 5, "storage_retry_s": 0},
    "seed": 0,
}

# (dotted path of a leaf, values that break it or might): types, ranges, names, URLs, regexes, paths
LEAVES = {
    "name": ["has space", "", 3, ["x"], "ok-name"],
    "task.name": ["digitz", ":factory", "tiny_tasks:", "tiny_tasks:nope", "no_such_mod:f", 7, None],
    "task.options.hidden": ["many", -1, 0, 1.5, [16]],
    "space.file": ["nowhere.yaml", "/proc/nope/space.yaml", 3, str(ROOT / "autocompress/studies/quickstart.yaml")],
    "space.overrides.sparsity.high": [1.5, -0.1, "half", None, 0.9],
    "space.overrides.layers": [{"(": {"bits": {"fixed": 8}}}, {"classifer": {}}, {"2": {"bitz": 8}}, "2"],
    "space.overrides.groups": [{"g": "["}, {"g": "nomatch.*"}, "everything", {"g": "0|2"}],
    "finetune.epochs": [-1, "3", 2.5, 10_000, 0],
    "finetune.lr": [0, -1e-3, "fast", 2.0],
    "finetune.threads": [0, 1000, "2"],
    "backend.name": ["tensorrt", "onnxruntim", None, 1],
    "backend.device": ["cuda:0", "npu:0", "gpu", "cpu:1"],
    "backend.threads": [0, -2, "1"],
    "backend.options": [{"nope": 1}, "fast", [1]],
    "budgets.max_metric_drop": [-0.1, "1%", [0.1], 0.0, 5],
    "budgets.max_metric_drop_rel": [1.5, -1, "x"],
    "budgets.max_size_bytes": [0, 10, -5, 1.5],
    "sampler.name": ["tpee", "bayes", 3],
    "sampler.options": [{"n_startup": 1}, "x"],
    "trials.n": [0, -3, "ten", 1.5, 200_000],
    "trials.planned_starts": [-1, 21, "some", 2.5],
    "trials.warm_start": [
        [{"bits": 3}],
        [{"sparsity": 1.0}],
        [{"bitz": 8}],
        "int8",
        [{"quant_mode": "fancy"}],
    ],
    "trials.keep": ["everything", 1],
    "early_stopping.name": ["asha", "hyperband", 1],
    "pruner.name": ["none"],  # the old key: refused with a pointer to early_stopping
    "finetune.holdout_fraction": [0, 1, 1.5],
    "workers.heartbeat_interval_s": [0, "5"],
    "seed": ["zero", 1.5, None],
    "storage": [
        "not a url",
        "postgresql://user@:notaport/db",
        "postgresql://alice:s3cretPW@127.0.0.1:1/db",
        "journal:///nonexistent_ac_dir/j.log",
        "sqlite:////nonexistent_ac_dir/study.db",
        "sqlite://",
        "nosuchdb://host/x",
        "mysql://u:pw@127.0.0.1:1/db",
        3,
    ],
    "output": ["/proc/ac-no/run", "{file}/run", 5],
}
SECRETS = ("s3cretPW",)


def _set(data: dict, dotted: str, value) -> None:
    node = data
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


def _misspell(key: str, how: int, at: int) -> str:
    at %= max(len(key), 1)
    if how == 0:
        return key[:at] + key[at + 1 :] or "x"  # a letter dropped
    if how == 1:
        return key[:at] + key[at] * 2 + key[at + 1 :]  # a letter doubled
    return key + "s"


@st.composite
def mutations(draw) -> tuple[str, dict]:
    data = copy.deepcopy(VALID)
    kind = draw(st.sampled_from(["value", "value", "value", "misspelt", "unknown"]))
    if kind == "value":
        leaf = draw(st.sampled_from(sorted(LEAVES)))
        value = draw(st.sampled_from(LEAVES[leaf]))
        _set(data, leaf, value)
        return f"{leaf}={value!r}", data
    sections = [k for k, v in data.items() if isinstance(v, dict)]
    section = draw(st.sampled_from([None, *sections]))
    node = data if section is None else data[section]
    if kind == "misspelt":
        key = draw(st.sampled_from(sorted(node)))
        bad = _misspell(key, draw(st.integers(0, 2)), draw(st.integers(0, 30)))
        node[bad] = node.pop(key)
        return f"{section or '<root>'}: {key} -> {bad}", data
    key = draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
    node[key] = draw(st.sampled_from([1, "x", None, {"a": 1}]))
    return f"{section or '<root>'}: + {key}", data


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("AUTOCOMPRESS_STORAGE_RETRY_S", "0")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    return tmp


@settings(
    max_examples=int(os.environ.get("AC_MUTATION_EXAMPLES", "150")),
    deadline=None,
    derandomize=os.environ.get("AC_MUTATION_EXAMPLES") is None,  # CI: the same examples each run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutation=mutations())
def test_a_mutated_study_is_refused_in_one_line_or_accepted_and_nothing_is_written(private_tmp, mutation):
    what, data = mutation
    folder = Path(tempfile.mkdtemp(dir=private_tmp.parent, prefix="example-"))
    (folder / "file").write_text("a file, not a folder\n")
    data.setdefault("output", str(folder / "run"))
    if isinstance(data.get("output"), str):
        data["output"] = data["output"].format(file=folder / "file")
    study = folder / "study.yaml"
    study.write_text(yaml.safe_dump(data))
    watched = (folder, private_tmp, Path("/nonexistent_ac_dir"))
    before = snapshot(*watched)
    try:
        prep = prepare(load_config(study))
    except ConfigError as exc:
        message = str(exc)
        event(f"refused: {exc.field or exc.source}")
        assert "\n" not in message, (what, message)
        assert str(study) in message, (what, message)
        assert not any(s in message for s in SECRETS), (what, message)
        rc, out, err = run_cli("run", study)  # the command refuses at the same check, the same way
        assert rc == 2, (what, out, err)
        assert err.strip() == f"error: {message}", (what, err)
    else:
        event("accepted")
        prep.backend.close()
    assert snapshot(*watched) == before, what
