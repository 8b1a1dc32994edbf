"""Every event that crosses a topic: frozen pydantic v2 models, JSON on the wire.

Each event carries ``event_id``, ``occurred_at`` (aware UTC), ``schema_version`` and a
``type`` tag. Unknown fields are ignored so that consumers tolerate additions; a breaking
change is a new ``schema_version`` literal accepted through the discriminated unions below.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID, uuid4, uuid5

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)

from conveyor.contracts._limits import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_RUN_INPUT_BYTES,
    json_value_problem,
)

__all__ = [
    "CONTROL_EVENT",
    "PIPELINE_EVENT",
    "RUN_EVENT",
    "STEP_RESULT_EVENT",
    "CancelRun",
    "DeadLetter",
    "ErrorInfo",
    "Event",
    "GateDecision",
    "IdempotencyKey",
    "PipelineRegistered",
    "ResumeRun",
    "RetryRun",
    "RunCancelled",
    "RunCompleted",
    "RunDeleted",
    "RunFailed",
    "RunParked",
    "RunQueued",
    "RunRequested",
    "RunResumed",
    "RunRetried",
    "RunStarted",
    "ScheduleUpdated",
    "StepCancelled",
    "StepCompleted",
    "StepFailed",
    "StepMetrics",
    "StepProgress",
    "StepReady",
    "StepRetrying",
    "StepScheduled",
    "StepSkipped",
    "StepStarted",
    "run_id_for_request",
    "utcnow",
]

_RUN_NAMESPACE = UUID("5b0f6c1e-8a51-4c1b-9c43-2f6f7f1c0b2d")


def utcnow() -> datetime:
    return datetime.now(UTC)


def run_id_for_request(event_id: UUID) -> UUID:
    """The run a RunRequested creates: derived, so a client that chose the event id knows
    the run id before the scheduler has seen the request. (A request whose idempotency key
    is live maps to the key's run instead, and creates none.)"""
    return uuid5(_RUN_NAMESPACE, str(event_id))


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: UUID = Field(default_factory=uuid4)
    occurred_at: AwareDatetime = Field(default_factory=utcnow)
    schema_version: Literal[1] = 1


class ErrorInfo(BaseModel):
    """A failure as data: what went wrong, where, and whether trying again can help."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: str
    message: str
    traceback: str | None = None
    retryable: bool = False
    retry_after_s: float | None = None
    details: dict[str, Any] | None = None


class StepMetrics(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    duration_ms: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    cache_hit: bool = False


# --- conveyor.runs.requested -------------------------------------------------------------


def _printable(key: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise ValueError("an idempotency key is one line of printable text: no control characters")
    return key


IdempotencyKey = Annotated[
    str, Field(min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS), AfterValidator(_printable)
]
"""Printable text: the key is stored and shown; an empty one is a client's mistake."""


class RunRequested(Event):
    """Anyone -> scheduler. Only ``pipeline`` is required: ``{"pipeline": "x", "input": {}}``.

    A request whose values could not be stored (a NUL character, a NaN, an input over
    ``MAX_RUN_INPUT_BYTES``) is refused as an invalid event, so it goes to the dead-letter
    topic; one that is well formed but does not fit the pipeline's declared input becomes
    a failed run with an ``InvalidInput`` error, visible in the run history."""

    type: Literal["RunRequested"] = "RunRequested"
    pipeline: str = Field(min_length=1, max_length=256)
    input: dict[str, Any] = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1)
    idempotency_key: IdempotencyKey | None = None
    requested_by: str | None = Field(default=None, max_length=256)
    run_id: UUID | None = None

    @model_validator(mode="after")
    def _storable(self) -> RunRequested:
        fields = {"pipeline": self.pipeline, "requested_by": self.requested_by}
        unstorable = json_value_problem({**fields, "input": self.input})
        if unstorable is not None:
            loc, message = unstorable
            raise ValueError(f"{'.'.join(str(p) for p in loc)} {message}")
        size = len(json.dumps(self.input, separators=(",", ":"), ensure_ascii=False).encode())
        if size > MAX_RUN_INPUT_BYTES:
            raise ValueError(f"input is {size} bytes of JSON; the limit is {MAX_RUN_INPUT_BYTES}")
        return self

    def resolved_run_id(self) -> UUID:
        return self.run_id or run_id_for_request(self.event_id)


# --- conveyor.steps.ready.<kind> ---------------------------------------------------------


