"""The projection: events in, a few statements in the caller's transaction out.

The raw event goes to ``event_log`` first, keyed by ``event_id``; when it was already there
(a redelivery, a replay) nothing else happens, which is what keeps counters such as a run's
tokens exact under at-least-once delivery. Every other write is an order-tolerant upsert
(see ``_merge``), so the rows come out the same whatever order the topics were read in.

A batch (what one poll returned) costs a handful of statements, not a few per event: one
statement logs all its events, and the writes of those that were new are sent grouped by
statement, each group as one pipelined ``executemany``. The effect is exactly that of
projecting the events one after another: two writes change places only when they touch
different rows and read nothing the other writes (each write names the rows it touches, its
*keys*), errors are inserted in event order (their ids are shown), and the two projections
that read what earlier events wrote, RunRetried (the event log, the run) and RunDeleted (the
tombstone), close the group of events before them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy import Executable
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.contracts import (
    DeadLetter,
    Event,
    PipelineRegistered,
    RunCancelled,
    RunCompleted,
    RunDeleted,
    RunFailed,
    RunParked,
    RunQueued,
    RunResumed,
    RunRetried,
    RunStarted,
    ScheduleUpdated,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepProgress,
    StepScheduled,
    StepSkipped,
    StepStarted,
)
from conveyor.run_recorder import _statements as sql
from conveyor.run_recorder.deletion import purge, tombstone
from conveyor.run_recorder.tables import NO_ITEM

__all__ = ["RecordOrigin", "project_event", "project_events", "record_event", "trace_id_of"]

log = logging.getLogger("conveyor.run_recorder.projection")


class RecordOrigin(Protocol):
    """Where an event was read: a Kafka record (aiokafka's ConsumerRecord fits)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...


def trace_id_of(origin: RecordOrigin) -> str | None:
    """The trace id in the record's ``traceparent`` header (``00-<trace>-<span>-<flags>``)."""
    for name, value in getattr(origin, "headers", None) or ():
        if name == "traceparent":
            text = value.decode() if isinstance(value, bytes) else str(value)
            parts = text.split("-")
            return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None
    return None


Payload = dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Write:
    """One statement of an event's projection, with the rows it reads or writes (``keys``):
    writes that share no key commute."""

    statement: Executable
    params: dict[str, Any]
    keys: tuple[Hashable, ...]


_Plan = Callable[[Any, Payload], list[_Write]]


async def record_event(
    engine: AsyncEngine, event: Event, origin: RecordOrigin, *, patience: float = 60.0
) -> bool:
    """Project ``event`` in its own transaction; False when it had been recorded already.

    While the database is unreachable the event is retried here for up to ``patience``
    seconds: a valid event must wait for the database, not be dead-lettered because of it
    (the consumer guard dead-letters what keeps failing). Other errors raise at once.
    """
    delay, waited = 0.1, 0.0
    while True:
        try:
            async with engine.begin() as conn:
                return await project_event(conn, event, origin=origin)
        except (OperationalError, InterfaceError) as exc:
            if waited >= patience:
                raise
            log.warning("database unavailable, retrying in %.1fs: %s", delay, exc)
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)


async def project_event(conn: AsyncConnection, event: Event, *, origin: RecordOrigin) -> bool:
    """Log ``event`` and apply it to the read model on ``conn`` (the caller's transaction).

    Returns False, and changes nothing, when ``event_id`` is already in the log, or when
    the event is about a deleted run. RunDeleted is not logged: it deletes the run's rows
    (again, see ``deletion``) and leaves the tombstone.
    """
    [projected] = await project_events(conn, [(event, origin)])
    return projected


async def project_events(
    conn: AsyncConnection, events: Sequence[tuple[Event, RecordOrigin]]
) -> list[bool]:
    """``project_event`` of each of ``events`` in turn, in far fewer statements (see above).

    Returns, for each event, what ``project_event`` would have: False for one already
    logged (earlier, or earlier in ``events``) or about a deleted run.
    """
    projected: list[bool] = []
    group: list[_Entry] = []
    for event, origin in events:
        if isinstance(event, RunDeleted):
            projected += await _project_group(conn, group)
            group = []
            await tombstone(
                conn, event.run_id, deleted_at=event.occurred_at, deleted_by=event.requested_by
            )
            await purge(conn, event.run_id)
            projected.append(True)
            continue
        group.append(_entry(event, origin))
        if isinstance(event, RunRetried):
            projected += await _project_group(conn, group)
            group = []
    projected += await _project_group(conn, group)
    return projected


