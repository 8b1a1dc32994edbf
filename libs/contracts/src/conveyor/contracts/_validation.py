"""The checks a definition must pass beyond its schema: the step graph (duplicate ids,
unknown kinds and needs, cycles), each kind's config, fields that only make sense
together, the declared input, and what templates read. Every problem names the file,
the step and the field."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from conveyor.contracts.kinds import KIND_CONFIGS
from conveyor.contracts.kinds_llm import check_model_name
from conveyor.contracts.pipeline import (
    PipelineSpec,
    Problem,
    RetryPolicy,
    StepSpec,
    run_input_problems,
    run_start_asks,
)
from conveyor.contracts.prompts import AUTO_STEP
from conveyor.contracts.templates import (
    TemplateError,
    TemplateReads,
    template_reads,
    template_strings,
)

__all__ = ["error_message", "graph_problems", "problem_at", "pydantic_problems"]

CONTEXT_NAMES = frozenset({"input", "steps", "run", "secrets"})
"""What every step's templates may read (``domain.step_context`` plus the runner's
``secrets``); a fan-out step's ``with`` reads ``item`` and ``item_index`` too."""
ITEM_NAMES = frozenset({"item", "item_index"})
_MARKS = ("{{", "{%")


def error_message(err: ErrorDetails) -> str:
    """Pydantic's message without its "Value error, " prefix: our validators' own text."""
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "value_error" and "error" in err.get("ctx", {}):
        return str(err["ctx"]["error"])
    return err["msg"]


def problem_at(loc: Sequence[str | int], message: str, data: Any, source: str) -> Problem:
    """A problem at ``loc`` in the raw definition: ``steps.<n>`` becomes the step's id."""
    loc = list(loc)
    step = None
    if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
        steps = data.get("steps") if isinstance(data, dict) else None
        raw_steps: list[Any] = steps if isinstance(steps, list) else []
        raw = raw_steps[loc[1]] if loc[1] < len(raw_steps) else None
        step_id = raw.get("id") if isinstance(raw, dict) else None
        step = str(step_id) if step_id is not None else f"#{loc[1] + 1}"
        loc = loc[2:]
    field = ".".join(str(p) for p in loc) or None
    return Problem(file=source, step=step, field=field, message=message)


def pydantic_problems(exc: ValidationError, data: dict[str, Any], source: str) -> list[Problem]:
    return [problem_at(loc, message, data, source) for loc, message in located_errors(exc, data)]


