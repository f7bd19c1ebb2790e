"""A generic timing worker: a clean process, optionally pinned to chosen cores, that times artifacts.

Any backend with a ``time_local(artifacts, x)`` method can time in it (onnxruntime and torch do). The parent holds the device lock; the
worker only loads the artifacts and runs :func:`~autocompress.backends.base.time_callables`.
The entry point is :mod:`autocompress.backends.worker_main`. Protocol: one JSON request per stdin line, one JSON reply per stdout line::

    {"backend": "torch", "device": "cpu", "batch_size": 1, "threads": 1, "options": {...},
     "paths": [...], "inputs": ["x0.npy", ...], "pin_core": [0], "limits": {...}}
    -> {"stats": [LatencyStats as dict, ...]}  or  {"error": "..."}
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import TimingError
from ..scratch import scratch_dir


def pin_to(cores: int | list[int] | None) -> None:
    """Restrict this process to ``cores`` (an int or a list of ints); None leaves it alone."""
    if cores is None:
        return
    wanted = {int(cores)} if isinstance(cores, int) else {int(c) for c in cores}
    os.sched_setaffinity(0, wanted)


class WorkerClient:
    """Starts the worker on first use and keeps it for the next requests; ``close()`` ends it."""

    def __init__(self, threads: int):
        self.threads = threads
        self._proc: subprocess.Popen | None = None
        self._asked = False  # whether the running worker has been sent a request

    def start(self) -> subprocess.Popen:
        """The worker process, started now unless it runs (it answers once its imports are done)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            package_root = str(Path(__file__).resolve().parents[2])  # the worker runs this same code
            env = {
                **os.environ,
                "OMP_NUM_THREADS": str(self.threads),
                "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
            }
            proc = self._proc = subprocess.Popen(
                [sys.executable, "-m", "autocompress.backends.worker_main"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            self._asked = False
        return proc

    def ask(self, request: dict) -> dict:
        proc = self.start()
        self._asked = True
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError) as exc:
            self.close()
            raise TimingError(f"timing worker died: {exc}") from exc
        if not line:
            self.close()
            raise TimingError("timing worker exited without a reply")
        reply = json.loads(line)
        if "error" in reply:
            raise TimingError(f"timing failed: {reply['error']}")
        return reply

    def time(self, backend, paths: list, x, limits: dict, options: dict) -> list:
        """Time ``paths`` side by side in the worker with ``backend``'s settings; LatencyStats each.

        ``options`` are the backend options the worker needs to rebuild an equivalent backend.
        """
        import numpy as np

        from .base import LatencyStats

        with scratch_dir("ac-time-") as tmp:
            xs = (x,) if isinstance(x, np.ndarray) else tuple(x)
            files = [str(Path(tmp) / f"x{i}.npy") for i in range(len(xs))]
            for f, a in zip(files, xs, strict=True):
                np.save(f, a)
            reply = self.ask(
                {
                    "backend": backend.name,
                    "device": backend.device,
                    "batch_size": backend.batch_size,
                    "threads": backend.threads,
                    "options": options,
                    "paths": [str(p) for p in paths],
                    "inputs": files,
                    "pin_core": backend.options.get("pin_core"),
                    "limits": limits,
                }
            )
        return [LatencyStats(**d) for d in reply["stats"]]

    def close(self) -> None:
        """End the worker: at once when it was never asked anything (it may still be importing, which
        takes seconds, and holds nothing), else by closing its input and waiting for it to exit."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.stdin.close()
        if self._asked:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
