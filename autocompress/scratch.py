"""Scratch folders: under the run folder while a study runs, so that a killed run leaves nothing in the
system's temp folder.

Artifacts lowered to be timed (the latency profile, applicability checks), the inputs handed to the
timing worker and the like are written to short-lived folders. While :func:`scratch_under` is active
(a study's set-up and trials: ``<run folder>/.scratch``), :func:`scratch_dir` makes them there; the
next run in that folder removes what a killed one left. Elsewhere (``autocompress measure``, the
checks before a run folder exists) they go to the system's temp folder, as ``tempfile`` chooses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["SCRATCH", "run_scratch", "scratch_dir", "scratch_under"]

SCRATCH = ".scratch"  # the run folder's scratch folder
_root: str | None = None


def run_scratch(run_dir: Path, *, shared: bool = False) -> Path:
    """A run's scratch folder: ``<run folder>/.scratch``, or, when other workers share the run folder
    (``shared``), a folder of this process's own in it."""
    folder = Path(run_dir) / SCRATCH
    return folder / f"{socket.gethostname()}-{os.getpid()}" if shared else folder


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary folder (``with scratch_dir("ac-x-") as tmp``), in the active scratch root if any."""
    root = _root
    if root is not None:
        os.makedirs(root, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=prefix, dir=root)


@contextlib.contextmanager
def scratch_under(folder: Path, *, clear: bool = True) -> Iterator[Path]:
    """Make scratch folders under ``folder`` while the block runs; ``folder`` is removed after it.

    ``clear``: first remove what a killed process left there (only when no other process may be using
    it: the run folder's lock is held).
    """
    global _root
    folder = Path(folder).absolute()
    if clear:
        shutil.rmtree(folder, ignore_errors=True)
    previous, _root = _root, str(folder)
    try:
        yield folder
    finally:
        _root = previous
        shutil.rmtree(folder, ignore_errors=True)
        if folder.parent.name == SCRATCH:  # a shared worker's own folder: the last one out removes .scratch
            with contextlib.suppress(OSError):
                folder.parent.rmdir()
