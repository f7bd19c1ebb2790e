"""Safe loading audit: no pickle-based loading anywhere in the package."""

from __future__ import annotations

import re

from conftest import ROOT

UNSAFE = [
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bimport (c?pickle|dill|joblib)\b|\bfrom (c?pickle|dill|joblib) import"), "pickle module"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy allow_pickle=True"),
    (
        re.compile(r"\bTrial\w*\.__reduce__|\bshelve\b|yaml\.load\((?!.*Loader=yaml\.SafeLoader)"),
        "unsafe load",
    ),
]


def test_the_package_never_loads_pickles():
    hits = []
    for path in sorted((ROOT / "autocompress").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in UNSAFE:
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_weights_are_written_and_read_as_safetensors():
    sources = {p: p.read_text() for p in (ROOT / "autocompress").rglob("*.py")}
    writers = [p for p, s in sources.items() if "torch.save(" in s]
    assert not writers, writers
    assert any("safetensors.torch import" in s and "save_file" in s for s in sources.values())
