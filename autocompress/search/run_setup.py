"""Setting a run up: validate the study (nothing written when it is wrong), prepare the run folder
(teacher, baseline, study, applicability, sensitivity narrowing, warm starts), and load the context of
an existing run folder (Ray workers, ``autocompress rebuild``)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
import yaml
from filelock import FileLock, Timeout

from ..backends import Backend, LatencyCache
from ..backends.cache import cache_path
from ..backends.device_facts import environment
from ..config import StudyConfig, resolve_space_file
from ..context import RunContext, baseline_for_run
from ..errors import ConfigError
from ..inventory import build_inventory, unused_lines
from ..pareto import OBJECTIVES, objectives_for
from ..redact import mask_secrets, mask_url
from ..rundir import (
    RUN_LOCK,
    SETUP_LOCK,
    STUDY_YAML,
    backend_class,
    build_backend,
    load_teacher,
    read_baseline,
    teacher_for_run,
    write_text_atomic,
)
from ..scratch import run_scratch, scratch_under
from ..space import SearchSpace
from ..tasks import Task, load_task, validate_task
from .costs import estimate_trial_s
from .defaults import apply_finetune_default, apply_space_default, apply_time_budget
from .first_trials import EARLY, SETUP_STAGE, enqueue_first, finish_setup
from .housekeeping import (
    SetupUndo,
    clean_run_dir,
    discard_dominated_folders,
    frozen_heap,
    recover_interrupted,
)
from .multifidelity import make_pruner
from .preflight import check_budgets, check_model_rules, check_output, check_override_patterns, check_storage
from .samplers import make_sampler
from .storage import check_storage_url, make_storage


def directions_for(task: Task) -> list[str]:
    """Optuna directions of a study on ``task``: its metric's direction, then latency and size (min)."""
    return ["maximize" if s > 0 else "minimize" for s in objectives_for(task.metric_obj.sign).values()]


@dataclass
class Prepared:
    """Everything validated before the run folder is touched."""

    config: StudyConfig
    task: Task
    space: SearchSpace
    backend: Backend
    sampler: optuna.samplers.BaseSampler
    notes: tuple[str, ...] = ()  # defaults chosen from the model (search/defaults.py), logged at set-up


def prepare(cfg: StudyConfig, task: Task | None = None) -> Prepared:
    """Validate every part of a study that can be checked without writing anything.

    ``task``: a live :class:`~autocompress.Task` (from Python) instead of the study file's ``task.name``.

    Raises:
        ConfigError: naming the study file, the field and the rule.
    """
    src = cfg.source
    backend_cls = backend_class(cfg)
    space_file = resolve_space_file(cfg)
    space = SearchSpace.from_file(space_file, cfg.space.overrides, src)
    bad = sorted(space.bit_widths() - set(backend_cls.stored_bits))
    if bad:
        raise ConfigError(
            f"{bad[0]} is not allowed by backend {backend_cls.name!r} "
            f"(native: {', '.join(map(str, backend_cls.native_bits))}; "
            f"stored: {', '.join(map(str, backend_cls.stored_bits))})",
            source=space.source,  # the space file, and the study whose overrides asked for these bits
            field="bits",
        )
    _check_shared_weights(space, backend_cls)
    space.granularity_by_kind = dict(getattr(backend_cls, "weight_granularity", {}))
    space.allowed_by_kind["bits"] = dict(getattr(backend_cls, "bits_by_kind", {}))  # e.g. float tables
    try:
        sampler = make_sampler(cfg.sampler.name, cfg.sampler_seed, cfg.sampler.options)
    except ConfigError as exc:
        raise exc.at(src, "sampler.name") from None
    backend = build_backend(cfg)
    try:
        try:
            make_pruner(cfg.early_stopping)
        except ConfigError as exc:
            raise exc.at(src) from None
        _check_storage_url(cfg)
        check_output(cfg)
        check_storage(cfg)
        try:
            if task is not None:
                task = validate_task(task, "task")
            elif cfg.task.name is None:
                raise ConfigError("task.name is required (or pass a Task to run_study)", field="task.name")
            else:
                task = load_task(cfg.task.name, cfg.task.options, where="task")
        except ConfigError as exc:
            raise exc.at(src) from None
        if cfg.early_stopping.name != "none" and (
            task.train_split.tensors is None or task.metric_obj.needs_reference
        ):
            raise ConfigError(
                "early stopping holds out part of a training split of (inputs, labels) tensors and scores "
                "it without teacher outputs; this task has neither: use early_stopping.name: none",
                source=src,
                field="early_stopping.name",
            )
        note = apply_finetune_default(cfg, task)
        check_budgets(cfg, task, space, backend)
        check_override_patterns(cfg, task)
        check_model_rules(cfg, task, space)
    except BaseException:
        backend.close()
        raise
    return Prepared(cfg, task, space, backend, sampler, (note,) if note else ())