def located_errors(exc: ValidationError, data: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """Each error's location in ``data`` and message, a union's alternatives merged.

    Pydantic puts the member of a union it tried in the location (``messages.
    list[LlmMessage].0.role``, ``messages.str``) and reports every member. The member
    tags are dropped; a member's "should be a valid string" is dropped too when another
    member took the value's shape and found what is really wrong; and when no member took
    it, their shape messages become one ("should be a valid list or a valid string")."""
    entries = []
    for err in exc.errors(include_url=False):
        loc, tagged = _without_union_tags(err["loc"], data)
        entries.append((loc, tagged and err["type"].endswith("_type"), error_message(err)))
    located: dict[tuple[str | int, ...], list[str]] = {}
    for loc, shape_only, message in entries:
        if shape_only and any(
            not other_shape and other[: len(loc)] == loc for other, other_shape, _ in entries
        ):
            continue  # another member of the union fits the value's shape
        if message not in located.setdefault(loc, []):
            located[loc].append(message)
    prefix = "Input should be "
    merged: list[tuple[tuple[str | int, ...], str]] = []
    for loc, messages in located.items():
        if len(messages) > 1 and all(m.startswith(prefix) for m in messages):
            messages = [prefix + " or ".join(m[len(prefix) :] for m in messages)]
        merged.extend((loc, message) for message in messages)
    return merged


def _without_union_tags(loc: Sequence[str | int], data: Any) -> tuple[tuple[str | int, ...], bool]:
    """``loc`` without the union member tags in it, and whether there were any."""
    kept: list[str | int] = []
    current = data
    tagged = False
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and part < len(current):
            current = current[int(part)]
        elif (
            isinstance(part, str)
            and _UNION_TAG.search(part)
            and not (last and isinstance(current, dict) and part.isidentifier())
        ):
            tagged = True
            continue
        else:
            current = None
        kept.append(part)
    return tuple(kept), tagged


_UNION_TAG = re.compile(r"[\[\]\-,]|^(?:str|int|float|bool|list|dict|none|any)$|^[A-Z]")


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
    if not problems:  # templates are read against the graph: it must be sound first
        problems.extend(_template_problems(spec, source))
    # fields of one step or of the pipeline: independent of the graph, always reported
    problems.extend(_spec_problems(spec, source))
    for step in spec.steps:
        problems.extend(_step_field_problems(step, source))
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
            for loc, message in located_errors(exc, step.with_):
                field = ".".join(["with", *(str(p) for p in loc)])
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


def _spec_problems(spec: PipelineSpec, source: str) -> list[Problem]:
    """The pipeline's own fields: defaults, declared input, the schedule's input."""
    problems = [
        Problem(file=source, field=f"defaults.{field}", message=message)
        for field, message in _timing_problems(spec.defaults.retry, spec.defaults.timeout)
    ]
    for name, declared in spec.input.items():
        if not name.isidentifier():
            message = (
                "an input name is letters, digits and _, not starting with a digit "
                "(templates read it as input.<name>)"
            )
            problems.append(Problem(file=source, field=f"input.{name}", message=message))
        if declared.default is not None:
            _, wrong = run_input_problems(
                spec.model_copy(update={"input": {name: declared}}), {name: declared.default}
            )
            for _, message in wrong:
                message = f"the default does not fit: {message}"
                problems.append(
                    Problem(file=source, field=f"input.{name}.default", message=message)
                )
    if "model" in spec.auto.model_fields_set:
        try:
            check_model_name(spec.auto.model)
        except ValueError as exc:
            problems.append(Problem(file=source, field="auto.model", message=str(exc)))
    if spec.schedule is not None:
        _, wrong = run_input_problems(spec, spec.schedule.input)
        for name, message in wrong:
            field = f"schedule.input.{name}" if name else "schedule.input"
            problems.append(Problem(file=source, field=field, message=message))
    return problems


def _timing_problems(retry: RetryPolicy | None, timeout: float | None) -> list[tuple[str, str]]:
    problems = []
    if timeout is not None and timeout <= 0:
        problems.append(("timeout", "a timeout must be more than 0 (leave it out for none)"))
    if retry is not None and retry.initial > retry.max:
        problems.append(
            (
                "retry.initial",
                f"the first backoff ({retry.initial:g}s) is longer than retry.max ({retry.max:g}s)",
            )
        )
    return problems


def _step_field_problems(step: StepSpec, source: str) -> list[Problem]:
    """Engine fields of one step that are each valid but wrong together, or plain text
    where a template is meant (``when: steps.a.output.ok`` would always be true)."""
    found = _timing_problems(step.retry, step.timeout)
    if step.when is not None and not any(mark in step.when for mark in _MARKS):
        found.append(
            (
                "when",
                f"{step.when!r} is plain text, which is always true: write a template "
                "such as '{{ steps.review.output.approved }}'",
            )
        )
    if step.for_each is not None and not any(mark in step.for_each for mark in _MARKS):
        found.append(
            (
                "for_each",
                f"{step.for_each!r} is plain text: write a template that gives a list, "
                "such as '{{ input.items }}'",
            )
        )
    if step.for_each is None:
        for field in ("max_parallel", "on_item_failure"):
            if field in step.model_fields_set:
                found.append((field, "only applies to a fan-out: the step has no for_each"))
    if step.continue_on_error and step.on_failure not in (None, "continue"):
        found.append(
            (
                "on_failure",
                f"on_failure: {step.on_failure} contradicts continue_on_error: true "
                "(keep one of them)",
            )
        )
    return [Problem(file=source, step=step.id, field=f, message=m) for f, m in found]


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


def _upstream_sets(spec: PipelineSpec) -> dict[str, frozenset[str]]:
    """Every step's upstream at once (the graph has no cycle by now): ``upstream_of``
    per step rescans the step list at each hop, which is cubic in a long chain."""
    needs = {step.id: spec.needs_of(step.id) for step in spec.steps}
    found: dict[str, frozenset[str]] = {}
    for step in spec.steps:
        stack = [(step.id, False)]
        while stack:
            current, expanded = stack.pop()
            if current in found:
                continue
            if expanded:
                found[current] = frozenset(
                    n for need in needs[current] for n in (need, *found[need])
                )
                continue
            stack.append((current, True))
            stack.extend((need, False) for need in needs[current] if need not in found)
    return found


def _template_problems(spec: PipelineSpec, source: str) -> list[Problem]:
    problems = []
    ids = {step.id for step in spec.steps}
    upstreams = _upstream_sets(spec)
    for step in spec.steps:
        upstream = upstreams[step.id]
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
                reads = template_reads(text)
            except TemplateError as exc:
                problems.append(Problem(file=source, step=step.id, field=field, message=str(exc)))
                continue
            problems.extend(_read_problems(spec, step, field, reads, source))
            for name in sorted(reads.steps):
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


def _read_problems(
    spec: PipelineSpec, step: StepSpec, field: str, reads: TemplateReads, source: str
) -> list[Problem]:
    """Names the template reads that no run will have: a misspelt ``input``, ``item``
    outside a fan-out's ``with``, an input key the pipeline does not declare."""
    known = CONTEXT_NAMES | (ITEM_NAMES if step.for_each and field.startswith("with") else set())
    messages = []
    for name in sorted(reads.names - known):
        if name in ITEM_NAMES:
            messages.append(f"reads {name!r}, which only a fan-out step's with has (for_each)")
        else:
            one_of = ", ".join(sorted(known))
            messages.append(f"reads {name!r}, which no run has (a template reads {one_of})")
    if spec.input:
        declared = ", ".join(sorted(spec.input))
        messages.extend(
            f"reads input {key!r}, which the pipeline does not declare (declared: {declared})"
            for key in sorted(reads.input_keys - set(spec.input))
        )
    return [Problem(file=source, step=step.id, field=field, message=m) for m in messages]
