"""Run-folder housekeeping: remove what a killed process left half written; keep only the front.

Every folder a run writes is built under a dot-name (``trials/.00012.tmp``, ``.pareto.tmp``,
``.baseline.tmp``) and renamed into place when whole, and a folder being deleted is first renamed to
``trials/.00012.del``. So after a ``kill -9`` the only debris is dot-named, plus possibly the folder of
a trial that was renamed into place but never recorded as complete. :func:`clean_run_dir` removes both
at the start of the next run (under the run-folder lock, so never while another runner writes).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..faults import crash_point
from ..optuna_compat import trial_id
from ..rundir import PARETO, TRIALS
from .first_trials import FIXED_PLAN
from .one_shot import POST_TRAINING

TRIAL_FILES = ("model.onnx", "plan.json", "metrics.json", "weights.safetensors")


def trial_folder(run_dir: Path, trial: optuna.trial.FrozenTrial) -> Path | None:
    """The folder a completed trial's record points to (None when it has no artifact)."""
    artifact = trial.user_attrs.get("artifact")
    return (Path(run_dir) / artifact).parent if artifact else None


class SetupUndo:
    """What setting a run up adds to its folder, taken away again when the set-up is refused.

    Made before the run folder is created: it remembers whether the folder existed and which entries it
    held. :meth:`undo` then removes the folder (and the parents made for it) if it is new, else only the
    entries added since (never the log files of a database that was there: SQLite folds them back in).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir).absolute()
        top = self.run_dir
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        self.top = top  # the outermost folder this run creates (when the run folder does not exist)
        self.before = set(os.listdir(self.run_dir)) if self.run_dir.is_dir() else None

    def undo(self) -> None:
        if self.before is None:
            shutil.rmtree(self.top, ignore_errors=True)
            return
        for name in sorted(set(os.listdir(self.run_dir)) - self.before):
            base, dash, kind = name.rpartition("-")
            if dash and kind in ("wal", "shm", "journal") and base in self.before:
                continue
            p = self.run_dir / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def clean_run_dir(run_dir: Path, study: optuna.Study, log: Callable[[str], None] = print) -> list[str]:
    """Delete temp/half-deleted folders and the folders of trials that never completed.

    Also puts ``pareto/`` back if a crash happened between moving the old export aside and moving the
    new one in. Returns the removed paths (relative to ``run_dir``).
    """
    run_dir = Path(run_dir)
    removed: list[str] = []
    pareto, old = run_dir / PARETO, run_dir / f".{PARETO}.old"
    if old.is_dir() and not pareto.exists():
        os.replace(old, pareto)
    debris = [p for p in run_dir.glob(".*") if p.name.endswith((".tmp", ".old")) or ".tmp." in p.name]
    trials_dir = run_dir / TRIALS
    if trials_dir.is_dir():
        complete = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        for p in trials_dir.iterdir():
            if p.name.startswith("."):
                debris.append(p)
            elif p.name.isdigit() and int(p.name) not in complete:
                debris.append(p)  # renamed into place, but the process died before the trial was told
    for p in sorted(debris):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(str(p.relative_to(run_dir)))
    if removed:
        log(f"removed what an interrupted run left behind: {', '.join(removed)}")
    return removed


def discard_dominated_folders(
    study: optuna.Study, run_dir: Path, log: Callable[[str], None] = print
) -> list[int]:
    """``trials.keep: pareto``: delete the artifact folders of completed trials not on the front.

    Their records stay in the storage (plan, metrics); ``autocompress rebuild`` re-creates them.
    A folder is renamed to ``trials/.NNNNN.del`` first, so it is never seen half deleted.
    Returns the trial numbers whose folders were deleted.
    """
    run_dir = Path(run_dir)
    front = {t.number for t in study.best_trials}
    deleted = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        folder = trial_folder(run_dir, t)
        if t.number in front or folder is None or not folder.is_dir():
            continue
        doomed = folder.with_name(f".{folder.name}.del")
        os.replace(folder, doomed)
        crash_point("discard")
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(t.number)
    if deleted:
        log(f"keep=pareto: deleted the artifacts of dominated trials {deleted} (records kept; see rebuild)")
    return deleted


# user attrs of a trial that its retry carries: what it was, and how it runs (post-training, a fixed plan)
RETRY_KEEPS = ("warm_start", "planned", POST_TRAINING, FIXED_PLAN)


def retry_attrs(user_attrs: dict, number: int) -> dict:
    """The user attrs of the retry of trial ``number``: what it was (a warm or a planned start, whose
    prediction is compared with what the retry measures) and ``retry_of``."""
    return {**{k: user_attrs[k] for k in RETRY_KEEPS if k in user_attrs}, "retry_of": number}


def recover_interrupted(study: optuna.Study, storage, log, run_dir: Path | None = None) -> None:
    """Trials left RUNNING by a dead process: mark failed with the reason, enqueue their plan again
    (and remove what the dead process may have left of their folders)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(trial_id(t), "fail_reason", "interrupted: the process running it died")
        storage.set_trial_user_attr(trial_id(t), "fail_category", "interrupted")
        storage.set_trial_state_values(trial_id(t), TrialState.FAIL)
        if t.params or FIXED_PLAN in t.user_attrs:  # the retry keeps what the trial was (a warm or
            # planned start: predicted vs measured) and runs the same plan
            study.enqueue_trial(
                t.params, user_attrs=retry_attrs(t.user_attrs, t.number), skip_if_exists=False
            )
        if run_dir is not None:
            for name in (f".{t.number:05d}.tmp", f"{t.number:05d}"):
                shutil.rmtree(run_dir / TRIALS / name, ignore_errors=True)
        log(f"trial {t.number} was interrupted; marked failed and queued again")


@contextlib.contextmanager
def frozen_heap():
    """Keep what is alive once the run is set up (libraries, data, teacher, baseline) out of the
    garbage collector's scans while trials run.

    Every trial ends with a full collection, so that the cycles of its model, optimizer and session
    are freed before the next one (memory stays flat over hours). Without the freeze, that collection
    walks the whole heap of torch, pandas and matplotlib each time (about 0.1 s per trial for the
    set-up heap alone: ``python benchmarks/bookkeeping.py``); frozen, it walks only what the trials
    created.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
