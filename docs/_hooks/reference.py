"""MkDocs hook: the reference pages are generated from the code at build time.

* ``<!-- generated: study-schema -->`` becomes one table per section of a study file, read from the
  pydantic models of ``autocompress/config.py`` (type, default, rule, and the field's description: its
  ``Field(description=...)`` or the comment written beside or above it in the source).
* ``<!-- generated: cli -->`` becomes each command's usage and arguments, read from the argparse parser
  of ``autocompress/cli.py``.
* ``<!-- generated: api -->`` becomes one mkdocstrings block per name in ``autocompress.__all__``.
* A nav entry that is a folder (``howto/``) becomes the Markdown pages in that folder (``index.md``
  first, then by file name), so pages added to a folder appear in the site without editing the nav.
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

MARKER = re.compile(r"<!-- generated: ([a-z-]+) -->")


# -- nav ---------------------------------------------------------------------------------------------


def _expand(entry: Any, docs_dir: Path) -> Any:
    if isinstance(entry, list):
        return [_expand(e, docs_dir) for e in entry]
    if isinstance(entry, dict):
        return {k: _expand(v, docs_dir) for k, v in entry.items()}
    if isinstance(entry, str) and entry.endswith("/"):
        folder = docs_dir / entry
        pages = sorted(folder.glob("*.md"), key=lambda p: (p.name != "index.md", p.name))
        return [p.relative_to(docs_dir).as_posix() for p in pages]
    return entry


def on_config(config, **kwargs):
    """Expand folder entries of the nav into the pages they hold."""
    config["nav"] = _expand(config["nav"], Path(config["docs_dir"]))
    return config


# -- study-file schema --------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    if annotation is None or annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (list, dict):
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def _rule(field) -> str:
    words = {
        "ge": ">=",
        "gt": ">",
        "le": "<=",
        "lt": "<",
        "min_length": "length >=",
        "max_length": "length <=",
    }
    parts = []
    for meta in field.metadata:
        for attr, word in words.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{word} {value}")
        pattern = getattr(meta, "pattern", None)
        choices = re.fullmatch(r"\^\(([\w|]+)\)\$", pattern or "")
        if choices:
            parts.append("one of " + ", ".join(f"`{c}`" for c in choices.group(1).split("|")))
        elif pattern:
            parts.append(f"matches `{pattern}`".replace("|", "\\|"))
    return ", ".join(parts)


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section defaults)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        shown = [v.model_dump(exclude_defaults=True) for v in value]
        return f"`{shown}`"
    return f"`{value!r}`" if value is not None else "`null`"


def _source_comments(model: type[BaseModel]) -> dict[str, str]:
    """Per field: the comment beside its line, else the comment lines right above it."""
    try:
        lines = inspect.getsource(model).splitlines()
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    above: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(r"^\s+([a-z_][a-z0-9_]*)\s*:", line)
        if match:
            beside = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            out[match.group(1)] = " ".join([*above, beside]).strip()
        above = []
    return out


# meanings of the fields that neither the source nor the bundled study file comments on; a
# ``Field(description=...)`` in autocompress/config.py takes precedence over all of these
FALLBACK = {
    "StudyConfig.name": "the study's name: the Optuna study name and the default run folder `runs/<name>`",
    "StudyConfig.task": "what is compressed: a built-in task or `package.module:factory`",
    "StudyConfig.space": "the search space: a space file plus per-study overrides",
    "StudyConfig.finetune": "how each trial fine-tunes (QAT + knowledge distillation)",
    "StudyConfig.backend": "who lowers, runs and times the artifact, on which device",
    "StudyConfig.sampler": "Optuna's sampler and its options",
    "StudyConfig.trials": "how many trials, how long, and which plans go first",
    "StudyConfig.seed": "seeds the teacher, the fine-tuning and (unless `sampler.seed`) the sampler",
    "StudyConfig.output": "the run folder (default `runs/<name>`)",
    "SpaceConfig.file": "a search-space file: a path, or the name of a bundled space",
    "SpaceConfig.overrides": "per-study changes to the space file's dimensions",
    "FinetuneConfig.lr": "learning rate of the fine-tuning optimizer",
    "FinetuneConfig.batch_size": "batch size of tensor training data (a DataLoader keeps its own)",
    "BackendConfig.name": "a registered backend: `onnxruntime`, `torch`, `ascend`",
    "BackendConfig.device": "`cpu`, `cuda:N` or `npu:N`",
    "BackendConfig.options": "backend-specific options (e.g. `isolate`, `pin_core`, `timing`, `dtype`)",
    "Budgets.max_metric_drop_rel": "the same drop relative to the baseline's value (0.01 = 1%)",
    "Budgets.max_latency_ms": "latency budget per call at `backend.batch_size`, in milliseconds",
    "Budgets.max_size_bytes": "artifact size budget, bytes on disk",
    "SamplerConfig.options": "the sampler's own options (Optuna's keyword arguments)",
    "TrialsConfig.warm_start": "hand-written plans tried first (each a WarmStart)",
    "TrialsConfig.max_failures": "failed trials after which the study stops",
    "RayConfig.cpus_per_trial": "CPUs one Ray Tune trial reserves",
    "RayConfig.gpus_per_trial": "GPUs one Ray Tune trial reserves",
    "WarmStart.bits": "bit width of every layer (a value the quantize technique allows)",
    "WarmStart.sparsity": "sparsity of every layer",
    "WarmStart.sparsity_kind": "`unstructured`, `structured` or `2:4`",
    "WarmStart.rank_ratio": "kept rank share of every factorized layer (1: not factorized)",
    "WarmStart.kd_temperature": "knowledge-distillation temperature",
    "WarmStart.kd_alpha": "weight of the distillation term against the task loss",
}


def _study_file_comments() -> dict[tuple[str, ...], str]:
    """Per key path of the bundled quickstart study: the comment written beside it (and under it)."""
    import autocompress

    root = Path(autocompress.__file__).resolve().parent
    for path in (root / "studies" / "quickstart.yaml", root.parent / "studies" / "quickstart.yaml"):
        if path.exists():
            break
    else:
        return {}
    out: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []
    last: tuple[str, ...] | None = None
    for line in path.read_text().splitlines():
        key = re.match(r"^(\s*)([a-z_][a-z0-9_]*):(.*)$", line)
        if key:
            indent = len(key.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, key.group(2)))
            last = tuple(k for _, k in stack)
            rest = key.group(3)
            out[last] = rest.split("#", 1)[1].strip() if "#" in rest else ""
        elif line.strip().startswith("#") and last is not None and line.startswith(" " * 20):
            out[last] = (out[last] + " " + line.strip().lstrip("# ").strip()).strip()
        else:
            last = None
    return out


def _models(root: type[BaseModel]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = [root]
    for model in seen:
        for field in model.model_fields.values():
            stack = [field.annotation]
            while stack:
                ann = stack.pop()
                stack.extend(typing.get_args(ann))
                if isinstance(ann, type) and issubclass(ann, BaseModel) and ann not in seen:
                    seen.append(ann)
    return seen


def _first_line(annotation: Any) -> str:
    doc = getattr(annotation, "__doc__", None) if isinstance(annotation, type) else None
    if not doc or not issubclass(annotation, BaseModel) or doc == BaseModel.__doc__:
        return ""
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ")


def study_schema() -> str:
    """Markdown tables of every section of a study file, from ``autocompress.config.StudyConfig``."""
    from autocompress.config import StudyConfig

    sections = {
        f.annotation: name
        for name, f in StudyConfig.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    }
    from_file = _study_file_comments()
    parts = []
    for model in _models(StudyConfig):
        comments = _source_comments(model)
        prefix = (sections[model],) if model in sections else ()
        doc = inspect.cleandoc(model.__doc__ or "") if model.__doc__ != BaseModel.__doc__ else ""
        parts.append(f"### {model.__name__}\n")
        if doc:
            parts.append(doc.split("\n\n")[0].replace("\n", " ") + "\n")
        parts.append("| field | type | default | rule | meaning |\n|---|---|---|---|---|")
        for name, field in model.model_fields.items():
            if field.exclude:
                continue
            text = (
                field.description
                or comments.get(name)
                or from_file.get((*prefix, name))
                or FALLBACK.get(f"{model.__name__}.{name}")
                or _first_line(field.annotation)
            )
            text = text.replace("|", "\\|")
            row = [f"`{name}`", _type_name(field.annotation), _default(field), _rule(field), text]
            parts.append("| " + " | ".join(row) + " |")
        if model.model_config.get("extra") == "allow":
            parts.append("\nOther keys are allowed here (see the description above).")
        else:
            parts.append("\nAny other key is refused, naming the closest allowed one.")
        parts.append("")
    return "\n".join(parts)


# -- command line -------------------------------------------------------------------------------------


def cli_reference() -> str:
    """Each subcommand's usage and arguments, from ``autocompress.cli.build_parser``."""
    from autocompress.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    parts = []
    for name, cmd in sub.choices.items():
        parts.append(f"## `autocompress {name}`\n\n{helps.get(name, '')}\n")
        parts.append("```text\n" + cmd.format_usage().strip() + "\n```\n")
        parts.append("| argument | meaning | default |\n|---|---|---|")
        for action in cmd._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            flags = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
            if action.choices:
                flags += " (" + " \\| ".join(map(str, action.choices)) + ")"
            default = "" if action.default in (None, False, argparse.SUPPRESS) else f"`{action.default}`"
            text = (action.help or "").replace("%%", "%").replace("|", "\\|")
            if action.required and action.option_strings:
                text += " (required)"
            parts.append(f"| {flags} | {text} | {default} |")
        parts.append("")
    return "\n".join(parts)


# -- Python API ---------------------------------------------------------------------------------------


def api_reference() -> str:
    """One mkdocstrings block per public name of the package (``autocompress.__all__``)."""
    import autocompress

    parts = []
    for name in sorted(autocompress.__all__, key=lambda n: (n.isupper(), n.lower())):
        obj = getattr(autocompress, name)
        if isinstance(obj, types.ModuleType) or name.isupper():
            continue  # modules and registries are described on their own pages
        parts.append(f"::: autocompress.{name}\n")
    return "\n".join(parts)


GENERATORS = {"study-schema": study_schema, "cli": cli_reference, "api": api_reference}


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace each ``<!-- generated: NAME -->`` marker with what its generator writes."""
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)