class StepReady(Event):
    """Scheduler -> runner group of ``kind``. ``config`` is the step's ``with``, unrendered:
    the runner renders it against ``context`` so that secrets never ride in an event."""

    type: Literal["StepReady"] = "StepReady"
    run_id: UUID
    pipeline: str
    version: int
    step_id: str
    attempt: int = Field(ge=1)
    kind: str
    config: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float | None = None
    item_index: int | None = None

    def outcome_fields(self) -> dict[str, Any]:
        """What every outcome of this attempt (StepStarted, StepCompleted, StepFailed)
        copies from it: which attempt it is, its kind and when it was dispatched."""
        return {
            "run_id": self.run_id,
            "step_id": self.step_id,
            "attempt": self.attempt,
            "item_index": self.item_index,
            "kind": self.kind,
            "scheduled_at": self.occurred_at,
        }


# --- conveyor.steps.completed ------------------------------------------------------------


class _StepResult(Event):
    run_id: UUID
    step_id: str
    attempt: int = Field(ge=1)
    item_index: int | None = None


class _StepOutcome(_StepResult):
    """What the history needs of the StepReady an attempt ran from, so that the scheduler
    need not say it in an event of its own (see ``StepScheduled``). None from older
    runners."""

    kind: str | None = None
    scheduled_at: AwareDatetime | None = None
    """When the scheduler dispatched the attempt: its StepReady's ``occurred_at``."""


class StepStarted(_StepOutcome):
    type: Literal["StepStarted"] = "StepStarted"
    worker: str | None = None


class StepProgress(_StepResult):
    type: Literal["StepProgress"] = "StepProgress"
    progress: float | None = None
    message: str | None = None


class StepCompleted(_StepOutcome):
    """The data packet: the step's output plus how it was produced."""

    type: Literal["StepCompleted"] = "StepCompleted"
    output: Any = None
    input: Any = None
    metrics: StepMetrics = Field(default_factory=StepMetrics)
    started_at: AwareDatetime | None = None
    worker: str | None = None


class StepFailed(_StepOutcome):
    type: Literal["StepFailed"] = "StepFailed"
    error: ErrorInfo
    input: Any = None
    metrics: StepMetrics = Field(default_factory=StepMetrics)
    started_at: AwareDatetime | None = None
    worker: str | None = None


# --- conveyor.runs.events ----------------------------------------------------------------


class _RunEvent(Event):
    run_id: UUID


class RunQueued(_RunEvent):
    """The run exists (pinned to ``version``); emitted before anything else about it."""

    type: Literal["RunQueued"] = "RunQueued"
    pipeline: str
    version: int | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    requested_event_id: UUID | None = None
    idempotency_key: str | None = None
    requested_by: str | None = None
    requested_at: AwareDatetime | None = None


class RunStarted(_RunEvent):
    type: Literal["RunStarted"] = "RunStarted"
    pipeline: str
    version: int


class StepScheduled(_RunEvent):
    """An attempt dispatched. Schedulers no longer publish it: the attempt's result (and
    its StepStarted, for a step that runs a while) carries its ``kind`` and
    ``scheduled_at``, which saved an event, a produce and a history write per step. The
    recorder still projects it, for event logs written before."""

    type: Literal["StepScheduled"] = "StepScheduled"
    step_id: str
    attempt: int
    kind: str
    item_index: int | None = None
    config: dict[str, Any] = Field(default_factory=dict)


class StepRetrying(_RunEvent):
    type: Literal["StepRetrying"] = "StepRetrying"
    step_id: str
    attempt: int
    next_attempt: int
    retry_at: AwareDatetime
    item_index: int | None = None
    error: ErrorInfo | None = None


class StepSkipped(_RunEvent):
    type: Literal["StepSkipped"] = "StepSkipped"
    step_id: str
    reason: str


class RunParked(_RunEvent):
    type: Literal["RunParked"] = "RunParked"
    step_id: str
    reason: str | None = None


class RunResumed(_RunEvent):
    type: Literal["RunResumed"] = "RunResumed"
    step_id: str | None = None


class StepCancelled(_RunEvent):
    """An attempt that will not finish: its run was cancelled or ended while it ran."""

    type: Literal["StepCancelled"] = "StepCancelled"
    step_id: str
    attempt: int
    item_index: int | None = None
    reason: str | None = None


