"""What the per-trial bookkeeping costs, and what the two measures against it save, side by side.

1. The full garbage collection after every trial (``autocompress.objective.release_memory``), over the
   heap of a set-up run (the quickstart study prepared: torch, ONNX Runtime, Optuna, pandas and
   matplotlib loaded, the task's data, backend and search space built): as it is, and with that heap frozen as
   ``autocompress.search.run_setup.frozen_heap`` does for a run. This is the set-up heap's share only;
   in a run the collection also walks what the trials created.
2. One trial user attribute written to a SQLite storage (each is its own transaction): with Optuna's
   default (SQLite's rollback journal) and through ``make_storage`` (write-ahead log,
   ``synchronous=NORMAL``).

Prints milliseconds and ratios; not part of the test suite's pass/fail.

Usage::

    python benchmarks/bookkeeping.py
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def collection(repeats: int) -> tuple[float, float]:
    import matplotlib.pyplot  # noqa: F401  (the report's plots are loaded in a run)

    from autocompress.config import load_config
    from autocompress.search.housekeeping import frozen_heap
    from autocompress.search.run_setup import prepare

    prep = prepare(load_config(ROOT / "autocompress/studies/quickstart.yaml"))
    try:
        plain = _median_ms(gc.collect, repeats)
        with frozen_heap():
            frozen = _median_ms(gc.collect, repeats)
    finally:
        prep.backend.close()
    return plain, frozen


def storage_write(folder: Path, writes: int) -> tuple[float, float]:
    import optuna

    from autocompress.search.storage import make_storage

    out = []
    for name, storage in (
        ("journal", optuna.storages.RDBStorage(f"sqlite:///{folder / 'rollback.db'}")),
        ("wal", make_storage(f"sqlite:///{folder / 'wal.db'}")),
    ):
        study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
        trial = study.ask()
        values = iter(range(writes))
        out.append(_median_ms(lambda t=trial, v=values: t.set_user_attr(f"k{next(v)}", {"a": 1}), writes))
    return out[0], out[1]


def main() -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    plain, frozen = collection(repeats=7)
    with tempfile.TemporaryDirectory() as tmp:
        journal, wal = storage_write(Path(tmp), writes=300)
    print("per-trial bookkeeping, measured side by side in one process:")
    print(f"  full gc.collect() over the set-up heap: {plain:.1f} ms; with it frozen: {frozen:.2f} ms")
    print(
        f"  one SQLite user-attr write, rollback journal: {journal:5.2f} ms; WAL: {wal:5.2f} ms ({journal / wal:.1f}x less)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
