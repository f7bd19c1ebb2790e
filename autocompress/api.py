"""The Python entry points: run a study and get its result as objects, or read one back from its folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import StudyConfig, load_config
from .result import StudyResult, result_of
from .tasks import Task


def run_study(
    study: StudyConfig | str | Path,
    *,
    task: Task | None = None,
    n_trials: int | None = None,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> StudyResult:
    """Run (or resume) a study until it has its trials; export the front and write the report.

    Args:
        study: a :class:`StudyConfig` (from :func:`autocompress.configure` or :func:`load_config`), a study
            file, or a bundled study's name (``"quickstart"``).
        task: a live Task (a trained model, data, a metric) instead of the study's ``task.name``.
        n_trials: overrides ``trials.n``.
        log: where progress lines go (``lambda line: None`` for none).
        stop_after: stop after this many new trials in this call (a later call resumes).

    Returns:
        the :class:`StudyResult`: ``.front``, ``.recommended``, ``.pick(...)``, ``.to_pandas()``, ``.study``.

    Raises:
        ConfigError: bad input (one line naming the file or ``configure()``, the field and the rule).
    """
    from .search import run_study as run_search

    cfg = study if isinstance(study, StudyConfig) else load_config(study)
    run_dir = cfg.output_dir().resolve()  # the result's paths stay valid if the caller changes folder
    summary = run_search(cfg, task=task, n_trials=n_trials, log=log, stop_after=stop_after)
    return result_of(summary.study, run_dir, requested=summary.requested, stopped=summary.stopped)


def load_result(run_dir: str | Path, storage: str | None = None, study: str | None = None) -> StudyResult:
    """The :class:`StudyResult` of a finished (or interrupted) run folder, as :func:`run_study` returns it.

    Args:
        run_dir: the run folder (``runs/quickstart``).
        storage: the storage URL when the run did not use its own ``study.db``.
        study: the study's name when the storage holds several.

    Raises:
        ConfigError: no such folder, no storage, or no single study in it.
    """
    from .rundir import open_study

    return result_of(open_study(Path(run_dir), storage, study), run_dir)
