"""The state of a run as the scheduler keeps it, and the commands the state machine
issues. Plain data: saved as JSON on the run row.

``<AUTO>`` answers of a ``resolve: run_start`` pipeline need no field of their own: they
are the output of the run's synthetic ``auto`` step (``auto_answers``), kept with the other
steps' outputs, and ``config_of`` puts them in place of the tags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conveyor.contracts import AUTO_STEP, ErrorInfo, PipelineSpec, StepSpec, fill_auto

__all__ = [
    "CancelAttempt",
    "Command",
    "CompleteRun",
    "CompleteStep",
    "DispatchStep",
    "FailRun",
    "ItemState",
    "ParkRun",
    "RetryStep",
    "RunState",
    "SkipStep",
    "StepState",
]


@dataclass
class ItemState:
    status: str = "pending"
    attempt: int = 0
    output: Any = None
    error: dict[str, Any] | None = None
    redeliveries: int = 0

    def to_json(self) -> dict[str, Any]:
        return _attempt_json(self)


@dataclass
class StepState:
    status: str = "pending"
    attempt: int = 0
    output: Any = None
    error: dict[str, Any] | None = None
    redeliveries: int = 0
    items: list[ItemState] | None = None
    values: list[Any] | None = None
    item_base: int = 0
    """Item attempts of an earlier round (a retried run): new ones are numbered after."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StepState:
        items = data.get("items")
        return cls(
            **{k: v for k, v in data.items() if k != "items"},
            items=[ItemState(**i) for i in items] if items is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        """Field by field, sharing outputs, values and errors: the state machine replaces
        them and never edits one in place. (``asdict`` deep-copied every output on every
        save, a tenth of the scheduler's CPU per step.)"""
        return {
            **_attempt_json(self),
            "items": None if self.items is None else [item.to_json() for item in self.items],
            "values": self.values,
            "item_base": self.item_base,
        }


def _attempt_json(state: ItemState | StepState) -> dict[str, Any]:
    """What a step and a fan-out item both save of their current attempt."""
    return {
        "status": state.status,
        "attempt": state.attempt,
        "output": state.output,
        "error": state.error,
        "redeliveries": state.redeliveries,
    }


@dataclass
class RunState:
    run_id: str
    pipeline: str
    version: int
    input: dict[str, Any]
    status: str = "queued"
    steps: dict[str, StepState] = field(default_factory=dict)
    output: Any = None
    error: dict[str, Any] | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-step edits of ``with`` made by a retry (``--set steps.x.with.k=v``)."""
    cost: float = 0.0
    budget_grants: int = 1
    """How many times ``budget.max_cost`` this run may spend: each resume grants one more."""

    @classmethod
    def new(
        cls, spec: PipelineSpec, *, run_id: str, version: int, run_input: dict[str, Any]
    ) -> RunState:
        return cls(
            run_id=run_id,
            pipeline=spec.name,
            version=version,
            input=run_input,
            steps={step.id: StepState() for step in spec.steps},
        )

    @property
    def auto_answers(self) -> dict[str, Any]:
        """This run's ``<AUTO>`` answers (``auto_field(path)`` -> text): the validated
        ``json`` of its ``auto`` step's output; empty until that step succeeded."""
        auto = self.steps.get(AUTO_STEP)
        if auto is None or auto.status != "succeeded" or not isinstance(auto.output, dict):
            return {}
        answers = auto.output.get("json")
        return answers if isinstance(answers, dict) else {}

    def config_of(self, step: StepSpec) -> dict[str, Any]:
        """The step's ``with`` with this run's ``<AUTO>`` answers in place of the tags,
        then this run's edits applied (an edit wins over an answer)."""
        config = step.with_
        answers = self.auto_answers if step.id != AUTO_STEP else {}
        if answers:
            config = fill_auto(config, f"steps.{step.id}.with", answers)
        return deep_merge(config, self.overrides.get(step.id, {}))


@dataclass(frozen=True)
class DispatchStep:
    step_id: str
    attempt: int
    item_index: int | None = None
    item: Any = None


@dataclass(frozen=True)
class SkipStep:
    step_id: str
    reason: str


@dataclass(frozen=True)
class RetryStep:
    step_id: str
    attempt: int
    next_attempt: int
    delay_s: float
    error: ErrorInfo
    item_index: int | None = None


@dataclass(frozen=True)
class CompleteStep:
    """A fan-out step finished as a whole (its items finished one by one before)."""

    step_id: str
    attempt: int
    output: Any = None
    error: ErrorInfo | None = None


@dataclass(frozen=True)
class CancelAttempt:
    step_id: str
    attempt: int
    item_index: int | None
    reason: str


@dataclass(frozen=True)
class ParkRun:
    reason: str
    step_id: str | None = None


@dataclass(frozen=True)
class CompleteRun:
    output: Any
    status: str = "succeeded"


@dataclass(frozen=True)
class FailRun:
    error: ErrorInfo
    step_id: str | None = None


Command = (
    DispatchStep
    | SkipStep
    | RetryStep
    | CompleteStep
    | CancelAttempt
    | ParkRun
    | CompleteRun
    | FailRun
)


def set_path(target: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        nested = target.get(part)
        if not isinstance(nested, dict):
            nested = {}
            target[part] = nested
        target = nested
    target[parts[-1]] = value


def deep_merge(base: dict[str, Any], edits: dict[str, Any]) -> dict[str, Any]:
    if not edits:
        return base
    merged = dict(base)
    for key, value in edits.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
