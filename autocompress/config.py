"""Study file -> validated config objects (strict: unknown keys and wrong types are errors).

Where a study file and its search space are found (:func:`resolve_study_file`, :func:`resolve_space_file`):

1. a path that exists is used as it is: relative to the working folder, or, for ``space.file`` only,
   relative to the folder of the study file that names it;
2. otherwise a bundled name resolves to the package's own copy: ``quickstart``, ``quickstart.yaml`` or
   ``studies/quickstart.yaml`` (the ``autocompress/studies/`` folder), and ``default``, ``default.yaml`` or
   ``search_spaces/default.yaml`` (``autocompress/search_spaces/``), so an installed package runs from
   any folder;
3. otherwise a :class:`~autocompress.errors.ConfigError` of one line lists the bundled names.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .bundled import BUNDLED_SPACES, BUNDLED_STUDIES, bundled_file, bundled_names
from .errors import ConfigError
from .validation_errors import format_validation_error


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TaskConfig(_Strict):
    # a built-in name or package.module:factory returning an autocompress.Task (may be left out when a
    # live Task is passed to autocompress.run_study)
    name: str | None = None
    options: dict[str, Any] = {}


class SpaceConfig(_Strict):
    # a space file, or the name of a bundled one (default, int8_linear, prune_only, ...)
    file: str = Field("default.yaml", min_length=1)
    overrides: dict[str, Any] = {}


class FinetuneConfig(_Strict):
    epochs: int = Field(3, ge=0, le=1000)
    steps: int | None = Field(None, ge=0)  # optimizer steps per trial instead of epochs (0: PTQ only)
    lr: float = Field(1e-3, gt=0, le=1.0)
    # the rate over the fine-tune: constant, or cosine (lr down to 0 at the last step; Plan.lr_schedule)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    batch_size: int = Field(64, ge=1)
    threads: int = Field(2, ge=1, le=256)
    # score each trial's post-training model and its fine-tuned one on the held-out part of the training
    # split (holdout_fraction; trials fine-tune on the rest) and keep the better one
    keep_better: bool = True
    # part of the training split held out (never fine-tuned on, not the test split); read by keep_better
    # and by early_stopping (each epoch's score)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    # which plans fine-tune (autocompress/finetune_policy.py): "always"; "missed_budget" (post-training
    # first, fine-tuned only when its held-out metric misses the budget and the plan removes weights);
    # "auto": missed_budget when the study sets neither epochs nor steps, else always
    when: Literal["auto", "always", "missed_budget"] = "auto"

    def trains(self) -> bool:
        """Whether trials fine-tune at all (steps, else epochs, above 0)."""
        return bool(self.steps) if self.steps is not None else self.epochs > 0


class BackendConfig(_Strict):
    name: str = "onnxruntime"
    device: str = "cpu"
    batch_size: int = Field(1, ge=1, le=4096)
    threads: int = Field(1, ge=1, le=256)
    options: dict[str, Any] = {}
    # latency cache: "run" (<output>/latency_cache.db), "user" (~/.cache/autocompress), "off", or a file
    latency_cache: str = Field("run", min_length=1)


class Budgets(_Strict):
    # how much worse than the baseline artifact the metric may get, in its own units (accuracy: points
    # of 1) and/or relative to the baseline's value (0.01 = 1%); direction from the task's metric
    max_metric_drop: float | None = Field(None, ge=0)
    max_metric_drop_rel: float | None = Field(None, ge=0, le=1)
    max_latency_ms: float | None = Field(None, gt=0)
    max_size_bytes: int | None = Field(None, gt=0)


class SamplerConfig(_Strict):
    name: str = "tpe"
    options: dict[str, Any] = {}
    # the sampler's own seed (default: the study's ``seed``, which also seeds the teacher and fine-tuning):
    # repeat a search with other samples over the same teacher
    seed: int | None = None


class WarmStart(_Strict):
    """A uniform plan tried before the sampler takes over (only searched dimensions are set).

    Besides the fields below, any per-layer field of a registered technique may be given (e.g.
    ``quant_mode: dynamic``); its value is checked against the technique's domain.
    """

    model_config = ConfigDict(extra="allow", strict=True)

    bits: int | None = None
    sparsity: float = Field(0.0, ge=0, lt=1)
    sparsity_kind: str | None = None
    rank_ratio: float = Field(1.0, gt=0, le=1)
    # plan-wide settings of the warm start (left to the sampler when absent)
    schedule: str | None = None  # sparsity schedule kind
    kd_temperature: float | None = Field(None, ge=1)
    kd_alpha: float | None = Field(None, ge=0, le=1)

    @field_validator("bits", "sparsity_kind", "schedule")
    @classmethod
    def _in_domain(cls, value, info):
        """A value the registered technique allows (``schedule``: a registered schedule kind)."""
        from .registry import TECHNIQUES

        name = "schedule.kind" if info.field_name == "schedule" else info.field_name
        dim = {d.name: d for d in [*TECHNIQUES.dims(), *TECHNIQUES.settings()]}.get(name)
        problem = None if value is None or dim is None else dim.problem(value)
        if problem is not None:
            raise PydanticCustomError("warm_start", "{problem}", {"problem": problem})
        return value

    @model_validator(mode="after")
    def _registered(self) -> WarmStart:
        """The extra keys: per-layer fields of registered techniques, with values in their domains."""
        from .registry import TECHNIQUES

        dims = {d.name: d for d in TECHNIQUES.dims()}
        for name, value in (self.model_extra or {}).items():
            if name not in dims:
                known = sorted({*dims, *type(self).model_fields})
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PydanticCustomError(
                    "warm_start",
                    "{key}: unknown key{hint}; allowed: {known}",
                    {"key": name, "hint": hint, "known": ", ".join(known)},
                )
            problem = dims[name].problem(value)
            if problem is not None:
                raise PydanticCustomError("warm_start", "{key}: {problem}", {"key": name, "problem": problem})
        return self

    def layer_values(self) -> dict[str, Any]:
        """The per-layer fields of the warm start (for ``SearchSpace.params_for``)."""
        values = {"bits": self.bits, "sparsity": self.sparsity, "sparsity_kind": self.sparsity_kind}
        return {**values, "rank_ratio": self.rank_ratio, **(self.model_extra or {})}


AUTO_PLANNED = 8  # planned starts of a study that names no warm start


class TrialsConfig(_Strict):
    n: int = Field(24, ge=1, le=100_000)
    timeout_s: float | None = Field(None, gt=0)
    warm_start: list[WarmStart] = [WarmStart(bits=8)]
    # plans from the measured latency and accuracy profiles, enqueued first (search/planned_starts.py):
    # "auto" = up to 8 when the study file gives no warm_start (which then has none), none when it
    # does; N = up to N besides the warm starts; 0 = none (the warm_start default, int8 everywhere)
    planned_starts: Literal["auto"] | int = Field("auto", union_mode="left_to_right")
    # also enqueue the plan built from the sensitivity analysis (autocompress inspect): per layer the
    # harshest bits / sparsity / rank whose accuracy drop alone stays within this value
    sensitivity_start: float | None = Field(None, ge=0, le=1)
    # narrow each layer's domains when the study is created: drop the choices whose accuracy drop alone
    # (sensitivity analysis) exceeds this value, and harsher ones; a resumed study keeps its domains
    sensitivity_narrow: float | None = Field(None, ge=0, le=1)
    # evaluate each trial's artifact on the first N eval samples during the search (null: all); the
    # front's models are then scored on the whole eval set (metric_full in their records)
    eval_samples: int | None = Field(None, ge=1)
    max_failures: int = Field(20, ge=0)
    trial_timeout_s: float | None = Field(None, gt=0)  # one trial's wall-time limit (failed past it)
    keep: Literal["all", "pareto"] = "all"  # "pareto": delete artifacts of dominated trials

    @field_validator("planned_starts")
    @classmethod
    def _planned(cls, value):
        if isinstance(value, int) and not 0 <= value <= 20:
            raise PydanticCustomError("planned_starts", "must be 'auto' or a count from 0 to 20")
        return value

    def starts(self) -> tuple[list[WarmStart], int]:
        """(the warm starts to enqueue, how many planned starts at most)."""
        given = "warm_start" in self.model_fields_set
        if self.planned_starts == "auto":
            return (self.warm_start, 0) if given else ([], AUTO_PLANNED)
        return (self.warm_start if given or not self.planned_starts else [], self.planned_starts)


class RayConfig(_Strict):
    """Resources of one Ray Tune trial (``autocompress run STUDY --ray ADDRESS``)."""

    cpus_per_trial: float = Field(1, ge=0)
    gpus_per_trial: float = Field(0, ge=0)
    resources: dict[str, float] = {}  # custom node resources, e.g. {NPU: 1}
    max_concurrent: int | None = Field(None, ge=1)
    max_failures: int = Field(2, ge=0)  # retries of a trial whose worker or node died (Tune FailureConfig)


class EarlyStoppingConfig(_Strict):
    """Optuna's early stopping of hopeless trials (its "pruners"; multi-fidelity): each fine-tuning epoch
    is scored on the held-out part of the training split (``finetune.holdout_fraction``)."""

    name: str = Field("none", pattern=r"^(none|successive_halving|hyperband)$")
    options: dict[str, Any] = {}  # the Optuna pruner's options (min_resource, reduction_factor, ...)


class WorkersConfig(_Strict):
    """Shared-storage workers (``autocompress worker``): Optuna heartbeats and retries."""

    heartbeat_interval_s: int = Field(5, ge=1)
    grace_period_s: int | None = Field(None, ge=1)  # default: 3 x heartbeat_interval_s
    max_retry: int = Field(3, ge=0)
    # a database server (PostgreSQL, MySQL) that went away: each storage call is retried on a fresh
    # connection for this long, then the worker stops with one line (env AUTOCOMPRESS_STORAGE_RETRY_S
    # overrides it)
    storage_retry_s: float = Field(120.0, ge=0)


class StudyConfig(_Strict):
    """Schema of a study file (``autocompress.configure(**fields)`` builds one in Python).

    Every field is documented in the bundled study ``quickstart`` (``autocompress/studies/quickstart.yaml``).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    task: TaskConfig
    space: SpaceConfig = SpaceConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    backend: BackendConfig = BackendConfig()
    budgets: Budgets = Budgets()
    sampler: SamplerConfig = SamplerConfig()
    trials: TrialsConfig = TrialsConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    ray: RayConfig = RayConfig()
    workers: WorkersConfig = WorkersConfig()
    seed: int = 0
    storage: str | None = None
    output: str | None = None

    # filled by load_config, not by the file
    source: str = Field("<study>", exclude=True)

    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.name}")

    @property
    def sampler_seed(self) -> int:
        return self.seed if self.sampler.seed is None else self.sampler.seed

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.output_dir() / 'study.db'}"