@dataclass(frozen=True, slots=True)
class _Entry:
    event: Event
    payload: Payload
    text: str
    origin: RecordOrigin
    run_id: UUID | None


def _entry(event: Event, origin: RecordOrigin) -> _Entry:
    event, payload, text = _storable(event)
    run_id = getattr(event, "run_id", None)
    if isinstance(event, DeadLetter):
        run_id, _ = _subject_of(event)
    return _Entry(event, payload, text, origin, run_id)


async def _project_group(conn: AsyncConnection, group: list[_Entry]) -> list[bool]:
    """Log ``group`` in one statement, then apply the new events' writes; a RunRetried can
    only come last (it reads the log and the run: everything before it must be there)."""
    if not group:
        return []
    batch = f"[{','.join(_log_row(entry) for entry in group)}]"
    new = set(await conn.scalars(sql.LOG, {"batch": batch}))
    logged: list[bool] = []
    writes: list[_Write] = []
    for entry in group:
        event_id = entry.event.event_id
        logged.append(event_id in new)
        if event_id not in new:
            continue
        new.discard(event_id)  # a second copy in the batch is a redelivery
        plan = _PLANS.get(type(entry.event))
        if plan is not None:
            writes += plan(entry.event, entry.payload)
    await _execute(conn, writes)
    last = group[-1]
    if logged[-1] and isinstance(last.event, RunRetried):
        await _run_retried(conn, last.event, last.payload)
    return logged


def _log_row(entry: _Entry) -> str:
    """The event's row of ``event_log`` as JSON, around the event's JSON text."""
    event, origin = entry.event, entry.origin
    run_id = "null" if entry.run_id is None else f'"{entry.run_id}"'
    return (
        f'{{"event_id":"{event.event_id}",'
        f'"type":{json.dumps(entry.payload.get("type", type(event).__name__))},'
        f'"topic":{json.dumps(origin.topic)},'
        f'"partition":{int(origin.partition)},"offset":{int(origin.offset)},'
        f'"run_id":{run_id},'
        f'"occurred_at":"{event.occurred_at.astimezone(UTC).isoformat()}",'
        f'"trace_id":{json.dumps(trace_id_of(origin))},'
        f'"payload":{entry.text}}}'
    )


async def _execute(conn: AsyncConnection, writes: list[_Write]) -> None:
    """Run ``writes`` with the effect of running them in order, grouped by statement.

    A write joins the first group of its statement that comes no earlier than the groups
    of the writes before it that share a key with it; a group runs its rows in order."""
    groups: list[tuple[Executable, list[dict[str, Any]]]] = []
    after: dict[Hashable, int] = {}
    for write in writes:
        earliest = max(after.get(key, 0) for key in write.keys)
        index = next(
            (i for i in range(earliest, len(groups)) if groups[i][0] is write.statement),
            len(groups),
        )
        if index == len(groups):
            groups.append((write.statement, []))
        groups[index][1].append(write.params)
        for key in write.keys:
            after[key] = index
    for statement, rows in groups:
        # several rows: one executemany, which psycopg pipelines (one round trip)
        await conn.execute(statement, rows if len(rows) > 1 else rows[0])


def _storable(event: Event) -> tuple[Event, Payload, str]:
    """The event as JSON-native data. PostgreSQL refuses NUL in text and JSONB; an event
    carrying one is stored without it rather than failing forever."""
    payload = event.model_dump(mode="json")
    text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    if "\\u0000" in text:
        payload = _without_nul(payload)
        event = type(event).model_validate(payload)
        text = json.dumps(payload, ensure_ascii=False, allow_nan=False)
    return event, payload, text


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


# --- runs ------------------------------------------------------------------------------
# Writes are keyed by the run for the run's row and its errors (an error takes the run's
# pipeline, RunQueued fills it in), by the attempt for an attempt's row; every error also by
# ``_ERRORS``, so that errors are numbered in event order.

