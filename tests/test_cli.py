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
    "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml")},
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
        _with(budgets__max_metric_drop_rel=2),
        r"study.yaml: budgets.max_metric_drop_rel: Input should be less than or equal to 1",
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

# More kinds of bad input. These run the same entry point in this process (``cli.main``, which the
# console script passes to ``sys.exit``): a fresh interpreter per case costs ~4 s of imports on this
# machine, and the cases above already prove the process-level path.
IN_PROCESS_CASES = [
    # renamed keys: refused with the new name
    (
        _with(pruner={"name": "hyperband"}),
        r"study.yaml: pruner: renamed; use early_stopping: \(Optuna's early stopping of hopeless trials; "
        r"its holdout_fraction is now finetune.holdout_fraction\)$",
    ),
    (
        _with(early_stopping={"name": "hyperband", "holdout_fraction": 0.3}),
        r"study.yaml: early_stopping.holdout_fraction: moved; use finetune.holdout_fraction$",
    ),
    # out-of-range values of every kind
    (
        _with(space__overrides={"rank_ratio": {"low": 0.0, "high": 1.0}}),
        r"rank_ratio: 0.0 is outside \(0, 1\]",
    ),
    (
        _with(space__overrides={"kd": {"alpha": {"low": 0.5, "high": 1.5}}}),
        r"kd.alpha: values must lie in \[0, 1\]",
    ),
    (_with(finetune={"lr": 0.0}), r"study.yaml: finetune.lr: Input should be greater than 0"),
    (_with(backend__threads=0), r"study.yaml: backend.threads: Input should be greater than or equal to 1"),
    (
        _with(trials__warm_start=[{"bits": 8, "sparsity": 1.0}]),
        r"study.yaml: trials.warm_start.0.sparsity: Input should be less than 1",
    ),
    (
        _with(trials__warm_start=[{"bits": 8, "schedule": "gradual"}]),
        r"study.yaml: trials.warm_start.0.schedule: 'gradual' is not one of \['one_shot', 'linear', 'cubic', 'exponential'\]",
    ),
    (
        _with(trials__trial_timeout_s=-1),
        r"study.yaml: trials.trial_timeout_s: Input should be greater than 0",
    ),
    (_with(trials__keep="everything"), r"study.yaml: trials.keep: Input should be 'all' or 'pareto'"),
    (
        _with(workers__storage_retry_s=-1),
        r"study.yaml: workers.storage_retry_s: Input should be greater than or equal to 0",
    ),
    # unknown keys below the top level, in the study file and in the space
    (_with(finetune={"epoch": 1}), r"study.yaml: finetune.epoch: unknown key \(did you mean 'epochs'\?\)"),
    (
        _with(space__overrides={"sparsty": {"fixed": 0.1}}),
        r"overrides in .*study.yaml\): sparsty: unknown key \(did you mean 'sparsity'\?\)",
    ),
    (
        _with(sampler__name="bayes"),
        r"study.yaml: sampler.name: unknown sampler 'bayes'; known: gp, nsga2, random, tpe",
    ),
    # storages that cannot be opened
    (
        _with(storage="sqlite:////nonexistent_dir_ac/study.db"),
        r"study.yaml: storage: cannot open '/nonexistent_dir_ac/study.db': folder '/nonexistent_dir_ac' does not exist",
    ),
    (
        _with(storage="nosuchdb://host/x"),
        r"study.yaml: storage: cannot open 'nosuchdb://host/x': unknown database dialect 'nosuchdb'",
    ),
    (
        _with(storage="postgresql://user@127.0.0.1:9/x"),
        r"study.yaml: storage: cannot open 'postgresql://user@127.0.0.1:9/x': \w+",
    ),
    (_with(storage="sqlite://"), r"study.yaml: storage: an in-memory SQLite storage would lose the study"),
    # budgets no plan can meet, said before anything runs
    (  # a float-only, unpruned, full-rank space cannot fit 1000 bytes (the weights alone are 8848)
        _with(
            budgets__max_size_bytes=1000,
            space__overrides={
                "bits": {"fixed": 32},
                "sparsity": {"fixed": 0.0},
                "rank_ratio": {"fixed": 1.0},
            },
        ),
        r"study.yaml: budgets.max_size_bytes: 1000 bytes cannot be met: every artifact of this search space "
        r"holds at least 8848 bytes",
    ),
    (
        _with(budgets__max_latency_ms=1e-6),
        r"study.yaml: budgets.max_latency_ms: 1e-06 ms cannot be met: a one-operator artifact already takes",
    ),
]