def _check_shared_weights(space: SearchSpace, backend_cls) -> None:
    """Weight sharing needs a backend that rebuilds shared weights at load (``shared_weight_kinds``)."""
    domains = [space.model.share_bits, *(ls.share_bits for ls in space.model.layers.values())]
    shared = sorted({int(v) for p in domains if p is not None for v in p.values()} - {0})
    if shared and not getattr(backend_cls, "shared_weight_kinds", ()):
        raise ConfigError(
            f"{shared[0]} is not allowed by backend {backend_cls.name!r}: it cannot rebuild shared weights "
            "from their indices and codebook at load (weight sharing: backend onnxruntime)",
            source=space.source,
            field="share_bits",
        )


def _check_storage_url(cfg: StudyConfig) -> None:
    try:
        check_storage_url(cfg.storage_url())
    except ConfigError as exc:
        raise exc.at(cfg.source, "storage") from None


@contextlib.contextmanager
def open_run(
    cfg: StudyConfig, log: Callable[[str], None] = print, *, exclusive: bool = True, task: Task | None = None
):
    """Validate, then prepare the run folder (teacher, baseline, study, warm starts) and yield the
    :class:`RunContext` and the Optuna study. Nothing is written if validation fails.

    ``exclusive`` holds the run-folder lock (one local runner per folder); workers that share a
    storage on purpose pass ``False``.
    """
    prep = prepare(cfg, task)
    run_dir = cfg.output_dir()
    undo = SetupUndo(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        prep.backend.close()
        raise ConfigError(
            f"cannot create run folder {str(run_dir)!r}: {exc.strerror}", source=cfg.source, field="output"
        ) from None
    lock = FileLock(str(run_dir / RUN_LOCK))
    if exclusive:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(
                f"another process is running this study in {run_dir}", source=cfg.source, field="output"
            ) from None
    set_up = False
    scratch = contextlib.ExitStack()  # temp folders under the run folder: a killed run leaves none elsewhere
    try:
        scratch.enter_context(scratch_under(run_scratch(run_dir, shared=not exclusive)))
        prep.backend.start_timing()  # e.g. the timing worker's imports, while the teacher loads
        torch.set_num_threads(cfg.finetune.threads)
        # workers starting together: the first one trains the teacher, measures the baseline and creates
        # the study; the others wait here, then load them
        with FileLock(str(run_dir / SETUP_LOCK)):
            try:
                teacher = teacher_for_run(prep.task, cfg, run_dir, log)
            except ConfigError as exc:
                raise exc.at(cfg.source) from None
            inventory = build_inventory(teacher, prep.task.example_inputs(), prep.task.io)
            for line in unused_lines(inventory):
                log(line)
            for line in [*prep.notes, apply_space_default(cfg, prep.space, inventory, prep.task)]:
                if line:
                    log(line)
            ctx = RunContext(cfg, run_dir, prep.task, teacher, inventory, prep.space, prep.backend)
            where = cache_path(cfg.backend.latency_cache, run_dir)
            ctx.latency_cache = LatencyCache(where) if where is not None else None
            _log_held_out(ctx, log)
            ctx.baseline = baseline_for_run(ctx, log)
            ctx.trial_estimate = estimate_trial_s(ctx, log)
            capped = apply_time_budget(cfg, ctx.trial_estimate)
            if capped:
                log(capped)
            study = _study(ctx, prep.sampler, log, shared=not exclusive)
            # the study is set up: the folder now holds it (a study configured in Python: the fields it
            # was given, as a study file)
            if Path(cfg.source).is_file():
                study_text = Path(cfg.source).read_text()
            else:
                study_text = yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True))
            write_text_atomic(run_dir / STUDY_YAML, mask_secrets(study_text))
        set_up = True
        if exclusive:  # no other runner writes here: what is half written is debris of a killed run
            clean_run_dir(run_dir, study, log)
            if cfg.trials.keep == "pareto":
                discard_dominated_folders(study, run_dir, log)
        with frozen_heap():
            yield ctx, study
    except ConfigError:
        if exclusive and not set_up:  # refused: the folder as it was (no other runner writes here)
            undo.undo()
        raise
    finally:
        prep.backend.close()
        scratch.close()
        if exclusive:
            lock.release()


