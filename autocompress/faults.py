"""Fault injection: the hooks that the reliability tests drive (the trial deadline is in :mod:`.deadline`).

Fault injection (for tests; both variables are read at the moment a hook runs)::

    AUTOCOMPRESS_CRASH_AT=<point>[@<trial>][,...]   SIGKILL this process at <point>
    AUTOCOMPRESS_FAULT=<kind>[@<trial>][,...]       make trial <trial> fail the way <kind> says

Crash points: ``finetune`` (second fine-tuning step), ``export`` (inside ``torch.onnx.export``),
``measure`` (while the artifact is being timed), ``artifact_write`` (trial folder half written in its
temp folder), ``renamed`` (folder in place, trial not yet told to the storage), ``told`` (trial
recorded, tables and pruning not yet done), ``discard`` (a dominated artifact half deleted),
``pareto_export`` (``pareto/`` half rebuilt), ``profile`` (the latency profile's first row measured, its
artifacts in the scratch folder). Fault kinds (each goes through the real code path):
``raise`` (an exception), ``nan`` (the fine-tuning loss becomes NaN), ``export`` (the exporter fails on
the model), ``ort_load`` (the artifact file is corrupted, so the runtime cannot load it), ``hang``
(every fine-tuning step sleeps 0.5 s, so ``trial_timeout_s`` fires), ``disk_full`` (writing the trial
folder fails with ``ENOSPC`` after the artifact and weights are written: for machines where a small
filesystem cannot be mounted; the tests use a real full tmpfs where they can).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from .deadline import check_deadline, current_trial

CRASH_ENV = "AUTOCOMPRESS_CRASH_AT"
FAULT_ENV = "AUTOCOMPRESS_FAULT"
CRASH_POINTS = (
    "finetune",
    "export",
    "measure",
    "artifact_write",
    "renamed",
    "told",
    "discard",
    "pareto_export",
    "profile",
)
FAULT_KINDS = ("raise", "nan", "export", "ort_load", "hang", "disk_full")


def _matches(env: str, name: str, number: int | None = None) -> bool:
    spec = os.environ.get(env, "")
    if not spec:
        return False
    number = current_trial() if number is None else number
    for item in spec.split(","):
        point, _, at = item.strip().partition("@")
        if point == name and (not at or (number is not None and int(at) == number)):
            return True
    return False


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(name: str, after_s: float = 0.0, trial: int | None = None) -> None:
    """SIGKILL this process here (or ``after_s`` seconds later, from a timer thread) if asked to.

    ``trial`` is the trial number where the hook runs outside :func:`trial_scope`.
    """
    if not _matches(CRASH_ENV, name, trial):
        return
    if after_s > 0:
        timer = threading.Timer(after_s, _kill_self)
        timer.daemon = True
        timer.start()
    else:
        _kill_self()


def fault(kind: str) -> bool:
    """Whether fault ``kind`` is injected into the current trial."""
    return _matches(FAULT_ENV, kind)


def on_step(step: int, loss: torch.Tensor) -> torch.Tensor:
    """Hook at every fine-tuning step: deadline check (:func:`.deadline.check_deadline`), then injected
    crash / NaN / hang."""
    check_deadline(f"fine-tuning (step {step})")
    if step == 1:
        crash_point("finetune")
    if fault("hang"):
        time.sleep(0.5)
    if step == 1 and fault("nan"):
        return loss * float("nan")
    return loss


def arm_export_hooks(model: torch.nn.Module) -> None:
    """Inject the ``export`` fault / crash point: fail (or die) inside ``torch.onnx.export``."""
    crash, fail = _matches(CRASH_ENV, "export"), fault("export")
    if not (crash or fail):
        return

    def hook(_module, _inputs):
        if torch.onnx.is_in_onnx_export():
            if crash:
                _kill_self()
            raise RuntimeError("injected fault: an operator the ONNX exporter does not support")

    model.register_forward_pre_hook(hook)
