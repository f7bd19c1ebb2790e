"""What a refused command must leave as it was: a listing of folders with each file's size and SHA-256."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from pathlib import Path

# not ours: what libraries keep in the temp folder ($TMPDIR) for every process that uses them, ONNX
# Runtime's session id file and torch's compile cache folder (torchinductor_<user>)
FOREIGN = {".ses"}
FOREIGN_PREFIXES = ("torchinductor_",)


def foreign(name: str) -> bool:
    return name in FOREIGN or name.startswith(FOREIGN_PREFIXES)


def ours(folder: Path) -> list[str]:
    """The names in ``folder`` (a temp folder), less what libraries keep there (:func:`foreign`)."""
    return sorted(p.name for p in Path(folder).iterdir() if not foreign(p.name))


def snapshot(*roots: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``roots`` (recursively): (kind, size, sha256) by path; absent roots list nothing
    (nor the :func:`foreign` ones)."""
    out: dict[str, tuple[str, int, str]] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if not foreign(d)]
            for d in dirnames:
                out[str(Path(dirpath) / d)] = ("dir", 0, "")
            for f in filenames:
                if foreign(f):
                    continue
                p = Path(dirpath) / f
                if p.is_symlink() or not p.is_file():
                    out[str(p)] = ("other", 0, "")
                    continue
                data = p.read_bytes()
                out[str(p)] = ("file", len(data), hashlib.sha256(data).hexdigest())
    return out


def run_cli(*args) -> tuple[int, str, str]:
    """``autocompress ARGS`` in this process: (exit code, stdout, stderr)."""
    from autocompress.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def one_line(err: str) -> str:
    """The one line a refusal prints (fails on a traceback or several lines)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]
