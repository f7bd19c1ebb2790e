"""The narrowings a new study records before its first trial: the applicability checks' (what cannot
work on this model) and, when a study asks for it, the sensitivity table's. Each is applied to the
run's space and kept in the study's user attrs (``narrowed_domains``), where resumed runs and other
workers read them back (Optuna needs the domains a study was created with)."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from ..context import RunContext
from ..inspection import narrow_domains, narrowing_summary
from ..rundir import APPLICABILITY, COVERAGE, write_json
from .applicability import Applicability, check_applicability, summary_lines
from .coverage import coverage, coverage_lines


def narrow_by_applicability(ctx: RunContext, study: optuna.Study, log: Callable[[str], None]) -> None:
    """Check every (technique, layer) pair of the space on the teacher, remove what cannot work from
    the domains (kept in the study's user attrs, like every narrowing), state the coverage; both also
    go to the run folder (``applicability.json``, ``coverage.json``)."""
    if "applicability" in study.user_attrs:  # another worker made the study: the same verdicts
        result = Applicability.from_dict(study.user_attrs["applicability"])
        for line in summary_lines(result) + coverage_lines(study.user_attrs["coverage"]):
            log(line)
        return
    result = check_applicability(
        ctx.task, ctx.teacher, ctx.inventory, ctx.space, ctx.backend, seed=ctx.config.seed, log=log
    )
    narrowed = {**study.user_attrs.get("narrowed_domains", {}), **result.domains}
    ctx.space.narrow(narrowed)
    cov = coverage(ctx.teacher, ctx.task, ctx.inventory, ctx.space, result)
    for line in coverage_lines(cov):
        log(line)
    write_json(ctx.run_dir / APPLICABILITY, result.to_dict())
    write_json(ctx.run_dir / COVERAGE, cov)
    study.set_user_attr("narrowed_domains", narrowed)
    study.set_user_attr("applicability", result.to_dict())
    study.set_user_attr("coverage", cov)


def narrow_by_sensitivity(ctx: RunContext, study: optuna.Study, sensitivity, max_drop: float, log) -> None:
    """Narrow the space's per-layer domains by the sensitivity table; the study keeps them (resumes
    and workers read them back from its user attrs)."""
    narrowed = narrow_domains(ctx.space, ctx.inventory, sensitivity, max_drop)
    log(narrowing_summary(ctx.space, ctx.inventory, narrowed, max_drop))
    narrowed = {**study.user_attrs.get("narrowed_domains", {}), **narrowed}  # within the applicable ones
    ctx.space.narrow(narrowed)
    study.set_user_attr("narrowed_domains", narrowed)
    study.set_user_attr("sensitivity_narrow", max_drop)
