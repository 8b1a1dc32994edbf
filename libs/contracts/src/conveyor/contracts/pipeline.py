"""The pipeline spec: a graph of steps declared in YAML (or JSON), validated whole.

``load_pipeline`` returns a valid spec or raises ``PipelineInvalid`` listing every problem,
each naming the file, the step and the field. Nothing half-valid gets past it.

``spec_for_run`` is the spec a run executes. For ``auto: {resolve: run_start}`` with
``<AUTO>`` asks it is the registered spec with a synthetic ``llm`` step ``auto`` put first:
one call asking every question (``auto.model``, an ``output_schema`` of one string field
per ask), which every root step needs (so every step waits for it; a non-root step waits
through its needs, and the skip rule for steps whose needs were all skipped is untouched).
The expansion is a plain function of the registered spec, so the stored version stays as
the user wrote it, and the scheduler's state machine needs no special case: the ``auto``
step is scheduled, retried (``defaults.retry``), recorded and fails the run like any step.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from conveyor.contracts._limits import (
    MAX_DEFINITION_BYTES,
    MAX_DEFINITION_VALUES,
    MAX_STEPS,
    json_type_name,
    json_value_problem,
)
from conveyor.contracts._yaml import DefinitionLoader, code_point
from conveyor.contracts.prompts import (
    AUTO_STEP,
    AutoOptions,
    AutoResolution,
    auto_field,
    expand_prompt_ref,
    step_auto_asks,
)
from conveyor.contracts.run_input import InputInvalid, run_input_problems, validate_run_input

__all__ = [
    "PIPELINE_NAME",
    "Budget",
    "Defaults",
    "InputField",
    "InputInvalid",
    "PipelineInvalid",
    "PipelineSpec",
    "Problem",
    "RetryPolicy",
    "Schedule",
    "StepSpec",
    "load_pipeline",
    "load_pipeline_file",
    "parse_duration",
    "run_input_problems",
    "run_start_asks",
    "spec_for_run",
    "validate_run_input",
]

_DURATION = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``500ms``, ``1s``, ``2m``, ``1h`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like '500ms', '2m'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 10s, 2m, 1h)")
        seconds = float(match["n"]) * _UNIT_SECONDS[match["unit"]]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class RetryPolicy(_Spec):
    max_attempts: int = Field(default=1, ge=1, le=100)
    backoff: Literal["exponential", "fixed"] = "exponential"
    initial: Duration = 1.0
    max: Duration = 60.0
    jitter: bool = True
    retry_on: list[str] | None = None
    """Error types worth another attempt; default: any error the runner marks retryable."""
    non_retryable: list[str] = Field(default_factory=list)


class Defaults(_Spec):
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeout: Duration | None = None


class InputField(_Spec):
    type: Literal["string", "number", "integer", "boolean", "object", "array", "any"] = "any"
    required: bool = True
    default: Any = None
    description: str | None = None


_STEP_ID = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _matches(pattern: str, rule: str) -> Any:
    """A pattern check whose message says the rule in words, not only the regex."""

    def check(value: str) -> str:
        if not re.match(pattern, value):
            raise ValueError(f"{value!r} is not valid: {rule} (the pattern {pattern})")
        return value

    return AfterValidator(check)


StepId = Annotated[
    str,
    Field(max_length=64, json_schema_extra={"pattern": _STEP_ID}),
    _matches(_STEP_ID, "a step id is letters, digits and _, not starting with a digit"),
]


def _template_not_list(value: Any) -> Any:
    """``for_each: [a, b]`` is a natural guess; the default message ("should be a valid
    string") would not say what to write instead."""
    if isinstance(value, list):
        raise ValueError(
            "for_each is a template that gives a list, like '{{ input.items }}', "
            "not a list itself (put the list in the input)"
        )
    return value


class StepSpec(_Spec):
    id: StepId
    type: str
    description: str | None = None
    needs: list[str] | None = None
    """Steps that must finish first; ``None`` means the previous step (a linear pipeline)."""
    when: str | None = None
    for_each: Annotated[str | None, BeforeValidator(_template_not_list)] = None
    max_parallel: int | None = Field(default=None, ge=1)
    on_item_failure: Literal["fail_fast", "collect"] = "fail_fast"
    """With ``for_each``: stop at the first failed item (default), or run every item and
    hand the next step ``null`` where an item failed."""
    retry: RetryPolicy | None = None
    timeout: Duration | None = None
    continue_on_error: bool = False
    """Shorthand for ``on_failure: continue``."""
    on_failure: Literal["fail_run", "continue", "skip_run", "succeed_run"] | None = None
    """What a failure (after retries) does: fail the run (default), let the run go on as
    if the step had finished, or end the run gracefully as ``skipped`` / ``succeeded``."""
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")

    @property
    def failure_policy(self) -> str:
        if self.on_failure is not None:
            return self.on_failure
        return "continue" if self.continue_on_error else "fail_run"


class Budget(_Spec):
    """A cap on what one run may spend on model calls (the ``cost`` of its steps)."""

    max_cost: float = Field(ge=0)
    on_exceed: Literal["fail", "park"] = "fail"
    """``fail`` ends the run; ``park`` holds it (steps in flight finish, nothing new
    starts) until ``conveyor resume RUN`` grants another ``max_cost``."""


class Schedule(_Spec):
    """Run the pipeline on a cron schedule: one run per tick, however many schedulers."""

    cron: str
    """Five fields (minute precision) or six (the sixth is seconds), as croniter reads them."""
    timezone: str = "UTC"
    catch_up: Literal["skip", "once"] = "skip"
    """After downtime: skip the missed ticks, or run once for all of them."""
    input: dict[str, Any] = Field(default_factory=dict)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from croniter import croniter

        fields = len(value.split())
        if fields not in (5, 6) or not croniter.is_valid(value, second_at_beginning=False):
            raise ValueError(f"{value!r} is not a cron expression (5 or 6 fields)")
        return value

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


PIPELINE_NAME = r"^[a-z0-9][a-z0-9._-]*$"
"""Lowercase letters, digits, ``.``, ``_`` and ``-``: names are topic keys and CLI words."""


class PipelineSpec(_Spec):
    name: Annotated[
        str,
        Field(max_length=128, json_schema_extra={"pattern": PIPELINE_NAME}),
        _matches(PIPELINE_NAME, "a pipeline name is lowercase letters, digits, '.', '_', '-'"),
    ]
    description: str | None = None
    input: dict[str, InputField] = Field(default_factory=dict)
    defaults: Defaults = Field(default_factory=Defaults)
    schedule: Schedule | None = None
    max_concurrent_runs: int | None = Field(default=None, ge=1)
    budget: Budget | None = None
    """Runs beyond this many wait in the queue, and start in the order they came."""
    auto: AutoOptions = Field(default_factory=AutoOptions)
    """How ``<AUTO>ask</AUTO>`` values in step configs are answered (once, by a model)."""
    auto_resolved: dict[str, AutoResolution] = Field(default_factory=dict)
    """Set by registration: ``steps.x.with.system`` -> the ask, the answer, the model."""
    steps: list[StepSpec] = Field(min_length=1, max_length=MAX_STEPS)

    def step(self, step_id: str) -> StepSpec:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def needs_of(self, step_id: str) -> list[str]:
        """Explicit ``needs``, or the previous step when there are none."""
        for index, step in enumerate(self.steps):
            if step.id == step_id:
                if step.needs is not None:
                    return list(step.needs)
                return [self.steps[index - 1].id] if index > 0 else []
        raise KeyError(step_id)

    def upstream_of(self, step_id: str) -> set[str]:
        seen: set[str] = set()
        stack = self.needs_of(step_id)
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.needs_of(current))
        return seen

    def sinks(self) -> list[str]:
        """Steps no other step needs: their outputs are the run's output."""
        needed = {n for step in self.steps for n in self.needs_of(step.id)}
        return [step.id for step in self.steps if step.id not in needed]

    def retry_policy(self, step_id: str) -> RetryPolicy:
        return self.step(step_id).retry or self.defaults.retry

    def timeout_of(self, step_id: str) -> float | None:
        step = self.step(step_id)
        return step.timeout if step.timeout is not None else self.defaults.timeout

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)

    def digest(self) -> str:
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


