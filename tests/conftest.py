from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny_tasks.py for module:factory tasks

# two threads per test process on this project's 2-core CI machine; under pytest-xdist (the README's
# test command runs two workers) each worker gets its share of the cores
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(scope="session")
def digits_task():
    from autocompress.tasks import load_task

    return load_task("digits", {"width": 16, "teacher_epochs": 4})


@pytest.fixture(scope="session")
def digits_teacher(digits_task):
    from autocompress.pipeline import train_teacher

    return train_teacher(digits_task, seed=0)


def cli_env() -> dict:
    env = dict(os.environ)
    # this checkout's package first (not another one installed in editable mode), then tests/ for tiny_tasks
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return env


def pytest_addoption(parser):
    parser.addoption(
        "--backend",
        action="append",
        default=[],
        metavar="NAME[:DEVICE]",
        help="backend (and device) the conformance suite runs against, e.g. torch:cuda:0, ascend, npu; "
        "repeatable; default: every registered backend on each device kind it declares",
    )