# study-file keys that were renamed: the old key is refused with the new one (field path -> rule)
RENAMED: dict[str, str] = {
    "pruner": "renamed; use early_stopping: (Optuna's early stopping of hopeless trials; its "
    "holdout_fraction is now finetune.holdout_fraction)",
    "early_stopping.holdout_fraction": "moved; use finetune.holdout_fraction",
}


def resolve_study_file(study: str | Path) -> Path:
    """The study file ``study`` names: an existing file, else a bundled study (see the module docstring).

    Raises:
        ConfigError: neither, with the bundled studies' names.
    """
    path = Path(study)
    if path.is_file():
        return path
    bundled = bundled_file(str(study), BUNDLED_STUDIES)
    if bundled is not None:
        return bundled
    names = ", ".join(bundled_names(BUNDLED_STUDIES))
    raise ConfigError(f"study file does not exist, nor is it a bundled study ({names})", source=str(study))


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read and validate a study file, or a bundled study by name (``quickstart``).

    Args:
        path: a study file, or a bundled study's name (see the module docstring for the lookup).
        overrides: dotted field -> value, applied before validation (``{"trials.n": 4}``).

    Raises:
        ConfigError: one line naming the file, the field and the rule.
    """
    path = resolve_study_file(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read study file: {exc.strerror}", source=source) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}not valid YAML: {problem}", source=source) from None
    if not isinstance(data, dict):
        raise ConfigError("a study file must be a YAML mapping (key: value lines)", source=source)
    for key, value in (overrides or {}).items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return validate_config(data, source)


def validate_config(data: dict[str, Any], source: str) -> StudyConfig:
    """A :class:`StudyConfig` from plain data, or a one-line ConfigError naming ``source`` and the field."""
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as exc:
        field, rule = format_validation_error(exc, StudyConfig, RENAMED)
        raise ConfigError(rule, source=source, field=field) from None
    cfg.source = source
    return cfg


CONFIGURE_SOURCE = "configure()"


def configure(**fields: Any) -> StudyConfig:
    """A study configured in Python, validated exactly as a study file is.

    The keyword arguments are the study file's top-level keys; sections are dicts (or the config
    objects themselves), e.g.
    ``configure(name="mine", task={"name": "digits"}, budgets={"max_metric_drop": 0.01}, trials={"n": 4})``.
    ``task`` may be left out when a live Task is passed to :func:`autocompress.run_study`.

    Raises:
        ConfigError: one line naming ``configure()``, the field and the rule (as for a file).
    """
    return validate_config({"task": {}, **fields}, CONFIGURE_SOURCE)


def resolve_space_file(cfg: StudyConfig) -> Path:
    """The search space file of ``cfg.space.file`` (see the module docstring for the lookup).

    Raises:
        ConfigError: neither a file nor a bundled space, with the bundled spaces' names.
    """
    p = Path(cfg.space.file)
    if p.is_file():
        return p
    source = Path(cfg.source)
    if not p.is_absolute() and source.is_file() and (source.resolve().parent / p).is_file():
        return source.resolve().parent / p
    bundled = bundled_file(cfg.space.file, BUNDLED_SPACES)
    if bundled is not None:
        return bundled
    names = ", ".join(bundled_names(BUNDLED_SPACES))
    raise ConfigError(
        f"search space file {cfg.space.file!r} does not exist, nor is it a bundled space ({names})",
        source=cfg.source,
        field="space.file",
    )