_AUTO_SYSTEM = (
    "You write configuration values for the steps of an AI pipeline. Answer each numbered "
    "request in the field named after it, with the value itself and nothing else: no "
    "preamble, no quotes, no explanation."
)


def run_start_asks(spec: PipelineSpec) -> list[tuple[str, str]]:
    """``(path, ask)`` of every ``<AUTO>`` tag a run of ``spec`` answers at its start;
    empty unless ``auto.resolve`` is ``run_start``."""
    if spec.auto.resolve != "run_start":
        return []
    return [pair for step in spec.steps for pair in step_auto_asks(step.id, step.with_)]


def spec_for_run(spec: PipelineSpec) -> PipelineSpec:
    """The spec a run executes: with ``resolve: run_start`` asks, the synthetic ``auto``
    step first and needed by every root step; otherwise ``spec`` itself."""
    asks = run_start_asks(spec)
    if not asks or any(step.id == AUTO_STEP for step in spec.steps):
        return spec
    listing = "\n".join(
        f"{n}. {auto_field(path)} (for {path}): {ask}" for n, (path, ask) in enumerate(asks, 1)
    )
    prompt = "Write these values:\n" + listing
    auto = StepSpec(
        id=AUTO_STEP,
        type="llm",
        description="answers the pipeline's <AUTO> asks for this run",
        with_={
            "model": spec.auto.model,
            "system": _AUTO_SYSTEM,
            # the asks are the user's text, not templates over the run
            "prompt": "{% raw %}" + prompt.replace("{% endraw %}", "") + "{% endraw %}",
            "output_schema": {auto_field(path): "string" for path, _ in asks},
        },
    )
    steps = [
        step.model_copy(update={"needs": [AUTO_STEP]}) if not spec.needs_of(step.id) else step
        for step in spec.steps
    ]
    return spec.model_copy(update={"steps": [auto, *steps]})


