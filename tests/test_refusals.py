"""A refusal changes nothing and says one line: bad study files, bad task modules, bad flags of the other
commands (exit 2, the file or flag, the field and the rule; the run folder and the temp folder
byte-identical to before)."""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from refusal_helpers import one_line, run_cli, snapshot
from reliability_helpers import cli

BASE = {
    "name": "bad",
    "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 1}},
    "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml")},
    "trials": {"n": 1},
}


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """A temp folder of this test's own (for this process and the processes it starts)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def _study(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**BASE, **fields}))
    return path


def _refused(tmp_path: Path, private_tmp: Path, args: list, match: str, extra: tuple = ()) -> str:
    """Run the CLI; exit 2, one line matching ``match``, nothing written under tmp_path or the temp folder."""
    before = snapshot(tmp_path, *extra)
    rc, _, err = run_cli(*args)
    line = one_line(err)
    assert rc == 2, err
    assert re.search(match, line), line
    assert snapshot(tmp_path, *extra) == before
    return line


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (  # a typo must not create folders at the filesystem's root
            {"storage": "journal:///nonexistent_ac_dir/sub/j.log"},
            r"study.yaml: storage: cannot open '/nonexistent_ac_dir/sub/j.log': "
            r"folder '/nonexistent_ac_dir/sub' does not exist",
        ),
        (
            {"storage": "postgresql://user@:notaport/db"},
            r"study.yaml: storage: 'postgresql://user@:notaport/db' is not a database URL",
        ),
        (
            {"task": {"name": ":factory"}},
            r"study.yaml: task.name: ':factory' is not 'package.module:factory'",
        ),
        (
            {"task": {"name": "tiny_tasks:"}},
            r"study.yaml: task.name: 'tiny_tasks:' is not 'package.module:factory'",
        ),
    ],
    ids=["journal-folder", "url-port", "empty-module", "empty-factory"],
)
def test_bad_study_fields(tmp_path, private_tmp, fields, match):
    study = _study(tmp_path, **fields)
    _refused(tmp_path, private_tmp, ["run", study, "--output", tmp_path / "out"], match)
    assert not Path("/nonexistent_ac_dir").exists()


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("def factory(:\n", r"failed to import: SyntaxError: .*line 1"),
        ("raise RuntimeError('no data here')\n", r"failed to import: RuntimeError: no data here"),
        ("import no_such_module_ac\n", r"cannot import task module 'broken_ac_task': No module named"),
    ],
    ids=["syntax", "raises", "imports-missing"],
)
def test_task_module_that_cannot_be_imported(tmp_path, private_tmp, monkeypatch, source, match):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "broken_ac_task.py").write_text(source)
    monkeypatch.syspath_prepend(str(mods))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # the import must not write __pycache__ either
    study = _study(tmp_path, task={"name": "broken_ac_task:factory"})
    line = _refused(tmp_path, private_tmp, ["run", study, "--output", tmp_path / "out"], match)
    assert line.startswith(f"error: {study}: task.name: ")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (
            ["run", "{study}", "--n-trials", "-3"],
            r"command line: --n-trials: -3 is out of range \(must be >= 1\)",
        ),
        (["run", "{study}", "--n-trials", "0"], r"--n-trials: 0 is out of range"),
        (["worker", "{study}", "--n-trials", "0"], r"--n-trials: 0 is out of range"),
        (
            ["pick", "{out}", "--max-metric-drop-rel", "5"],
            r"--max-metric-drop-rel: 5 is out of range \(must be >= 0 and <= 1\)",
        ),
        (["pick", "{out}", "--max-latency-ms", "0"], r"--max-latency-ms: 0 is out of range \(must be > 0\)"),
        (["pick", "{out}", "--max-metric-drop", "-0.1"], r"--max-metric-drop: -0.1 is out of range"),
        (
            ["measure", "{onnx}", "--threads", "0"],
            r"--threads: 0 is out of range \(must be >= 1 and <= 256\)",
        ),
        (["measure", "{onnx}", "--batch-size", "0"], r"--batch-size: 0 is out of range"),
        (["measure", "{notonnx}"], r"notonnx.onnx: the file is not an ONNX model \(DecodeError"),
    ],
    ids=[
        "n-trials-neg",
        "n-trials-0",
        "worker-n-trials",
        "pick-rel",
        "pick-latency",
        "pick-drop",
        "threads",
        "batch",
        "not-onnx",
    ],
)
def test_bad_flags(tmp_path, private_tmp, args, match):
    study = _study(tmp_path)
    (tmp_path / "notonnx.onnx").write_text("not an ONNX model\n")
    names = {"study": study, "out": tmp_path / "out", "onnx": tmp_path / "notonnx.onnx"}
    names["notonnx"] = names["onnx"]
    _refused(tmp_path, private_tmp, [a.format(**names) for a in args], match)


# ------------------------------------------------------------------- refusals found while setting up


QUICK = {"warmup_s": 0.05, "min_s": 0.1, "max_s": 0.5}


def _tiny(tmp_path: Path, task: str, name: str = "tiny", **fields) -> Path:
    """A study of a tests/tiny_tasks task: one trial, one fine-tuning epoch, short timing."""
    data = {
        "name": name,
        "task": {"name": f"tiny_tasks:{task}"},
        "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml")},
        "finetune": {"epochs": 1, "threads": 1},
        "backend": {"options": {"timing": QUICK}},
        "sampler": {"name": "random"},
        "trials": {"n": 1, "warm_start": [{"bits": 8}]},
        "output": str(tmp_path / "run"),
    }
    for key, value in fields.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("task", "fields", "field", "match"),
    [
        (  # refused after the export was tried: what the set-up wrote is taken away again
            "not_exportable",
            {},
            "task",
            r"the baseline \(uncompressed model\) failed: torch.onnx.export failed: UnsupportedOperatorError: "
            r"Exporting the operator 'aten::linalg_svdvals'",
        ),
        (
            "stream_without_length",
            {},
            "finetune.epochs",
            r"1 epochs cannot be counted: the task's training split has no length; set finetune.steps",
        ),
        ("column_labels", {}, "task.targets", r"labels of shape \(\d+, 1\): metric 'accuracy'"),
        (
            "trained_mlp",
            {
                "space__overrides": {
                    "layers": {"2": {"bits": {"fixed": 8}}, "classifer": {"bits": {"fixed": 8}}}
                }
            },
            "space.overrides.layers.classifer",
            r"'classifer' matches no compressible layer of the model .*its layers: 0, 2\)",
        ),
        (
            "trained_mlp",
            {"space__overrides": {"groups": {"all": "fc.*"}}},
            "space.overrides.groups.all",
            r"'fc.\*' matches no compressible layer",
        ),
        (
            "trained_mlp",
            {"budgets__max_metric_drop": 5},
            "budgets.max_metric_drop",
            r"5 can never be reached: accuracy spans 1 at most",
        ),
    ],
    ids=["export", "stream-epochs", "column-labels", "layers-regex", "groups-regex", "drop-5"],
)
@pytest.mark.parametrize("folder", ["new", "empty"])
def test_refused_during_set_up_writes_nothing(tmp_path, private_tmp, task, fields, field, match, folder):
    study = _tiny(tmp_path, task, **fields)
    if folder == "empty":
        (tmp_path / "run").mkdir()
    line = _refused(tmp_path, private_tmp, ["run", study], match)
    assert line.startswith(f"error: {study}: {field}: "), line


def test_refused_run_into_a_good_folder_changes_nothing(tmp_path, private_tmp):
    """Another teacher's study into a folder that holds a finished run: refused, and the folder (its
    study.yaml, study.db, teacher.json, every file) byte-identical, with no SQLite log files left."""
    good = _tiny(tmp_path, "trained_mlp", name="good")
    proc = cli("run", good)  # its own process: the storage is closed when it ends, as a user's would be
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    assert {"study.yaml", "study.db", "teacher.json"} <= {p.name for p in run.iterdir()}
    other = _tiny(tmp_path, "trained_mlp", name="other", task__options={"seed": 1})
    before = snapshot(tmp_path, private_tmp)
    rc, _, err = run_cli("run", other)
    assert rc == 2, err
    assert re.search(
        rf"error: {other}: output: run folder {run} holds trials of a teacher with weights sha256",
        one_line(err),
    )
    assert snapshot(tmp_path, private_tmp) == before
    assert not list(run.glob("study.db-*"))


# ------------------------------------------------------------------------ credentials stay secret

SECRET = "s3cretPW"
UNREACHABLE = f"postgresql://alice:{SECRET}@127.0.0.1:1/db"


def test_an_unreachable_storage_with_a_password_is_refused_without_showing_it(
    tmp_path, private_tmp, monkeypatch
):
    monkeypatch.setenv("AUTOCOMPRESS_STORAGE_RETRY_S", "0")
    study = _study(tmp_path, storage=UNREACHABLE)
    line = _refused(
        tmp_path,
        private_tmp,
        ["run", study, "--output", tmp_path / "out"],
        r"storage: cannot open 'postgresql://alice:\*\*\*@127.0.0.1:1/db': ",
    )
    assert SECRET not in line
    _refused(tmp_path, private_tmp, ["worker", study, "--output", tmp_path / "out"], r"alice:\*\*\*@")
    (tmp_path / "out").mkdir()
    for command in ("report", "pick"):
        before = snapshot(tmp_path, private_tmp)
        rc, out, err = run_cli(command, tmp_path / "out", "--storage", UNREACHABLE)
        assert rc in (1, 2) and SECRET not in out + err and "alice:***@" in out + err, (rc, out, err)
        assert "Traceback" not in err
        assert snapshot(tmp_path, private_tmp) == before


def test_mask_secrets_hides_every_password_form():
    from autocompress.redact import mask_secrets, mask_url

    for text in (
        f"cannot open 'postgresql+psycopg2://alice:{SECRET}@127.0.0.1:1/db': x",
        f"mysql://bob:{SECRET}@host/db?charset=utf8",
        f"postgresql://alice:p@{SECRET}@host/db",  # a raw "@" in the password
        f"host=h user=alice password={SECRET} dbname=d",
        f"postgresql://alice@h/db?password={SECRET}",
    ):
        assert SECRET not in mask_secrets(text) and SECRET not in mask_url(text), text
    assert mask_url(UNREACHABLE) == "postgresql://alice:***@127.0.0.1:1/db"
    assert mask_secrets("sqlite:///runs/a@b/study.db") == "sqlite:///runs/a@b/study.db"


@pytest.mark.parametrize("n", [0, -3, True, 2.5])
def test_run_study_from_python_refuses_a_trial_count_that_is_not_one(tmp_path, private_tmp, n):
    from autocompress.config import load_config
    from autocompress.errors import ConfigError
    from autocompress.search import run_study

    study = _study(tmp_path, output=str(tmp_path / "out"))
    before = snapshot(tmp_path, private_tmp)
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(study))}: n_trials: {re.escape(repr(n))} is not a count"
    ):
        run_study(load_config(study), n_trials=n)
    assert snapshot(tmp_path, private_tmp) == before


def test_a_failed_export_prints_no_ir_dump(tmp_path, capfd):
    """torch.onnx.export writes its whole TorchScript graph to the process's stderr before it raises on an
    unsupported operator; the refusal's one line is all that reaches the terminal. A successful export's
    output is kept."""
    import torch
    from tiny_tasks import _Svd

    from autocompress.backends.onnx_export import export_onnx, native_output_kept_on_success

    with pytest.raises(Exception, match="linalg_svdvals"):
        export_onnx(_Svd().eval(), (torch.randn(1, 64),), tmp_path / "m.onnx")
    captured = capfd.readouterr()
    assert "Torch IR graph" not in captured.err + captured.out
    assert "graph(" not in captured.err + captured.out
    with native_output_kept_on_success():
        os.write(2, b"native words\n")
    assert capfd.readouterr().err == "native words\n"
