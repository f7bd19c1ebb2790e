"""Entry point of the generic timing worker (see :mod:`autocompress.backends.worker`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from .worker import pin_to

_BACKENDS: dict[str, object] = {}


def handle(req: dict) -> dict:
    import numpy as np

    from . import BACKENDS

    pin_to(req.get("pin_core"))
    options = {**req.get("options", {}), "isolate": False}
    key = json.dumps(
        [req["backend"], req["device"], req["batch_size"], req["threads"], options], sort_keys=True
    )
    backend = _BACKENDS.get(key)
    if backend is None:  # kept for the next requests: loaded (and compiled) programs are reused
        backend = _BACKENDS[key] = BACKENDS.get(req["backend"])(
            device=req["device"], batch_size=req["batch_size"], threads=req["threads"], **options
        )
    x = tuple(np.load(p) for p in req["inputs"]) if "inputs" in req else np.load(req["input"])
    artifacts = [backend.load_artifact(Path(p)) for p in req["paths"]]
    stats = backend.time_local(artifacts, x, **req.get("limits", {}))
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
            break
    for backend in _BACKENDS.values():  # sessions and temporary folders go now...
        with contextlib.suppress(Exception):
            backend.close()
    sys.stderr.flush()
    os._exit(0)  # ...so the interpreter's teardown of torch (about a second) is skipped: nothing is left


if __name__ == "__main__":
    main()
