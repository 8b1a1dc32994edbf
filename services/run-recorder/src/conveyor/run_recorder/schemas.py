"""The JSON shapes of the recorder's HTTP API: the public contract users script against.

Fields are only ever added. Datetimes are ISO-8601 in UTC; ``item_index`` is null for a
step that does not fan out.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, Field

__all__ = [
    "AttemptStatus",
    "DeadLetterEntry",
    "DeadLetterPage",
    "ErrorEntry",
    "ErrorPage",
    "ErrorScope",
    "EventEntry",
    "EventPage",
    "Health",
    "PipelineEntry",
    "PipelineHealth",
    "PipelinePage",
    "RunDeletion",
    "RunDetail",
    "RunPage",
    "RunStatus",
    "RunSummary",
    "StepAttempt",
]

RunStatus = Literal["queued", "running", "parked", "succeeded", "failed", "cancelled", "skipped"]
AttemptStatus = Literal["scheduled", "running", "succeeded", "failed", "skipped", "cancelled"]
ErrorScope = Literal["step", "run", "dead_letter"]


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


Timestamp = Annotated[datetime, AfterValidator(_utc)]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class RunSummary(BaseModel):
    id: UUID
    pipeline: str | None = Field(description="null only until the run's RunQueued is recorded")
    version: int | None
    status: RunStatus
    requested_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    duration_ms: float | None = Field(description="finished_at - started_at, when both are known")
    tokens: int = Field(description="tokens in + out over every step attempt")
    cost: float = Field(description="provider cost over every step attempt")
    error: dict[str, Any] | None = Field(
        description="type, message, traceback, retryable, ...; a cancelled run's is of type"
        " Cancelled, with the reason as its message"
    )
    retries: int = Field(0, description="how many times the run was retried from a step")


class RunPage(BaseModel):
    items: list[RunSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next (older) page")


class StepAttempt(BaseModel):
    step_id: str
    attempt: int
    item_index: int | None
    status: AttemptStatus
    kind: str | None
    input: Any = Field(description="the rendered config when the runner reported it")
    output: Any
    error: dict[str, Any] | None
    reason: str | None = Field(description="why the attempt was skipped or cancelled")
    worker: str | None
    scheduled_at: Timestamp | None
    started_at: Timestamp | None
    finished_at: Timestamp | None
    duration_ms: float | None
    metrics: dict[str, Any] | None
    progress: float | None = None
    progress_message: str | None = None


class RunDetail(BaseModel):
    id: UUID
    pipeline: str | None
    version: int | None
    status: RunStatus
    input: Any
    output: Any
    error: dict[str, Any] | None
    requested_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    duration_ms: float | None
    tokens: int
    cost: float
    idempotency_key: str | None
    requested_by: str | None = None
    retries: int = Field(0, description="how many times the run was retried from a step")
    retried_at: Timestamp | None = Field(
        None, description="when it was last retried: it ran again from then on"
    )
    trace_id: str | None = None
    """The OpenTelemetry trace of the run: every service's spans for it share this id."""
    steps: list[StepAttempt] = Field(
        description="every attempt; a fan-out step has one row per item attempt (item_index"
        " set) and, once all its items are done, one row for the step itself (item_index"
        " null) whose output is the list of the items' outputs"
    )


class RunDeletion(BaseModel):
    """What ``DELETE /runs/{id}`` did: the run's history is gone, and RunDeleted was
    published so that its scheduler state and artifacts go too."""

    run_id: UUID
    deleted_at: Timestamp
    deleted_by: str | None = None
    already_deleted: bool = Field(
        False, description="the run had been deleted before; RunDeleted was published again"
    )


class EventEntry(BaseModel):
    event_id: UUID
    type: str
    topic: str
    occurred_at: Timestamp
    trace_id: str | None = None
    payload: dict[str, Any]


class EventPage(BaseModel):
    items: list[EventEntry]


class ErrorEntry(BaseModel):
    id: int
    event_id: UUID | None = Field(
        None,
        description="the event that reported the error (StepFailed, RunFailed or DeadLetter):"
        " a dead letter's is its event_id in /dead-letters",
    )
    run_id: UUID | None
    pipeline: str | None
    step_id: str | None
    attempt: int | None
    scope: ErrorScope
    type: str
    message: str
    traceback: str | None
    retryable: bool
    occurred_at: Timestamp


class ErrorPage(BaseModel):
    items: list[ErrorEntry]


class DeadLetterEntry(BaseModel):
    event_id: UUID
    source_topic: str
    partition: int
    offset: int
    consumer_group: str
    reason: str
    key: str | None = Field(description="the record key as UTF-8 text, null if not text")
    value: str | None = Field(description="the record value as UTF-8 text, null if not text")
    value_b64: str = Field(description="the record value byte for byte")
    headers: dict[str, str]
    occurred_at: Timestamp


class DeadLetterPage(BaseModel):
    items: list[DeadLetterEntry]


class PipelineEntry(BaseModel):
    name: str
    version: int
    digest: str
    registered_at: Timestamp
    paused: bool | None = Field(
        None, description="whether the pipeline's cron schedule is paused; null without one"
    )


class PipelinePage(BaseModel):
    items: list[PipelineEntry]


class PipelineHealth(BaseModel):
    pipeline: str
    window: int = Field(description="how many of the newest runs the figures cover")
    runs: int
    by_status: dict[str, int]
    success_rate: float | None = Field(description="succeeded / finished, null if none finished")
    p50_duration_ms: float | None
    p95_duration_ms: float | None
    tokens: int
    cost: float
    last_run_at: Timestamp | None
    last_failure_at: Timestamp | None
