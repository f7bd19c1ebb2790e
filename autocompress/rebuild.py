"""Re-create a trial's artifact from its stored plan and the run's cached teacher, and compare.

Every trial stores its plan, the seed, the fine-tuning thread count, the library versions and the
device. With the same teacher (``teacher.safetensors``), plan, seed and thread count, fine-tuning is
deterministic on the CPU (seeded initial state and batch order, one code path), so the rebuilt
artifact holds the same weights and scores the same accuracy, exactly. Latency is measured again,
side by side with the baseline artifact, and compared with the stored measurement's spread.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from .backends.device_facts import environment
from .config import StudyConfig, load_config
from .errors import ConfigError
from .objective import run_trial
from .plan import Plan
from .rundir import STUDY_YAML, build_backend, open_study, rebuilt_dir, write_json
from .search.run_setup import context_from_folder
from .tasks import load_task


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _config(study, run_dir: Path) -> StudyConfig:
    data = study.user_attrs.get("config")
    if data is None:  # runs recorded before the effective config was stored
        return load_config(run_dir / STUDY_YAML)
    data = dict(data)
    if "keep_better" not in data.get("finetune", {}):  # recorded before it existed: trials fine-tuned on all
        data["finetune"] = {**data.get("finetune", {}), "keep_better": False}
    cfg = StudyConfig.model_validate(data, strict=False)
    cfg.source = str(run_dir / STUDY_YAML)
    return cfg


def _completed_trial(study: optuna.Study, number: int, run_dir: Path) -> optuna.trial.FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise ConfigError(
            f"no trial {number} (the study has trials 0..{len(trials) - 1})", source=str(run_dir)
        )
    trial = trials[number]
    if trial.state != TrialState.COMPLETE or "plan" not in trial.user_attrs:
        raise ConfigError(
            f"trial {number} is {trial.state.name}: only completed trials have an artifact to rebuild",
            source=str(run_dir),
        )
    return trial


def _environment_changes(stored_env: dict, now_env: dict) -> dict:
    """Library versions, device and backend that differ between the trial's run and now."""
    return {
        k: (stored_env.get(k), now_env.get(k))
        for k in sorted(set(stored_env) | set(now_env))
        if k.startswith("version.") or k in ("device", "backend", "device_name")
        if stored_env.get(k) != now_env.get(k)
    }


def rebuild_trial(
    run_dir: str | Path,
    number: int,
    *,
    storage: str | None = None,
    study_name: str | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Rebuild completed trial ``number`` of the run in ``run_dir`` into a new folder.

    Returns a report: stored and rebuilt accuracy and latency, whether the accuracy is identical,
    whether the latency lies within the measurement spread, whether the artifact bytes are identical.

    Raises:
        ConfigError: no such trial, it did not complete, or the run folder lacks its teacher.
    """
    run_dir = Path(run_dir)
    study = open_study(run_dir, storage, study_name)
    trial = _completed_trial(study, number, run_dir)
    cfg = _config(study, run_dir)
    threads = trial.user_attrs.get("finetune_threads", cfg.finetune.threads)
    cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"threads": threads})})
    task = load_task(cfg.task.name, cfg.task.options)
    backend = build_backend(cfg)
    try:
        ctx = context_from_folder(cfg, run_dir, task, None, backend)
        out = Path(out) if out else rebuilt_dir(run_dir, number)
        out.parent.mkdir(parents=True, exist_ok=True)
        plan = Plan.from_dict(trial.user_attrs["plan"])
        stored_env = trial.user_attrs.get("environment", {})
        changed = _environment_changes(stored_env, environment(backend))
        if changed and stored_env:
            log(f"warning: the environment differs from the trial's: {changed}")
        log(f"rebuilding trial {number} into {out} ({threads} fine-tuning threads, seed {plan.seed})")
        metrics = run_trial(ctx, plan, out)
    finally:
        backend.close()
    report = _report(trial, metrics, run_dir, out, changed)
    write_json(out / "rebuild.json", report)
    return report


def _report(trial: optuna.trial.FrozenTrial, metrics: dict, run_dir: Path, out: Path, changed: dict) -> dict:
    ua = trial.user_attrs
    stored_lat = ua.get("latency", {})
    spread = max(stored_lat.get("iqr_ms", 0.0), metrics["latency"]["iqr_ms"])
    # the machine's load drifts between sessions; the objective is already drift-free: the ratio to the
    # baseline timed side by side, in the run's reference milliseconds (the key below is kept for readers)
    stored_folder = run_dir / ua["artifact"]
    return {
        "trial": trial.number,
        "folder": str(out),
        "metric_stored": trial.values[0],
        "metric_rebuilt": metrics["metric"],
        "metric_identical": metrics["metric"] == trial.values[0],
        "latency_ms_stored": trial.values[1],
        "latency_ms_rebuilt": metrics["latency_ms"],
        "latency_spread_ms": spread,
        "latency_ms_rebuilt_drift_corrected": metrics["latency_ms"],
        "latency_within_spread": abs(metrics["latency_ms"] - trial.values[1]) <= spread,
        # the timing statistics behind both ratios (how calm each session's measurement was)
        "latency_stats_stored": stored_lat,
        "latency_stats_rebuilt": metrics["latency"],
        "baseline_stats_stored": ua.get("baseline_latency", {}),
        "baseline_stats_rebuilt": metrics.get("baseline_latency", {}),
        "speedup_stored": ua.get("speedup"),
        "speedup_rebuilt": metrics.get("speedup"),
        "size_bytes_stored": int(trial.values[2]),
        "size_bytes_rebuilt": metrics["size_bytes"],
        "artifact_sha256": _sha256(out / Path(ua["artifact"]).name),
        "artifact_identical": (
            _sha256(stored_folder) == _sha256(out / stored_folder.name) if stored_folder.is_file() else None
        ),
        "environment_changes": changed,
    }


def format_report(r: dict) -> list[str]:
    """Human-readable lines of a :func:`rebuild_trial` report."""
    same = "identical" if r["metric_identical"] else "DIFFERENT"
    within = "within" if r["latency_within_spread"] else "OUTSIDE"
    art = {True: "identical bytes", False: "different bytes", None: "stored artifact deleted"}
    return [
        f"trial {r['trial']} rebuilt in {r['folder']}",
        f"metric: stored {r['metric_stored']:.6f} | rebuilt {r['metric_rebuilt']:.6f} ({same})",
        f"latency: stored {r['latency_ms_stored']:.4f} ms | rebuilt {r['latency_ms_rebuilt']:.4f} ms "
        f"(load-drift corrected {r['latency_ms_rebuilt_drift_corrected']:.4f} ms; {within} the measurement "
        f"spread of {r['latency_spread_ms']:.4f} ms); speedup vs baseline: "
        f"stored {r['speedup_stored'] or float('nan'):.3f}x | rebuilt {r['speedup_rebuilt'] or float('nan'):.3f}x",
        f"size: stored {r['size_bytes_stored']} | rebuilt {r['size_bytes_rebuilt']} bytes; "
        f"artifact vs stored: {art[r['artifact_identical']]}",
    ]