_ERRORS = ("errors",)


def _on_run(statement: Executable, params: dict[str, Any], run_id: UUID | None) -> _Write:
    return _Write(statement, params, (("run", run_id),))


def _run(event: Any, status: str, **values: Any) -> dict[str, Any]:
    return {
        "id": event.run_id,
        "status": status,
        "status_at": event.occurred_at,
        "requested_at": event.occurred_at,
        **values,
    }


def _run_queued(event: RunQueued, payload: Payload) -> list[_Write]:
    params = _run(
        event,
        "queued",
        pipeline=event.pipeline,
        version=event.version,
        input=payload["input"],
        idempotency_key=event.idempotency_key,
        requested_by=event.requested_by,
    )
    params["requested_at"] = event.requested_at or event.occurred_at
    # A step may have failed before its RunQueued was read: give its error the pipeline.
    fill = {"for_run": event.run_id, "run_pipeline": event.pipeline}
    return [
        _on_run(sql.RUN_QUEUED, params, event.run_id),
        _on_run(sql.FILL_ERROR_PIPELINE, fill, event.run_id),
    ]


def _run_started(event: RunStarted, payload: Payload) -> list[_Write]:
    params = _run(
        event,
        "running",
        pipeline=event.pipeline,
        version=event.version,
        started_at=event.occurred_at,
    )
    return [_on_run(sql.RUN_STARTED, params, event.run_id)]


def _run_parked(event: RunParked, payload: Payload) -> list[_Write]:
    return [_on_run(sql.RUN_STATUS, _run(event, "parked"), event.run_id)]


def _run_resumed(event: RunResumed, payload: Payload) -> list[_Write]:
    return [_on_run(sql.RUN_STATUS, _run(event, "running"), event.run_id)]


def _ended(event: Any, status: str, *, output: Any = None, error: Any = None) -> dict[str, Any]:
    return _run(event, status, output=output, error=error, finished_at=event.occurred_at)


def _run_completed(event: RunCompleted, payload: Payload) -> list[_Write]:
    params = _ended(event, event.status, output=payload["output"])
    return [_on_run(sql.RUN_COMPLETED, params, event.run_id)]


def _run_failed(event: RunFailed, payload: Payload) -> list[_Write]:
    params = _ended(event, "failed", error=payload["error"])
    return [
        _on_run(sql.RUN_FAILED, params, event.run_id),
        _error(event, scope="run", step_id=event.step_id, attempt=None),
    ]


def _run_cancelled(event: RunCancelled, payload: Payload) -> list[_Write]:
    # Why the run was cancelled, as its error: what a script checks first.
    error = {"type": "Cancelled", "message": event.reason or "cancelled", "retryable": False}
    return [_on_run(sql.RUN_CANCELLED, _ended(event, "cancelled", error=error), event.run_id)]


_LIVE_STATUS = {"RunStarted": "running", "RunResumed": "running", "RunParked": "parked"}


async def _run_retried(conn: AsyncConnection, event: RunRetried, payload: Payload) -> None:
    """The run reopened: running again from ``event.occurred_at``, its outcome cleared.

    The one move backwards, so not the rank rule but a read-modify-write under the row's
    lock. Order tolerance comes from the times: a retry older than the run's latest one only
    counts; when the run's status was set after this retry (the re-run's own events were
    read first), the status stands; otherwise the run is reopened, as ``parked`` or
    ``running`` if the re-run's latest such event was already read (it lost to the old end
    then, and is in the event log), else as ``running`` from the retry.
    """
    at = event.occurred_at
    placeholder = {"id": event.run_id, "requested_at": at, "status": "running", "status_at": at}
    await conn.execute(sql.RUN_RETRY_PLACEHOLDER, placeholder)
    row = (await conn.execute(sql.RUN_FOR_RETRY, {"id": event.run_id})).one()
    if row.retried_at is not None and at <= row.retried_at:
        await conn.execute(sql.RUN_RETRY_COUNTED, {"run": event.run_id})
        return
    params = {"run": event.run_id, "new_retried_at": at, "new_input": payload["input"]}
    if row.status_at is not None and row.status_at > at:
        await conn.execute(sql.RUN_RETRIED, params)
        return
    live = (
        await conn.execute(sql.LATEST_LIVE_RUN_EVENT, {"id": event.run_id, "after": at})
    ).first()
    status, status_at = (_LIVE_STATUS[live.type], live.occurred_at) if live else ("running", at)
    await conn.execute(
        sql.RUN_REOPENED, {**params, "new_status": status, "new_status_at": status_at}
    )