# Every bad study file is checked in this process (exit code 2, one line, nothing written); the first
# SUBPROCESS cases also through a real `autocompress run` process (its exit status and stderr): a process
# start costs ~3 s, so the rest are not repeated that way.
SUBPROCESS = 4


@pytest.mark.parametrize(
    ("text", "match"),
    IN_PROCESS_CASES + CASES[SUBPROCESS:],
    ids=range(len(IN_PROCESS_CASES) + len(CASES) - SUBPROCESS),
)
def test_bad_study_file_in_process(tmp_path, monkeypatch, capsys, text, match):
    from autocompress.cli import main

    study = tmp_path / "study.yaml"
    study.write_text(text)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(study), "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    import re

    assert re.search(match, lines[0]), lines[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


@pytest.mark.parametrize(("text", "match"), CASES[:SUBPROCESS], ids=range(SUBPROCESS))
def test_bad_study_file(tmp_path, text, match):
    proc, out = _run(tmp_path, text)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    import re

    assert re.search(match, lines[0]), lines[0]
    assert not out.exists()


def test_run_folder_that_cannot_be_created(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(_with())
    proc = subprocess.run(
        [sys.executable, "-m", "autocompress.cli", "run", str(study), "--output", "/proc/ac-no/run"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {study}: output: cannot create run folder '/proc/ac-no/run': No such file or directory"
    ]


def test_sqlite_file_that_is_not_a_database(tmp_path):
    (tmp_path / "notes.db").write_text("not a database\n")
    proc, out = _run(tmp_path, _with(storage=f"sqlite:///{tmp_path / 'notes.db'}"))
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.strip().endswith("file is not a database") and len(proc.stderr.strip().splitlines()) == 1
    )
    assert not out.exists() and (tmp_path / "notes.db").read_text() == "not a database\n"


def test_missing_study_file(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "autocompress.cli", "run", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    from autocompress.config import BUNDLED_STUDIES, bundled_names

    assert proc.returncode == 2
    names = ", ".join(bundled_names(BUNDLED_STUDIES))
    assert "quickstart" in names
    assert proc.stderr.strip() == (
        f"error: {tmp_path / 'nope.yaml'}: study file does not exist, nor is it a bundled study ({names})"
    )


def test_a_budget_at_the_reachable_bound_is_accepted_and_one_below_refused(tmp_path):
    """README: a reachable budget is never refused. The size bound is exact (a float, full-rank space's
    weights: 8848 bytes); latency: what a one-operator artifact and the float baseline really take."""
    from autocompress.config import load_config
    from autocompress.errors import ConfigError
    from autocompress.search.preflight import check_budgets, latency_floor_ms
    from autocompress.search.run_setup import prepare

    float_space = {"bits": {"fixed": 32}, "sparsity": {"fixed": 0.0}, "rank_ratio": {"fixed": 1.0}}

    def config(**budgets):
        study = tmp_path / "study.yaml"
        study.write_text(_with(space__overrides=float_space, budgets=budgets, output=str(tmp_path / "run")))
        return load_config(study)

    prepared = prepare(config())
    task, space, backend = prepared.task, prepared.space, prepared.backend
    try:
        check_budgets(config(max_size_bytes=8848), task, space, backend)  # at the bound: accepted
        with pytest.raises(ConfigError, match=r"8847 bytes cannot be met: .* at least 8848 bytes"):
            check_budgets(config(max_size_bytes=8847), task, space, backend)
        floor = latency_floor_ms(task, backend)
        baseline = backend.lower(task.model_fn().eval(), task.example_inputs(), {}, tmp_path / "baseline")
        reachable = backend.measure(baseline, task.example_inputs()).median_ms
        for ms in (floor, reachable):  # what real artifacts take: accepted
            check_budgets(config(max_latency_ms=ms), task, space, backend)
        with pytest.raises(ConfigError, match=r"ms cannot be met: a one-operator artifact already takes"):
            check_budgets(config(max_latency_ms=0.2 * floor), task, space, backend)
    finally:
        backend.close()
