"""The documentation cannot rot: the site builds in strict mode, the README stays a short guide, the
architecture page names modules that exist, and every code block of the README and the docs runs.

Code blocks, per page in order, in one fresh folder per page (two pages at a time: :func:`page_outcomes`):

* ```` ```python ````: run as a script (with at most 2 trials per study, on one thread: :data:`TINY_PRELUDE`);
  after ``<!-- file: NAME -->`` it is written to NAME (and compiled) instead, for later blocks to use.
* ```` ```yaml ````: parsed; a study file (``name`` and ``task``) is validated with ``load_config`` (in
  the test's process); after ``<!-- file: NAME -->`` it is written to NAME for later blocks to run.
* ```` ```bash ````: run with ``bash -e``; ``pip install/wheel/download`` steps are left out (the test
  runs in the installed environment) and ``autocompress run|worker|inspect`` get at most 2 trials.
* A study of a built-in task (``digits``, ...) trains its teacher for at most :data:`TEACHER_EPOCHS`
  epochs and, where the task has a ``width``, builds its model at most :data:`TASK_WIDTH` wide (Python
  and command line alike, so that a page's later commands find the same teacher).
* Other languages (``text``) are output or layouts, not commands, and are not run.
* Each page that names the quickstart starts with ``runs/quickstart`` from one tiny quickstart run
  (:func:`quickstart_run`); the other pages run beside that run.
* A block after ``<!-- not-run: REASON -->`` is reported as skipped with that reason; so are the blocks
  of ``docs/results/`` pages (the commands of measurements, minutes to hours each).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)]
RUNNABLE = {"python", "bash", "yaml"}
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
MARK = re.compile(r"<!--\s*(not-run|file):\s*(.*?)\s*-->\s*$")
BLOCK_TIMEOUT_S = 300

TEACHER_EPOCHS = 2  # a built-in task's teacher (its default, 20, is most of a tiny study's time)
# a built-in task's model width, where it has one (digits' 64 makes its teacher, each trial's fine-tuning
# and the channel pruning and factorizations of its 128-channel convs most of a tiny study's time)
TASK_WIDTH = 16
# The options that make built-in task ``name`` tiny: its teacher's epochs and, where the task has one, its
# model's width, capped (never raised above what ``options`` or the task's default give). Defined here
# and in every Python block's prelude alike.
TINY_TASK_OPTIONS = f"""\
def _tiny_task_options(name, options):
    import inspect
    from autocompress.tasks import resolve_factory

    params = inspect.signature(resolve_factory(name)).parameters
    caps = {{"teacher_epochs": {TEACHER_EPOCHS}, "width": {TASK_WIDTH}}}
    return {{k: min(options.get(k, params[k].default), cap) for k, cap in caps.items() if k in params}}
"""
_namespace: dict = {}
exec(TINY_TASK_OPTIONS, _namespace)
_tiny_task_options = _namespace["_tiny_task_options"]
# Put before every Python block: each study it runs stops at 2 trials, 1 fine-tuning epoch on one thread,
# no planned starts, short timing sessions in the study's own process (no timing worker) (the examples
# themselves ask for what a user would).
TINY_PRELUDE = f"""\
import autocompress as _ac

{TINY_TASK_OPTIONS}

def _tiny(cfg):
    if not isinstance(cfg, _ac.StudyConfig):  # a study file or a bundled study's name
        cfg = _ac.load_config(cfg)
    if cfg.task.name and ":" not in cfg.task.name:  # a built-in task trains its teacher
        cfg.task.options = {{**cfg.task.options, **_tiny_task_options(cfg.task.name, cfg.task.options)}}
    cfg.trials.n = min(cfg.trials.n, 2)
    cfg.trials.planned_starts = 0
    cfg.finetune.threads = 1
    if cfg.finetune.steps is None:
        cfg.finetune.epochs = min(cfg.finetune.epochs, 1)
    else:
        cfg.finetune.steps = min(cfg.finetune.steps, 20)
    cfg.backend.options = {{
        **cfg.backend.options, "timing": {{"warmup_s": 0.05, "min_s": 0.1, "max_s": 0.5}}, "isolate": False
    }}
    return cfg