def _log_held_out(ctx: RunContext, log: Callable[[str], None]) -> None:
    """Say what the held-out part of the training split is, or why finetune.keep_better has none."""
    cfg, held = ctx.config, ctx.held_out()
    if held.split is not None:
        n = held.split.n_samples()
        size = f"{n} samples" if n is not None else f"{len(held.split)} batches"
        readers = [
            *(["early_stopping"] if cfg.early_stopping.name != "none" else []),
            *(["finetune.keep_better"] if cfg.finetune.keep_better and cfg.finetune.trains() else []),
        ]
        log(
            f"held out {size} of the training split ({cfg.finetune.holdout_fraction:g}; trials fine-tune on "
            f"the rest) for {' and '.join(readers)}"
        )
    elif cfg.finetune.keep_better and cfg.finetune.trains():
        log(f"finetune.keep_better: no held-out part ({held.reason}): every trial keeps its fine-tuned model")


def _study(ctx: RunContext, sampler, log: Callable[[str], None], shared: bool = False) -> optuna.Study:
    """Create or load the study; on creation store the run's facts and enqueue the first trials (the
    peers' one-call answers, :mod:`.first_trials`), or, when a study plans none, set it up whole
    (applicability, warm starts).

    ``shared``: other workers run trials of this study right now, so RUNNING trials are not ours to
    recover; Optuna's heartbeat finds the dead ones instead (see :mod:`.storage`).
    """
    cfg, b = ctx.config, ctx.baseline
    w = cfg.workers
    beat = (
        {"heartbeat_interval_s": w.heartbeat_interval_s, "grace_period_s": w.grace_period_s} if shared else {}
    )
    storage = make_storage(cfg.storage_url(), max_retry=w.max_retry, retry_s=w.storage_retry_s, **beat)
    study = optuna.create_study(
        study_name=cfg.name,
        storage=storage,
        directions=directions_for(ctx.task),
        sampler=sampler,
        load_if_exists=True,
    )
    existing = study.get_trials(deepcopy=False)
    if "narrowed_domains" in study.user_attrs:  # Optuna needs the domains a study was created with
        ctx.space.narrow(study.user_attrs["narrowed_domains"])
    if existing:  # a resumed run: a sampler seeded as before would propose the same plans again
        study.sampler = make_sampler(
            cfg.sampler.name, resume_seed(cfg.sampler_seed, len(existing)), cfg.sampler.options
        )
    else:
        with warnings.catch_warnings():  # experimental in Optuna, stable enough for labels
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(OBJECTIVES))
        config = cfg.model_dump(mode="json")
        config["storage"] = mask_url(config["storage"]) if config.get("storage") else config.get("storage")
        study.set_user_attr("config", config)
        study.set_user_attr(
            "baseline", {k: b[k] for k in ("metric", "latency_ms", "size_bytes", "metric_name")}
        )
        study.set_user_attr("inventory", [i.to_dict() for i in ctx.inventory])
        study.set_user_attr("environment", environment(ctx.backend))
        _, planned = cfg.trials.starts()
        first = []
        if planned:  # the peers' one-call answers first; the rest of the set-up after them
            study.set_user_attr(SETUP_STAGE, EARLY)
            first = enqueue_first(ctx, study, planned, log)
        if not first:
            finish_setup(ctx, study, log)
    if not shared:
        recover_interrupted(study, storage, log, ctx.run_dir)
    return study


def resume_seed(seed: int, n_trials: int) -> int:
    """The sampler seed for a run resumed with ``n_trials`` already in the storage.

    Deterministic (the same resume gives the same plans) and different from the first run's seed
    (Optuna's seeded samplers would otherwise repeat the plans of the first trials).
    """
    if n_trials == 0:
        return seed
    return int(np.random.SeedSequence([seed, n_trials]).generate_state(1)[0])


def context_from_folder(
    cfg: StudyConfig, run_dir: Path, task: Task, space: SearchSpace | None, backend: Backend
) -> RunContext:
    """The :class:`RunContext` of a run folder set up before: its teacher and baseline loaded from it.

    Raises:
        ConfigError: the folder has no teacher for ``task`` or no measured baseline.
    """
    teacher = load_teacher(task, run_dir, cfg.source)
    ctx = RunContext(
        cfg, run_dir, task, teacher, build_inventory(teacher, task.example_inputs(), task.io), space, backend
    )
    ctx.baseline = read_baseline(run_dir)
    if ctx.baseline is None:
        raise ConfigError(
            f"the run folder {run_dir} has no measured baseline", source=cfg.source, field="output"
        )
    return ctx
