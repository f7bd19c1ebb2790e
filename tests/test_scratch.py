"""Scratch folders: under the run folder while active (cleared first, removed after), else the temp folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from autocompress.scratch import SCRATCH, run_scratch, scratch_dir, scratch_under


def test_scratch_folders_live_under_the_run_folder_while_active(tmp_path, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    run = tmp_path / "run"
    (run / SCRATCH / "ac-profile-left-by-a-killed-run").mkdir(parents=True)
    with scratch_under(run_scratch(run)):
        assert not (run / SCRATCH).exists()  # a killed run's leftovers are cleared first
        with scratch_dir("ac-time-") as tmp:
            assert Path(tmp).parent == run / SCRATCH
            (Path(tmp) / "x.npy").write_bytes(b"0" * 10)
        # a worker sharing the folder: a folder of its own
        with scratch_under(run_scratch(run, shared=True)), scratch_dir("ac-ort-") as tmp:
            assert Path(tmp).parent.parent == run / SCRATCH
            assert Path(tmp).parent.name.endswith(f"-{os.getpid()}")
    assert not (run / SCRATCH).exists() and sorted(p.name for p in run.iterdir()) == []
    with scratch_dir("ac-floor-") as tmp:  # no run: the system's temp folder
        assert Path(tmp).parent == temp
    assert list(temp.iterdir()) == []