class RunRetried(_RunEvent):
    """A finished run reopened from ``from_step``: the steps from there on run again as new
    attempts, upstream outputs are reused; ``set`` holds the edits applied first."""

    type: Literal["RunRetried"] = "RunRetried"
    from_step: str
    set: dict[str, Any] = Field(default_factory=dict)
    input: dict[str, Any] = Field(default_factory=dict)
    requested_by: str | None = None


class RunCompleted(_RunEvent):
    type: Literal["RunCompleted"] = "RunCompleted"
    output: Any = None
    status: Literal["succeeded", "skipped"] = "succeeded"


class RunFailed(_RunEvent):
    type: Literal["RunFailed"] = "RunFailed"
    error: ErrorInfo
    step_id: str | None = None


class RunCancelled(_RunEvent):
    type: Literal["RunCancelled"] = "RunCancelled"
    reason: str | None = None


# --- conveyor.runs.control ---------------------------------------------------------------


class CancelRun(_RunEvent):
    type: Literal["CancelRun"] = "CancelRun"
    reason: str | None = None
    requested_by: str | None = None


class ResumeRun(_RunEvent):
    type: Literal["ResumeRun"] = "ResumeRun"
    requested_by: str | None = None


class RetryRun(_RunEvent):
    type: Literal["RetryRun"] = "RetryRun"
    from_step: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    requested_by: str | None = None


class RunDeleted(_RunEvent):
    """An ended run's history was deleted (run recorder -> everyone): its state and its
    artifacts go too. Runners read it without a consumer group, so one that was down
    misses it; ``conveyor artifacts gc`` catches up."""

    type: Literal["RunDeleted"] = "RunDeleted"
    requested_by: str | None = None


class GateDecision(_RunEvent):
    type: Literal["GateDecision"] = "GateDecision"
    step_id: str
    approved: bool
    decided_by: str | None = None
    comment: str | None = None
    signature: str | None = None


# --- conveyor.pipelines ------------------------------------------------------------------


class ScheduleUpdated(Event):
    """A pipeline's cron schedule paused or resumed (from the CLI or the API)."""

    type: Literal["ScheduleUpdated"] = "ScheduleUpdated"
    name: str
    paused: bool
    updated_by: str | None = None


class PipelineRegistered(Event):
    """A new immutable pipeline version, emitted by the scheduler once it is validated."""

    type: Literal["PipelineRegistered"] = "PipelineRegistered"
    name: str
    version: int = Field(ge=1)
    digest: str
    spec: dict[str, Any]
    source_file: str | None = None


# --- conveyor.dlq ------------------------------------------------------------------------


class DeadLetter(Event):
    """A message some consumer could not decode or process, kept byte for byte."""

    type: Literal["DeadLetter"] = "DeadLetter"
    source_topic: str
    partition: int
    offset: int
    consumer_group: str
    reason: str
    key_b64: str | None = None
    value_b64: str
    headers: dict[str, str] = Field(default_factory=dict)


# StepStarted/StepProgress are accepted here too: runners before 2026-11 sent them here.
STEP_RESULT_EVENT = Annotated[
    StepStarted | StepProgress | StepCompleted | StepFailed, Field(discriminator="type")
]
# StepCompleted/StepFailed appear here too: the scheduler's summary of a fan-out step
# (item_index null) once all its items are done. StepStarted/StepProgress come from the
# runners: only the recorder reads them, and the scheduler does not read this topic.
RUN_EVENT = Annotated[
    RunQueued
    | RunStarted
    | StepScheduled
    | StepStarted
    | StepProgress
    | StepRetrying
    | StepSkipped
    | RunParked
    | RunResumed
    | StepCancelled
    | StepCompleted
    | StepFailed
    | RunRetried
    | RunCompleted
    | RunFailed
    | RunCancelled,
    Field(discriminator="type"),
]
CONTROL_EVENT = Annotated[
    CancelRun | ResumeRun | RetryRun | GateDecision | RunDeleted, Field(discriminator="type")
]
PIPELINE_EVENT = Annotated[PipelineRegistered | ScheduleUpdated, Field(discriminator="type")]

# Adapters are built once: building one per message would dominate the hot path.
STEP_RESULT_ADAPTER: TypeAdapter[Any] = TypeAdapter(STEP_RESULT_EVENT)
RUN_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(RUN_EVENT)
CONTROL_ADAPTER: TypeAdapter[Any] = TypeAdapter(CONTROL_EVENT)
PIPELINE_ADAPTER: TypeAdapter[Any] = TypeAdapter(PIPELINE_EVENT)
