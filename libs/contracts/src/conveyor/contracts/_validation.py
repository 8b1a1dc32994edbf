"""The checks a definition must pass beyond its schema: the step graph (duplicate ids,
unknown kinds and needs, cycles), each kind's config, and what templates read. Every
problem names the file, the step and the field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from conveyor.contracts.kinds import KIND_CONFIGS
from conveyor.contracts.pipeline import PipelineSpec, Problem, StepSpec, run_start_asks
from conveyor.contracts.prompts import AUTO_STEP
from conveyor.contracts.templates import TemplateError, referenced_steps, template_strings

__all__ = ["graph_problems", "pydantic_problems"]


def pydantic_problems(exc: ValidationError, data: dict[str, Any], source: str) -> list[Problem]:
    problems = []
    steps = data.get("steps")
    raw_steps: list[Any] = steps if isinstance(steps, list) else []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        step = None
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            raw = raw_steps[loc[1]] if loc[1] < len(raw_steps) else None
            step_id = raw.get("id") if isinstance(raw, dict) else None
            step = str(step_id) if step_id is not None else f"#{loc[1] + 1}"
            loc = loc[2:]
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        problems.append(
            Problem(
                file=source,
                step=step,
                field=".".join(str(p) for p in loc) or None,
                message=message,
            )
        )
    return problems


def graph_problems(spec: PipelineSpec, source: str) -> list[Problem]:
    problems: list[Problem] = []
    ids: set[str] = set()
    for step in spec.steps:
        if step.id in ids:
            problems.append(
                Problem(file=source, step=step.id, field="id", message="duplicate step id")
            )
        ids.add(step.id)
    if AUTO_STEP in ids and run_start_asks(spec):
        problems.append(
            Problem(
                file=source,
                step=AUTO_STEP,
                field="id",
                message=(
                    f"the id {AUTO_STEP!r} is reserved for the step answering <AUTO> asks "
                    "at each run start (auto.resolve: run_start): rename this step"
                ),
            )
        )
    for step in spec.steps:
        problems.extend(_step_problems(spec, step, ids, source))
    if not problems:
        cycle = _find_cycle(spec)
        if cycle:
            problems.append(
                Problem(
                    file=source,
                    step=cycle[0],
                    field="needs",
                    message="needs form a cycle: " + " -> ".join([*cycle, cycle[0]]),
                )
            )
    if not problems:
        problems.extend(_template_problems(spec, source))
    return problems


def _step_problems(spec: PipelineSpec, step: StepSpec, ids: set[str], source: str) -> list[Problem]:
    problems = []
    config_model = KIND_CONFIGS.get(step.type)
    if config_model is None:
        known = ", ".join(sorted(KIND_CONFIGS))
        problems.append(
            Problem(
                file=source,
                step=step.id,
                field="type",
                message=f"unknown step type {step.type!r} (known: {known})",
            )
        )
    else:
        try:
            config_model.model_validate(step.with_)
        except ValidationError as exc:
            for err in exc.errors(include_url=False):
                field = ".".join(["with", *(str(p) for p in err["loc"])])
                message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
                problems.append(Problem(file=source, step=step.id, field=field, message=message))
    for need in step.needs or []:
        if need not in ids:
            problems.append(
                Problem(
                    file=source,
                    step=step.id,
                    field="needs",
                    message=f"names unknown step {need!r}",
                )
            )
        elif need == step.id:
            problems.append(
                Problem(
                    file=source, step=step.id, field="needs", message="a step cannot need itself"
                )
            )
    return problems


def _find_cycle(spec: PipelineSpec) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    path: list[str] = []

    def visit(step_id: str) -> list[str] | None:
        state[step_id] = 1
        path.append(step_id)
        for need in spec.needs_of(step_id):
            if state.get(need) == 1:
                return path[path.index(need) :]
            if need not in state:
                found = visit(need)
                if found:
                    return found
        path.pop()
        state[step_id] = 2
        return None

    for step in spec.steps:
        if step.id not in state:
            found = visit(step.id)
            if found:
                return found
    return None


def _template_problems(spec: PipelineSpec, source: str) -> list[Problem]:
    problems = []
    ids = {step.id for step in spec.steps}
    for step in spec.steps:
        upstream = spec.upstream_of(step.id)
        fields: list[tuple[str, str]] = [
            (f"with.{path}" if path else "with", text)
            for path, text in template_strings(step.with_)
        ]
        if step.when is not None:
            fields.append(("when", step.when))
        if step.for_each is not None:
            fields.append(("for_each", step.for_each))
        for field, text in fields:
            try:
                names = referenced_steps(text)
            except TemplateError as exc:
                problems.append(Problem(file=source, step=step.id, field=field, message=str(exc)))
                continue
            for name in sorted(names):
                if name not in ids:
                    message = f"template names unknown step {name!r}"
                elif name not in upstream:
                    message = (
                        f"template reads step {name!r}, which is not upstream of this step "
                        f"(add it to needs)"
                    )
                else:
                    continue
                problems.append(Problem(file=source, step=step.id, field=field, message=message))
    return problems