class Problem(BaseModel):
    model_config = ConfigDict(frozen=True)

    file: str
    message: str
    step: str | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = [self.file]
        if self.step is not None:
            where.append(f"step '{self.step}'")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return f"{': '.join(where)}: {self.message}"


class PipelineInvalid(ValueError):
    """A definition with problems; ``problems`` lists every one found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def load_pipeline_file(path: str | Path) -> PipelineSpec:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineInvalid([Problem(file=str(path), message=exc.strerror or str(exc))]) from None
    except UnicodeDecodeError as exc:
        message = f"not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
        raise PipelineInvalid([Problem(file=str(path), message=message)]) from None
    return load_pipeline(text, source=str(path))


def load_pipeline(
    text: str | dict[str, Any],
    *,
    source: str = "<pipeline>",
    prompts: Mapping[str, Any] | None = None,
) -> PipelineSpec:
    """Validate a definition whole. ``prompts`` is the prompt library (name -> prompt):
    ``prompt_ref`` in a step is replaced by the prompt's text, so the spec stands alone."""
    from conveyor.contracts import _validation  # it imports this module's models

    size = len(text.encode("utf-8", "replace")) if isinstance(text, str) else 0
    if size > MAX_DEFINITION_BYTES:
        message = f"the definition is {size} bytes; the limit is {MAX_DEFINITION_BYTES}"
        raise PipelineInvalid([Problem(file=source, message=message)])
    data = _parse(text, source) if isinstance(text, str) else text
    if not isinstance(data, dict):
        got = "nothing (the definition is empty)" if data is None else json_type_name(data)
        message = f"a pipeline must be a mapping with name and steps, got {got}"
        raise PipelineInvalid([Problem(file=source, message=message)])
    unstorable = json_value_problem(data, max_values=MAX_DEFINITION_VALUES)
    if unstorable is not None:
        loc, message = unstorable
        raise PipelineInvalid([_validation.problem_at(loc, message, data, source)])
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise PipelineInvalid(_validation.pydantic_problems(exc, data, source)) from None
    spec, problems = _resolve_prompt_refs(spec, prompts or {}, source)
    failed = {p.step for p in problems}
    problems += [p for p in _validation.graph_problems(spec, source) if p.step not in failed]
    if problems:
        raise PipelineInvalid(problems)
    return spec


def _resolve_prompt_refs(
    spec: PipelineSpec, prompts: Mapping[str, Any], source: str
) -> tuple[PipelineSpec, list[Problem]]:
    problems: list[Problem] = []
    steps = []
    for step in spec.steps:
        if "prompt_ref" not in step.with_ and "prompt_vars" not in step.with_:
            steps.append(step)
            continue
        if step.type != "llm":
            message = f"prompt_ref is for llm steps, not {step.type!r}"
            problems.append(Problem(file=source, step=step.id, field="with", message=message))
            steps.append(step)
            continue
        config, issues = expand_prompt_ref(step.with_, prompts)
        problems += [Problem(file=source, step=step.id, field=f, message=m) for f, m in issues]
        steps.append(step.model_copy(update={"with_": config}))
    return spec.model_copy(update={"steps": steps}), problems


def _parse(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=DefinitionLoader)  # a safe loader
    except yaml.reader.ReaderError as exc:  # its str() spans lines and counts characters
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        message = (
            f"not valid YAML at line {line}, column {column}: the character "
            f"U+{code_point(exc.character):04X} is not allowed ({exc.reason})"
        )
        raise PipelineInvalid([Problem(file=source, message=message)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise PipelineInvalid(
            [Problem(file=source, message=f"not valid YAML{where}: {problem}")]
        ) from None
