"""A run folder that cannot be written: the disk fills up, the folder turns read-only.

A trial that cannot write its folder fails with the reason (ENOSPC, EROFS), leaves nothing half written,
and the study stops at once with one line (every next trial would fail the same way), its plan queued
again; the same command resumes once space is freed. With root, ``trials/`` is a small real tmpfs that
is filled up, then remounted read-only; elsewhere the ``disk_full`` fault point (an ``ENOSPC`` raised
while the folder is written) drives the same code path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest
from optuna.trial import TrialState
from reliability_helpers import check_consistent, check_referenced_folders, cli, load, study_file

from autocompress.search.repeats import REPEAT_OF

pytestmark = pytest.mark.slow


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _check_stopped(run: Path, first: int, code: str, message: str) -> int:
    """The first trial from ``first`` on that ran (a repeat of an earlier plan writes nothing, see
    autocompress/search/repeats.py) failed with the write error, alone; its copy waits; no folder of it
    anywhere. Returns its number."""
    study = load(run)
    failed = next(t.number for t in study.trials if t.number >= first and REPEAT_OF not in t.user_attrs)
    # this run failed one trial, not one after another until trials.max_failures
    assert [t.number for t in study.get_trials(states=(TrialState.FAIL,)) if t.number >= failed] == [failed]
    assert study.trials[failed].user_attrs["fail_category"] == "run folder not writable"
    t = study.trials[failed]
    assert t.user_attrs["fail_reason"].startswith("RunFolderUnwritable: cannot write the trial folder in ")
    assert f"[{code}] {message}" in t.user_attrs["fail_reason"]
    assert not [x for x in study.trials if x.number > failed and x.state != TrialState.WAITING]
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.user_attrs["retry_of"] == failed
    names = {p.name for p in (run / "trials").iterdir()}
    assert f"{failed:05d}" not in names and f".{failed:05d}.tmp" not in names, names
    check_referenced_folders(run, study)
    return failed


def _check_resumed(run: Path, n: int, failed: int) -> None:
    study = check_consistent(run, n)
    (retry,) = [t for t in study.trials if t.user_attrs.get("retry_of") == failed]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == study.trials[failed].params


def test_disk_full_fault_stops_the_study_then_resumes(tmp_path):
    path, run = study_file(tmp_path, trials={"n": 4, "max_failures": 5}, backend__options__isolate=False)
    proc = cli("run", path, env={"AUTOCOMPRESS_FAULT": "disk_full@2"})
    line = _one_error_line(proc)
    assert line.startswith("error: RunFolderUnwritable: cannot write the trial folder in ")
    assert "[ENOSPC] No space left on device; free space" in line and "run the same command" in line
    _check_stopped(run, 2, "ENOSPC", "No space left on device")
    assert [t.state for t in load(run).trials[:2]] == [TrialState.COMPLETE] * 2
    again = cli("run", path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4/4 trials completed" in again.stdout
    _check_resumed(run, 4, 2)


@contextlib.contextmanager
def _tmpfs(where: Path, size: str):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the disk_full fault test covers the code path)")
    where.mkdir(parents=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(filler: Path) -> int:
    written = 0
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                written += f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return written


def test_real_full_disk_then_read_only_folder(tmp_path):
    path, run = study_file(tmp_path, trials={"n": 2, "max_failures": 5}, backend__options__isolate=False)
    with _tmpfs(run / "trials", "8m"):
        # the disk is full: the first trial fails writing its artifact, the study stops at once
        filler = run / "trials" / "filler"
        assert _fill(filler) > 0
        proc = cli("run", path)
        line = _one_error_line(proc)
        assert "[ENOSPC] No space left on device" in line, line
        filler.unlink()
        _check_stopped(run, 0, "ENOSPC", "No space left on device")
        # space freed: the same command resumes, the failed trial's plan first
        again = cli("run", path)
        assert again.returncode == 0, again.stderr[-3000:]
        _check_resumed(run, 2, 0)
        # the folder turns read-only
        subprocess.run(["mount", "-o", "remount,ro", str(run / "trials")], check=True)
        proc = cli("run", path, "--n-trials", 3)
        line = _one_error_line(proc)
        assert "[EROFS] Read-only file system" in line, line
        subprocess.run(["mount", "-o", "remount,rw", str(run / "trials")], check=True)
        failed = _check_stopped(run, 3, "EROFS", "Read-only file system")
        again = cli("run", path, "--n-trials", 3)
        assert again.returncode == 0, again.stderr[-3000:]
        _check_resumed(run, 3, failed)