_run_study = _ac.run_study
_ac.run_study = lambda cfg, *args, **kwargs: _run_study(_tiny(cfg), *args, **kwargs)
"""
# After every Python block: what is alive is frozen, so that the interpreter's last garbage collection
# does not walk torch's whole heap just before the process ends (as the ``autocompress`` program does).
TINY_EPILOGUE = "\n\nimport gc as _gc\n\n_gc.freeze()\n"
TINY_FLAGS = (
    "--set trials.n=2 --set trials.planned_starts=0 --set finetune.epochs=1 --set finetune.threads=1"
    " --set 'backend.options.timing={warmup_s: 0.05, min_s: 0.1, max_s: 0.5}' --set backend.options.isolate=false"
)


@dataclass
class Block:
    page: Path
    index: int
    lang: str
    code: str
    line: int
    not_run: str | None = None
    file: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page with their marker comments."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        block = Block(page, len(out), m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
        if "results" in page.relative_to(ROOT).parts[:2]:
            block.not_run = "a results page records the command of a measurement; it is not re-run here"
        elif mark and mark.group(1) == "not-run":
            block.not_run = mark.group(2)
        elif mark:
            block.file = mark.group(2)
        out.append(block)
    return out


def _env(folder: Path) -> dict[str, str]:
    path = os.pathsep.join([str(folder), str(ROOT), os.environ.get("PYTHONPATH", "")])
    # one torch (OpenMP) thread per process: PAGE_WORKERS pages run at once, one per core (two pages of
    # two-thread processes on 2 cores spin on each other's cores)
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return {**os.environ, "PYTHONPATH": path.rstrip(os.pathsep), "MPLBACKEND": "Agg", **threads}


def _task_flags(study: str, folder: Path | None) -> str:
    """``--set`` flags making the task of the study file (in ``folder``) or bundled study ``study`` tiny,
    where it is a built-in task (a user's own task takes its own options)."""
    from autocompress.config import resolve_study_file
    from autocompress.errors import ConfigError

    here = folder / study if folder is not None else None
    try:
        path = here if here is not None and here.is_file() else resolve_study_file(study)
    except ConfigError:
        return ""
    task = (yaml.safe_load(path.read_text()) or {}).get("task") or {}
    name = task.get("name")
    if not name or ":" in name:
        return ""
    tiny = _tiny_task_options(name, task.get("options") or {})
    return "".join(f" --set task.options.{key}={value}" for key, value in tiny.items())


def _bash_line(line: str, folder: Path | None) -> str:
    steps = [s.strip() for s in line.split("&&")]
    steps = [s for s in steps if not re.match(r"pip (install|wheel|download)\b", s)]
    out = []
    for step in steps:
        step = step.replace("PYTHONPATH=. ", "PYTHONPATH=.:$PYTHONPATH ")
        study = re.search(r"\bautocompress (?:run|worker|inspect) (\S+)", step)
        if study:
            step = re.sub(r"--n-trials \d+", "--n-trials 2", step)
            background = step.endswith("&")
            step = step.rstrip("& ").rstrip()
            flags = TINY_FLAGS + _task_flags(study.group(1), folder)
            step = re.sub(r"(\s#.*)?$", f" {flags}", step, count=1) + (" &" if background else "")
        out.append(step)
    return " && ".join(out) or "true"


def bash_script(code: str, folder: Path | None = None) -> str:
    """The block as run in ``folder``: continuation lines joined, installs left out, studies made tiny."""
    joined = code.replace("\\\n", " ")
    return "\n".join(_bash_line(line, folder) for line in joined.splitlines())


def _run(cmd: list[str], folder: Path) -> str | None:
    try:
        proc = subprocess.run(
            cmd, cwd=folder, env=_env(folder), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {BLOCK_TIMEOUT_S} s"
    if proc.returncode != 0:
        return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    return None


def _validate(path: Path) -> str | None:
    """Validate a study file as ``load_config`` does (in this process: validation imports no task and
    writes nothing, and a new interpreter would spend seconds importing torch per block)."""
    from autocompress.config import load_config
    from autocompress.errors import ConfigError

    try:
        load_config(path)
    except ConfigError as exc:
        return f"not a valid study file: {exc}"
    return None


def run_block(block: Block, folder: Path) -> str | None:
    """Run one block in the page's folder; None if it passed, else what went wrong."""
    if block.file:
        (folder / block.file).write_text(block.code)
    if block.lang == "python":
        if block.file:
            compile(block.code, block.file, "exec")
            return None
        script = folder / f"_block_{block.index}.py"
        script.write_text(TINY_PRELUDE + "\n" + block.code + TINY_EPILOGUE)
        return _run([sys.executable, script.name], folder)
    if block.lang == "yaml":
        data = yaml.safe_load(block.code)
        if isinstance(data, dict) and {"name", "task"} <= set(data):
            path = folder / (block.file or f"_block_{block.index}.yaml")
            path.write_text(block.code)
            return _validate(path)
        return None
    script = folder / f"_block_{block.index}.sh"
    script.write_text(bash_script(block.code, folder))
    return _run(["bash", "-e", "-o", "pipefail", script.name], folder)


@functools.cache
def run_page(page: Path, folder: Path) -> tuple[str | None, ...]:
    """Every runnable block of the page, in order, in one folder: one outcome per block."""
    return tuple(None if b.not_run or b.lang not in RUNNABLE else run_block(b, folder) for b in blocks(page))


CASES = [b for page in PAGES for b in blocks(page) if b.lang in RUNNABLE]


def quickstart_run(folder: Path) -> Path | None:
    """One tiny run of the bundled quickstart (``runs/quickstart``) in ``folder``, as the README's first
    command leaves it; the folder of every page that names the quickstart starts with a copy, so a page's
    ``autocompress run quickstart`` resumes a finished study instead of training and searching again (None
    if it failed: the pages then say why)."""
    failed = _run(["bash", "-c", bash_script("autocompress run quickstart")], folder)
    return None if failed else folder / "runs" / "quickstart"


# pages run at once: a page's blocks wait mostly on one single-threaded process at a time (imports, ONNX
# export, one-thread timing), so two pages keep both cores of a 2-core CI machine busy
PAGE_WORKERS = max(1, min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def page_outcomes(request, tmp_path_factory):
    """The pages of the selected blocks that run, in the background from the first test that asks,
    :data:`PAGE_WORKERS` at a time (each page's blocks in order, in its own folder): page -> future of
    :func:`run_page`'s outcomes. The quickstart run goes first; pages that never name the quickstart run
    beside it, the others wait for it and start from a copy of its run folder."""
    specs = [getattr(item, "callspec", None) for item in request.session.items]
    chosen = [c.params["block"] for c in specs if c is not None and isinstance(c.params.get("block"), Block)]
    pages = [p for p in PAGES if any(b.page == p and not b.not_run for b in chosen)]
    needs = {p: "quickstart" in p.read_text() for p in pages}
    folders = {p: tmp_path_factory.mktemp(re.sub(r"\W", "_", p.stem)) for p in pages}
    pool = ThreadPoolExecutor(max_workers=PAGE_WORKERS, thread_name_prefix="docs-page")
    quickstart = (
        pool.submit(quickstart_run, tmp_path_factory.mktemp("quickstart")) if any(needs.values()) else None
    )

    def page_job(page: Path) -> tuple[str | None, ...]:
        if needs[page] and (run := quickstart.result()) is not None:
            shutil.copytree(run, folders[page] / "runs" / "quickstart")
        return run_page(page, folders[page])

    order = sorted(pages, key=lambda p: needs[p])  # the pages that need no quickstart run first (stable)
    futures = {page: pool.submit(page_job, page) for page in order}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("block", CASES, ids=[b.id for b in CASES])
def test_code_block_runs(block: Block, page_outcomes):
    if block.not_run:
        pytest.skip(f"not run here: {block.not_run}")
    outcome = page_outcomes[block.page].result()[block.index]
    assert outcome is None, f"{block.id} ({block.lang}) failed: {outcome}"


def test_not_run_markers_give_a_reason():
    for page in PAGES:
        for b in blocks(page):
            if b.not_run is not None:
                assert len(b.not_run) >= 10, f"{b.id}: a not-run block needs its reason"


def test_bash_blocks_are_made_tiny_and_offline(tmp_path):
    (tmp_path / "own.yaml").write_text("name: own\ntask: {name: my_tasks:make_task}\n")
    (tmp_path / "s.yaml").write_text("name: s\ntask: {name: digits_resnet}\n")
    script = bash_script(
        "pip install . && autocompress run quickstart\nautocompress worker s.yaml --n-trials 30 &\n"
        "autocompress run own.yaml\nautocompress worker missing.yaml",
        tmp_path,
    )
    tiny_task = f"--set task.options.teacher_epochs={TEACHER_EPOCHS} --set task.options.width={TASK_WIDTH}"
    assert script.splitlines() == [
        f"autocompress run quickstart {TINY_FLAGS} {tiny_task}",  # the bundled study's task: digits
        f"autocompress worker s.yaml --n-trials 2 {TINY_FLAGS} {tiny_task} &",
        f"autocompress run own.yaml {TINY_FLAGS}",  # the user's own task takes its own options
        f"autocompress worker missing.yaml {TINY_FLAGS}",
    ]
    assert bash_script("pip install torch==2.13.0 && pip install -e .") == "true"


# -- the README ----------------------------------------------------------------------------------------


def test_readme_is_a_short_guide():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines (at most 220)"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 200]
    assert not long, f"README.md lines longer than 200 characters: {long}"
    first = [b.code.strip() for b in blocks(ROOT / "README.md")[:2]]
    assert first == [
        "pip install torch==2.13.0 && pip install . && autocompress run quickstart",
        'pip install torch==2.13.0 && pip install -e ".[dev,docs]" && python -m pytest',
    ]
    for pattern in (r"/tmp/", r"/work/", r"\bissue \d+", r"\bsession note", r"\bcommit [0-9a-f]{7}"):
        assert not re.search(pattern, text, re.I), f"README.md mentions {pattern!r}"


def test_pages_hold_no_scratch_paths_or_project_history():
    for page in PAGES:
        text = page.read_text()
        for pattern in (r"/tmp/", r"/work/", r"\bissue \d+", r"\bsession note", r"\bcommit [0-9a-f]{7}"):
            assert not re.search(pattern, text, re.I), f"{page.relative_to(ROOT)} mentions {pattern!r}"


def test_ci_runs_the_readme_test_command():
    command = blocks(ROOT / "README.md")[1].code.strip()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\((?!https?://)([^)#\s]+)", text)
    assert targets
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


# -- the site -------------------------------------------------------------------------------------------


def test_architecture_page_names_existing_modules():
    text = (DOCS / "architecture.md").read_text()
    named = set(re.findall(r"autocompress/[\w/]+(?:\.py)?", text))
    assert len(named) > 30
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def _hook():
    sys.path.insert(0, str(DOCS / "_hooks"))
    try:
        import reference
    finally:
        sys.path.remove(str(DOCS / "_hooks"))
    return reference


def test_reference_covers_every_study_field_and_command():
    from pydantic import BaseModel

    from autocompress.cli import build_parser
    from autocompress.config import StudyConfig

    hook = _hook()
    schema = hook.study_schema()
    for model in hook._models(StudyConfig):
        assert f"### {model.__name__}" in schema
        for name, field in model.model_fields.items():
            if not field.exclude:
                assert f"| `{name}` |" in schema, f"{model.__name__}.{name} missing from the schema page"
    assert issubclass(StudyConfig, BaseModel)
    assert "| `epochs` | int | `3` | >= 0, <= 1000 |" in schema
    cli = hook.cli_reference()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in sub.choices:
        assert f"## `autocompress {command}`" in cli


def test_folder_nav_entries_list_their_pages(tmp_path):
    (tmp_path / "howto").mkdir()
    for name in ("b.md", "index.md", "a.md"):
        (tmp_path / "howto" / name).write_text("# x\n")
    nav = _hook()._expand([{"Home": "index.md"}, {"How-to": "howto/"}], tmp_path)
    assert nav == [{"Home": "index.md"}, {"How-to": ["howto/index.md", "howto/a.md", "howto/b.md"]}]


@pytest.mark.slow
def test_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs", reason='the docs builder is not installed: pip install -e ".[docs]"')
    pytest.importorskip("mkdocstrings", reason='mkdocstrings is not installed: pip install -e ".[docs]"')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    assert (tmp_path / "site" / "reference" / "study-file" / "index.html").exists()
    page = (tmp_path / "site" / "reference" / "python-api" / "index.html").read_text()
    assert "run_study" in page and "StudyConfig" in page
