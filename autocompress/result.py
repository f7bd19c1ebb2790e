"""What a finished study gives back in Python: the front as objects, the baseline, the recommended model.

:func:`autocompress.run_study` returns a :class:`StudyResult`; :func:`autocompress.load_result` reads the
same object back from a run folder. It is built from what the run recorded (the trials' user attrs, the
study's ``metric_full`` and ``config``, ``baseline/metrics.json`` and the ``pareto/`` export), through
the same records as the command line's ``report`` and ``pick``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BackendError
from .export import front_records
from .pareto import pick, recommend
from .plan import Plan
from .rundir import BASELINE, read_baseline

if TYPE_CHECKING:
    import optuna
    import pandas as pd

# the figures of a front model, in this order, as to_pandas() columns
COLUMNS = (
    "trial",
    "metric",
    "metric_full",
    "metric_drop",
    "metric_drop_rel",
    "latency_ms",
    "latency_spread_ms",
    "latency_p90_ms",
    "speedup",
    "size_bytes",
    "size_ratio",
    "artifact_path",
)

BUDGETS = ("max_latency_ms", "max_metric_drop", "max_metric_drop_rel", "max_size_bytes")


@dataclass
class FrontModel:
    """One deployable model of the front (or the float baseline, with ``trial`` None).

    Attributes:
        trial: the Optuna trial number (None for the baseline).
        metric_name: the task's metric (``accuracy``, ``fidelity``, ...).
        metric: the metric the search compared trials on (the first ``trials.eval_samples`` eval samples
            when that is set, else the whole eval split), measured on the artifact.
        metric_full: the metric on the whole eval split (None where it was not measured).
        metric_drop: how much worse than the baseline artifact, in the metric's units (> 0 = worse).
        metric_drop_rel: the same drop relative to the baseline's value (0.01 = 1% worse).
        latency_ms: median latency per call, in milliseconds of the run's baseline timing (the trial was
            timed side by side with the baseline; see ``speedup``).
        latency_spread_ms: the interquartile range of the timed calls, on the same scale as ``latency_ms``.
        latency_p90_ms: the 90th percentile per call, on the same scale.
        speedup: baseline latency / this model's latency, timed side by side (1.0 for the baseline).
        size_bytes: the deployable artifact's bytes on disk.
        size_ratio: baseline bytes / these bytes (1.0 for the baseline).
        plan: the compression plan that rebuilds it (None for the baseline).
        artifact_path: the deployable file (``pareto/trial-NNNNN/model.onnx`` once exported).
    """

    trial: int | None
    metric_name: str
    metric: float
    metric_full: float | None
    metric_drop: float
    metric_drop_rel: float
    latency_ms: float
    latency_spread_ms: float | None
    latency_p90_ms: float | None
    speedup: float
    size_bytes: int
    size_ratio: float
    plan: Plan | None
    artifact_path: Path

    def load(self, *, threads: int = 1, device: str = "cpu") -> Any:
        """The artifact, ready to run.

        Args:
            threads: ONNX Runtime intra-op threads.
            device: ``cpu`` or ``cuda:N`` (ONNX Runtime's execution provider).

        Returns:
            an ``onnxruntime.InferenceSession`` for a ``.onnx`` artifact (``session.run(None, {name: x})``),
            a ``torch.nn.Module`` for a ``.pt2`` artifact (the ``torch.export`` program's module).

        Raises:
            BackendError: the artifact is missing or of a kind only its backend runs (``.om``).
        """
        path = self.artifact_path
        if not path.is_file():
            raise BackendError(f"artifact {path} does not exist (the run folder was moved or pruned)")
        if path.suffix == ".onnx":
            from .backends.ort_session import make_session

            return make_session(path, threads, device=device)
        if path.suffix == ".pt2":
            from .backends.torch_backend import safe_load_program

            return safe_load_program(path).module()
        raise BackendError(
            f"{path}: load() runs .onnx and .pt2 artifacts; run {path.suffix} with its backend"
        )

    def record(self) -> dict[str, Any]:
        """The model's figures as a plain dict (the columns of :meth:`StudyResult.to_pandas`)."""
        return {k: str(getattr(self, k)) if k == "artifact_path" else getattr(self, k) for k in COLUMNS}


@dataclass
class StudyResult:
    """The outcome of a study: its front, its baseline and the model to deploy within its budgets.

    Attributes:
        front: the feasible Pareto front, best metric first.
        baseline: the float model lowered by the same backend (``trial`` None).
        budgets: the study's ``budgets`` section (None = not set).
        study: the Optuna study itself (every trial, its params and user attrs).
        run_dir: the run folder (reports, ``trials.csv``, the ``pareto/`` export).
        completed / requested: completed trials and the trial count asked for (requested is None when
            the result was loaded from a folder).
        stopped: why the search stopped (``done``, ``timeout``, ``failures``; None when loaded).
    """

    front: list[FrontModel]
    baseline: FrontModel
    budgets: dict[str, float | None]
    study: optuna.Study
    run_dir: Path
    completed: int
    requested: int | None = None
    stopped: str | None = None

    @property
    def recommended(self) -> FrontModel | None:
        """The model the report recommends: within the study's budgets, the fastest when a metric budget is
        set (then the smallest), else the most accurate (then the fastest); None if none fits."""
        return self._model_of(recommend(self._points(), **self.budgets))

    def pick(
        self,
        max_latency_ms: float | None = None,
        max_metric_drop: float | None = None,
        max_metric_drop_rel: float | None = None,
        max_size_bytes: float | None = None,
    ) -> FrontModel | None:
        """The front model with the best metric within these budgets (then fastest, then smallest).

        The same rule as ``autocompress pick RUN --max-...``; a budget left None is not applied. Returns
        None when no front model fits.
        """
        chosen = pick(
            self._points(),
            max_latency_ms=max_latency_ms,
            max_metric_drop=max_metric_drop,
            max_metric_drop_rel=max_metric_drop_rel,
            max_size_bytes=max_size_bytes,
        )
        return self._model_of(chosen)

    def to_pandas(self) -> pd.DataFrame:
        """One row per front model (columns: :data:`COLUMNS` and ``recommended``), best metric first."""
        import pandas as pd

        best = self.recommended
        rows = [{**m.record(), "recommended": best is not None and m.trial == best.trial} for m in self.front]
        return pd.DataFrame(rows, columns=[*COLUMNS, "recommended"])

    def _points(self) -> list[dict]:
        return [m.record() for m in self.front]

    def _model_of(self, record: dict | None) -> FrontModel | None:
        if record is None:
            return None
        return next(m for m in self.front if m.trial == record["trial"])

    def __repr__(self) -> str:
        best = self.recommended
        pick_line = f"recommended trial {best.trial}" if best else "no model within the budgets"
        return (
            f"StudyResult({self.study.study_name!r}: {len(self.front)} front models of {self.completed} "
            f"completed trials, {pick_line}; run_dir={str(self.run_dir)!r})"
        )


def _scaled(stats: dict | None, key: str, latency_ms: float) -> float | None:
    """``stats[key]`` on the scale of ``latency_ms`` (a trial's figures are in the baseline's ms)."""
    if not stats or stats.get(key) is None or not stats.get("median_ms"):
        return None
    return stats[key] * latency_ms / stats["median_ms"]


def _front_model(rec: dict, trial: optuna.trial.FrozenTrial, run_dir: Path, subset: bool) -> FrontModel:
    ua = trial.user_attrs
    name = Path(ua["artifact"]).name
    exported = run_dir / rec["folder"] / name
    lat = float(rec["latency_ms"])
    return FrontModel(
        trial=rec["trial"],
        metric_name=rec.get("metric_name") or "metric",
        metric=float(rec["metric"]),
        metric_full=rec["metric_full"] if subset else float(rec["metric"]),
        metric_drop=float(rec["metric_drop"]),
        metric_drop_rel=float(rec["metric_drop_rel"]),
        latency_ms=lat,
        latency_spread_ms=_scaled(ua.get("latency"), "iqr_ms", lat),
        latency_p90_ms=rec.get("latency_p90_ms"),
        speedup=float(rec["speedup"]),
        size_bytes=int(rec["size_bytes"]),
        size_ratio=float(rec["size_ratio"]),
        plan=Plan.from_dict(ua["plan"]) if "plan" in ua else None,
        artifact_path=exported if exported.is_file() else run_dir / ua["artifact"],
    )


def _baseline_model(study: optuna.Study, run_dir: Path) -> FrontModel:
    b = read_baseline(run_dir) or dict(study.user_attrs.get("baseline", {}))
    stats = b.get("latency")
    return FrontModel(
        trial=None,
        metric_name=b.get("metric_name") or "metric",
        metric=float(b["metric"]),
        metric_full=b.get("metric_full", b["metric"] if b.get("eval_samples") is None else None),
        metric_drop=0.0,
        metric_drop_rel=0.0,
        latency_ms=float(b["latency_ms"]),
        latency_spread_ms=stats.get("iqr_ms") if stats else None,
        latency_p90_ms=b.get("latency_p90_ms"),
        speedup=1.0,
        size_bytes=int(b["size_bytes"]),
        size_ratio=1.0,
        plan=None,
        artifact_path=run_dir / BASELINE / b.get("artifact", "model.onnx"),
    )


def result_of(
    study: optuna.Study,
    run_dir: str | Path,
    *,
    requested: int | None = None,
    stopped: str | None = None,
) -> StudyResult:
    """The :class:`StudyResult` of ``study``, whose run folder is ``run_dir``."""
    from optuna.trial import TrialState

    run_dir = Path(run_dir).resolve()
    config = study.user_attrs.get("config", {})
    budgets = dict(config.get("budgets", {}))
    subset = config.get("trials", {}).get("eval_samples") is not None
    records = front_records(study)
    trials = {t.number: t for t in study.best_trials}
    front = [_front_model(r, trials[r["trial"]], run_dir, subset) for r in records]
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return StudyResult(
        front=front,
        baseline=_baseline_model(study, run_dir),
        budgets={k: budgets.get(k) for k in BUDGETS},
        study=study,
        run_dir=run_dir,
        completed=completed,
        requested=requested,
        stopped=stopped,
    )
