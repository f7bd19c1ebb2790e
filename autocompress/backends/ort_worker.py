"""Timing worker: a clean process that times ONNX artifacts for the onnxruntime backend.

The parent (a study) fine-tunes with torch; torch's OpenMP threads keep spinning for a while after
each training step and would be timed along with the artifact. Timing in this separate process,
which never runs torch, removes that. Protocol: one JSON request per stdin line, one JSON reply
per stdout line::

    {"paths": [...], "input": "x.npy", "threads": 1, "device": "cpu", "pin_core": null}
    -> {"stats": [LatencyStats as dict, ...]}  or  {"error": "..."}
"""

from __future__ import annotations

import json
import os
import sys


def handle(req: dict) -> dict:
    import numpy as np

    from .base import time_callables
    from .onnxruntime import INPUT, make_session

    if req.get("pin_core") is not None:
        os.sched_setaffinity(0, {int(req["pin_core"])})
    x = np.load(req["input"])
    sessions = [make_session(p, req["threads"], device=req["device"]) for p in req["paths"]]
    fns = [lambda s=s: s.run(None, {INPUT: x}) for s in sessions]
    stats = time_callables(fns, device=req["device"], batch_size=len(x), **req.get("limits", {}))
    return {"stats": [s.to_dict() for s in stats]}


def main() -> None:
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies may reach the parent's pipe
    for line in sys.stdin:
        try:
            reply = handle(json.loads(line))
        except Exception as exc:  # reported to the parent, which raises BackendError
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            out.write(json.dumps(reply) + "\n")
            out.flush()
        except BrokenPipeError:  # the parent died (e.g. killed mid-measurement): nobody to answer
            return


if __name__ == "__main__":
    main()