def _usage(event: StepCompleted | StepFailed) -> list[_Write]:
    tokens = event.metrics.tokens_in + event.metrics.tokens_out
    cost = event.metrics.cost
    if not (tokens or cost):
        return []
    params = {"id": event.run_id, "requested_at": event.occurred_at, "tokens": tokens, "cost": cost}
    return [_on_run(sql.ADD_USAGE, params, event.run_id)]


# --- step attempts ---------------------------------------------------------------------


def _attempt(
    event: Any, status: str, *, attempt: int | None = None, **values: Any
) -> dict[str, Any]:
    item = getattr(event, "item_index", None)
    return {
        "run_id": event.run_id,
        "step_id": event.step_id,
        "attempt": attempt if attempt is not None else event.attempt,
        "item_index": NO_ITEM if item is None else item,
        "status": status,
        "status_at": event.occurred_at,
        **values,
    }


def _on_attempt(statement: Executable, params: dict[str, Any]) -> _Write:
    key = ("attempt", params["run_id"], params["step_id"], params["attempt"], params["item_index"])
    return _Write(statement, params, (key,))


def _step_scheduled(event: StepScheduled, payload: Payload) -> list[_Write]:
    params = _attempt(
        event, "scheduled", kind=event.kind, input=payload["config"], scheduled_at=event.occurred_at
    )
    return [_on_attempt(sql.STEP_SCHEDULED, params)]


def _step_started(event: StepStarted, payload: Payload) -> list[_Write]:
    params = _attempt(
        event,
        "running",
        kind=event.kind,
        scheduled_at=event.scheduled_at,
        started_at=event.occurred_at,
        worker=event.worker,
    )
    return [_on_attempt(sql.STEP_STARTED, params)]


def _step_progress(event: StepProgress, payload: Payload) -> list[_Write]:
    params = _attempt(
        event,
        "running",
        progress=event.progress,
        progress_message=event.message,
        progress_at=event.occurred_at,
    )
    return [_on_attempt(sql.STEP_PROGRESS, params)]


def _step_finished(
    event: StepCompleted | StepFailed, payload: Payload, *, status: str
) -> list[_Write]:
    params = _attempt(
        event,
        status,
        kind=event.kind,
        scheduled_at=event.scheduled_at,
        output=payload.get("output"),
        error=payload.get("error"),
        input=payload["input"],
        metrics=payload["metrics"],
        started_at=event.started_at,
        finished_at=event.occurred_at,
        worker=event.worker,
    )
    # A failed LLM call is billed too: the run's usage counts every attempt.
    return [_on_attempt(sql.STEP_FINISHED, params), *_usage(event)]


def _step_completed(event: StepCompleted, payload: Payload) -> list[_Write]:
    return _step_finished(event, payload, status="succeeded")


# The error type a runner reports when it stopped an attempt because its run was cancelled
# (conveyor.runtime.runner.Cancelled): the attempt was cancelled, it did not fail.
_CANCELLED_ERROR = "Cancelled"


def _step_failed(event: StepFailed, payload: Payload) -> list[_Write]:
    if event.error.type == _CANCELLED_ERROR:
        return _step_finished(event, payload, status="cancelled")  # not an error to list
    return [
        *_step_finished(event, payload, status="failed"),
        _error(event, scope="step", step_id=event.step_id, attempt=event.attempt),
    ]


def _step_skipped(event: StepSkipped, payload: Payload) -> list[_Write]:
    params = _attempt(
        event, "skipped", attempt=1, reason=event.reason, finished_at=event.occurred_at
    )
    return [_on_attempt(sql.STEP_SKIPPED, params)]


def _step_cancelled(event: StepCancelled, payload: Payload) -> list[_Write]:
    # Ranked below a result: a runner's answer for this attempt, read before or after, stands.
    params = _attempt(event, "cancelled", reason=event.reason, finished_at=event.occurred_at)
    return [_on_attempt(sql.STEP_CANCELLED, params)]


