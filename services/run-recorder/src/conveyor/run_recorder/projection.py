"""The projection: one event in, a few statements in one transaction out.

The raw event goes to ``event_log`` first, keyed by ``event_id``; when it was already there
(a redelivery, a replay) nothing else happens, which is what keeps counters such as a run's
tokens exact under at-least-once delivery. Every other write is an order-tolerant upsert
(see ``_merge``), so the rows come out the same whatever order the topics were read in.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from uuid import UUID

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

__all__ = ["RecordOrigin", "project_event", "record_event", "trace_id_of"]

log = logging.getLogger("conveyor.run_recorder.projection")


class RecordOrigin(Protocol):
    """Where an event was read: a Kafka record (aiokafka's ConsumerRecord fits)."""

    topic: str
    partition: int
    offset: int


def trace_id_of(origin: RecordOrigin) -> str | None:
    """The trace id in the record's ``traceparent`` header (``00-<trace>-<span>-<flags>``)."""
    for name, value in getattr(origin, "headers", None) or ():
        if name == "traceparent":
            text = value.decode() if isinstance(value, bytes) else str(value)
            parts = text.split("-")
            return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None
    return None


Payload = dict[str, Any]
_Projection = Callable[[AsyncConnection, Any, Payload], Awaitable[None]]


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
    if isinstance(event, RunDeleted):
        await tombstone(
            conn, event.run_id, deleted_at=event.occurred_at, deleted_by=event.requested_by
        )
        await purge(conn, event.run_id)
        return True
    event, payload, text = _storable(event)
    run_id = getattr(event, "run_id", None)
    if isinstance(event, DeadLetter):
        run_id, _ = _subject_of(event)
    logged = await conn.execute(
        sql.LOG,
        {
            "event_id": event.event_id,
            "type": payload.get("type", type(event).__name__),
            "topic": origin.topic,
            "partition": origin.partition,
            "offset": origin.offset,
            "run_id": run_id,
            "occurred_at": event.occurred_at,
            "payload": text,
            "trace_id": trace_id_of(origin),
        },
    )
    if logged.first() is None:
        return False
    projection = _PROJECTIONS.get(type(event))
    if projection is not None:
        await projection(conn, event, payload)
    return True


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


def _run(event: Any, status: str, **values: Any) -> dict[str, Any]:
    return {
        "id": event.run_id,
        "status": status,
        "status_at": event.occurred_at,
        "requested_at": event.occurred_at,
        **values,
    }


async def _run_queued(conn: AsyncConnection, event: RunQueued, payload: Payload) -> None:
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
    await conn.execute(sql.RUN_QUEUED, params)
    # A step may have failed before its RunQueued was read: give its error the pipeline.
    params = {"for_run": event.run_id, "run_pipeline": event.pipeline}
    await conn.execute(sql.FILL_ERROR_PIPELINE, params)


async def _run_started(conn: AsyncConnection, event: RunStarted, payload: Payload) -> None:
    params = _run(
        event,
        "running",
        pipeline=event.pipeline,
        version=event.version,
        started_at=event.occurred_at,
    )
    await conn.execute(sql.RUN_STARTED, params)


async def _run_parked(conn: AsyncConnection, event: RunParked, payload: Payload) -> None:
    await conn.execute(sql.RUN_STATUS, _run(event, "parked"))


async def _run_resumed(conn: AsyncConnection, event: RunResumed, payload: Payload) -> None:
    await conn.execute(sql.RUN_STATUS, _run(event, "running"))


def _ended(event: Any, status: str, *, output: Any = None, error: Any = None) -> dict[str, Any]:
    return _run(event, status, output=output, error=error, finished_at=event.occurred_at)


async def _run_completed(conn: AsyncConnection, event: RunCompleted, payload: Payload) -> None:
    await conn.execute(sql.RUN_COMPLETED, _ended(event, event.status, output=payload["output"]))


async def _run_failed(conn: AsyncConnection, event: RunFailed, payload: Payload) -> None:
    await conn.execute(sql.RUN_FAILED, _ended(event, "failed", error=payload["error"]))
    await _insert_error(conn, event=event, scope="run", step_id=event.step_id, attempt=None)


async def _run_cancelled(conn: AsyncConnection, event: RunCancelled, payload: Payload) -> None:
    # Why the run was cancelled, as its error: what a script checks first.
    error = {"type": "Cancelled", "message": event.reason or "cancelled", "retryable": False}
    await conn.execute(sql.RUN_CANCELLED, _ended(event, "cancelled", error=error))


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


async def _add_usage(conn: AsyncConnection, event: StepCompleted | StepFailed) -> None:
    tokens = event.metrics.tokens_in + event.metrics.tokens_out
    cost = event.metrics.cost
    if tokens or cost:
        params = {
            "id": event.run_id,
            "requested_at": event.occurred_at,
            "tokens": tokens,
            "cost": cost,
        }
        await conn.execute(sql.ADD_USAGE, params)


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


async def _step_scheduled(conn: AsyncConnection, event: StepScheduled, payload: Payload) -> None:
    params = _attempt(
        event, "scheduled", kind=event.kind, input=payload["config"], scheduled_at=event.occurred_at
    )
    await conn.execute(sql.STEP_SCHEDULED, params)


async def _step_started(conn: AsyncConnection, event: StepStarted, payload: Payload) -> None:
    params = _attempt(event, "running", started_at=event.occurred_at, worker=event.worker)
    await conn.execute(sql.STEP_STARTED, params)


async def _step_progress(conn: AsyncConnection, event: StepProgress, payload: Payload) -> None:
    params = _attempt(
        event,
        "running",
        progress=event.progress,
        progress_message=event.message,
        progress_at=event.occurred_at,
    )
    await conn.execute(sql.STEP_PROGRESS, params)


async def _step_finished(
    conn: AsyncConnection, event: StepCompleted | StepFailed, payload: Payload, *, status: str
) -> None:
    params = _attempt(
        event,
        status,
        output=payload.get("output"),
        error=payload.get("error"),
        input=payload["input"],
        metrics=payload["metrics"],
        started_at=event.started_at,
        finished_at=event.occurred_at,
        worker=event.worker,
    )
    await conn.execute(sql.STEP_FINISHED, params)
    # A failed LLM call is billed too: the run's usage counts every attempt.
    await _add_usage(conn, event)


async def _step_completed(conn: AsyncConnection, event: StepCompleted, payload: Payload) -> None:
    await _step_finished(conn, event, payload, status="succeeded")


# The error type a runner reports when it stopped an attempt because its run was cancelled
# (conveyor.runtime.runner.Cancelled): the attempt was cancelled, it did not fail.
_CANCELLED_ERROR = "Cancelled"


async def _step_failed(conn: AsyncConnection, event: StepFailed, payload: Payload) -> None:
    if event.error.type == _CANCELLED_ERROR:
        await _step_finished(conn, event, payload, status="cancelled")
        return  # not an error to list: someone asked for it
    await _step_finished(conn, event, payload, status="failed")
    await _insert_error(
        conn, event=event, scope="step", step_id=event.step_id, attempt=event.attempt
    )


async def _step_skipped(conn: AsyncConnection, event: StepSkipped, payload: Payload) -> None:
    params = _attempt(
        event, "skipped", attempt=1, reason=event.reason, finished_at=event.occurred_at
    )
    await conn.execute(sql.STEP_SKIPPED, params)


async def _step_cancelled(conn: AsyncConnection, event: StepCancelled, payload: Payload) -> None:
    # Ranked below a result: a runner's answer for this attempt, read before or after, stands.
    params = _attempt(event, "cancelled", reason=event.reason, finished_at=event.occurred_at)
    await conn.execute(sql.STEP_CANCELLED, params)


async def _insert_error(
    conn: AsyncConnection,
    *,
    event: StepFailed | RunFailed,
    scope: str,
    step_id: str | None,
    attempt: int | None,
) -> None:
    await conn.execute(
        sql.ERROR,
        {
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
        },
    )


# --- pipelines and dead letters --------------------------------------------------------


async def _pipeline_registered(
    conn: AsyncConnection, event: PipelineRegistered, payload: Payload
) -> None:
    params = {
        "name": event.name,
        "version": event.version,
        "digest": event.digest,
        "spec": payload["spec"],
        "registered_at": event.occurred_at,
    }
    await conn.execute(sql.PIPELINE, params)


async def _schedule_updated(
    conn: AsyncConnection, event: ScheduleUpdated, payload: Payload
) -> None:
    params = {
        "name": event.name,
        "paused": event.paused,
        "changed_at": event.occurred_at,
        "changed_by": event.updated_by,
    }
    await conn.execute(sql.SCHEDULE, params)


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


async def _dead_letter(conn: AsyncConnection, event: DeadLetter, payload: Payload) -> None:
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
    await conn.execute(sql.DEAD_LETTER, params)
    run_id, pipeline = _subject_of(event)
    message, _, details = event.reason.partition("\n")
    await conn.execute(
        sql.ERROR,
        {
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
        },
    )


# CancelRun, ResumeRun, RetryRun, GateDecision and StepRetrying are kept in the log only.
_PROJECTIONS: dict[type[Event], _Projection] = {
    RunQueued: _run_queued,
    RunStarted: _run_started,
    RunParked: _run_parked,
    RunResumed: _run_resumed,
    RunCompleted: _run_completed,
    RunFailed: _run_failed,
    RunCancelled: _run_cancelled,
    RunRetried: _run_retried,
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