def _error(
    event: StepFailed | RunFailed, *, scope: str, step_id: str | None, attempt: int | None
) -> _Write:
    params = {
        "event_id": event.event_id,
        "run_id": event.run_id,
        "pipeline": None,  # the run's, when it is known
        "step_id": step_id,
        "attempt": attempt,
        "scope": scope,
        "type": event.error.type,
        "message": event.error.message,
        "traceback": event.error.traceback,
        "retryable": event.error.retryable,
        "occurred_at": event.occurred_at,
    }
    return _Write(sql.ERROR, params, (("run", event.run_id), _ERRORS))


# --- pipelines and dead letters --------------------------------------------------------


def _pipeline_registered(event: PipelineRegistered, payload: Payload) -> list[_Write]:
    params = {
        "name": event.name,
        "version": event.version,
        "digest": event.digest,
        "spec": payload["spec"],
        "registered_at": event.occurred_at,
    }
    return [_Write(sql.PIPELINE, params, (("pipeline", event.name, event.version),))]


def _schedule_updated(event: ScheduleUpdated, payload: Payload) -> list[_Write]:
    params = {
        "name": event.name,
        "paused": event.paused,
        "changed_at": event.occurred_at,
        "changed_by": event.updated_by,
    }
    return [_Write(sql.SCHEDULE, params, (("schedule", event.name),))]


def _subject_of(letter: DeadLetter) -> tuple[UUID | None, str | None]:
    """The run and pipeline a dead-lettered message was about, when its body says so, so
    that the dead letter shows up in that run's events and that pipeline's errors."""
    try:
        body = json.loads(base64.b64decode(letter.value_b64, validate=True))
    except ValueError:  # bad base64, bad UTF-8 and bad JSON are all ValueErrors
        return None, None
    if not isinstance(body, dict):
        return None, None
    pipeline = body.get("pipeline")
    try:
        run_id = UUID(str(body["run_id"])) if body.get("run_id") else None
    except ValueError:
        run_id = None
    return run_id, pipeline if isinstance(pipeline, str) and pipeline else None


def _dead_letter(event: DeadLetter, payload: Payload) -> list[_Write]:
    params = {
        "event_id": event.event_id,
        "source_topic": event.source_topic,
        "partition": event.partition,
        "offset": event.offset,
        "consumer_group": event.consumer_group,
        "reason": event.reason,
        "key_b64": event.key_b64,
        "value_b64": event.value_b64,
        "headers": payload["headers"],
        "occurred_at": event.occurred_at,
    }
    run_id, pipeline = _subject_of(event)
    message, _, details = event.reason.partition("\n")
    error = {
        "event_id": event.event_id,
        "run_id": run_id,
        "pipeline": pipeline,
        "step_id": None,
        "attempt": None,
        "scope": "dead_letter",
        "type": "DeadLetter",
        "message": message,
        "traceback": details or None,
        "retryable": False,
        "occurred_at": event.occurred_at,
    }
    return [
        _Write(sql.DEAD_LETTER, params, (("dead_letter", event.event_id),)),
        _Write(sql.ERROR, error, (("run", run_id), _ERRORS)),
    ]


# What each event writes. RunRetried is projected by ``_run_retried`` (it reads first);
# CancelRun, ResumeRun, RetryRun, GateDecision and StepRetrying are kept in the log only.
_PLANS: dict[type[Event], _Plan] = {
    RunQueued: _run_queued,
    RunStarted: _run_started,
    RunParked: _run_parked,
    RunResumed: _run_resumed,
    RunCompleted: _run_completed,
    RunFailed: _run_failed,
    RunCancelled: _run_cancelled,
    StepScheduled: _step_scheduled,
    StepStarted: _step_started,
    StepProgress: _step_progress,
    StepCompleted: _step_completed,
    StepFailed: _step_failed,
    StepSkipped: _step_skipped,
    StepCancelled: _step_cancelled,
    PipelineRegistered: _pipeline_registered,
    ScheduleUpdated: _schedule_updated,
    DeadLetter: _dead_letter,
}
