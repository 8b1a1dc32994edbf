"""Every statement the projection runs, built once at import with bind parameters.

Building SQLAlchemy expressions for each event cost more than the database work itself;
built once, each statement is compiled once and its SQL stays in psycopg's query cache.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    ColumnElement,
    Table,
    Text,
    bindparam,
    case,
    cast,
    column,
    exists,
    func,
    literal_column,
    null,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, Insert, insert

from conveyor.run_recorder._merge import merge_statement
from conveyor.run_recorder.tables import (
    dead_letters,
    deleted_runs,
    errors,
    event_log,
    pipelines,
    runs,
    schedules,
    step_attempts,
)

__all__ = [
    "ADD_USAGE",
    "DEAD_LETTER",
    "ERROR",
    "FILL_ERROR_PIPELINE",
    "LATEST_LIVE_RUN_EVENT",
    "LOG",
    "PIPELINE",
    "RUN_CANCELLED",
    "RUN_COMPLETED",
    "RUN_FAILED",
    "RUN_FOR_RETRY",
    "RUN_QUEUED",
    "RUN_REOPENED",
    "RUN_RETRIED",
    "RUN_RETRY_COUNTED",
    "RUN_RETRY_PLACEHOLDER",
    "RUN_STARTED",
    "RUN_STATUS",
    "SCHEDULE",
    "STEP_CANCELLED",
    "STEP_FINISHED",
    "STEP_PROGRESS",
    "STEP_SCHEDULED",
    "STEP_SKIPPED",
    "STEP_STARTED",
]


def _params(table: Table, *names: str) -> dict[str, Any]:
    return {n: bindparam(n, type_=table.c[n].type) for n in names}


# A batch's events as one JSON array, an object per event with a member per column (made
# by the projection around the JSON text of each event: nothing re-serialised, one
# parameter), numbered in the order given.
_batch = (
    func.jsonb_array_elements(cast(bindparam("batch", type_=Text), JSONB))
    .table_valued(column("event", JSONB), with_ordinality="ord")
    .render_derived(name="batch")
)
_LOGGED = ("event_id", "type", "topic", "partition", "offset", "run_id", "occurred_at", "trace_id")


def _member(name: str, *, json: bool = False) -> ColumnElement[Any]:
    """The event's member ``name``, as text (as JSON with ``json``); the name in the SQL."""
    op = "->" if json else "->>"
    return _batch.c.event.op(op, return_type=JSONB if json else Text)(literal_column(f"'{name}'"))


_logged = {n: cast(_member(n), event_log.c[n].type) for n in _LOGGED}
# One statement logs a whole batch; what it returns is the ids it logged. Nothing is logged
# (nor projected) about a deleted run: a late event must not recreate it. The rows go in in
# the batch's order, so ``seq`` numbers them as logging them one by one would, and of two
# copies of one event in a batch (a redelivery) the first is logged, the second conflicts.
LOG = (
    insert(event_log)
    .from_select(
        [*_LOGGED, "payload"],
        select(*_logged.values(), _member("payload", json=True))
        .where(~exists().where(deleted_runs.c.run_id == _logged["run_id"]))
        .order_by(_batch.c.ord),
    )
    .on_conflict_do_nothing(index_elements=[event_log.c.event_id])
    .returning(event_log.c.event_id)
)


def _run_merge(
    *values: str, overwrite: tuple[str, ...] = (), outcome: tuple[str, ...] = ()
) -> Insert:
    return merge_statement(
        runs,
        rank="run_rank",
        key=("id",),
        values=values,
        overwrite=overwrite,
        outcome=outcome,
        on_insert=("requested_at",),
        fence="retried_at",
    )


# How a run ended, set whole by the event that ended it (null included): a re-run's success
# does not keep the first run's error.
_OUTCOME = ("output", "error", "finished_at")

RUN_QUEUED = _run_merge(
    "pipeline", "version", "input", "idempotency_key", "requested_by", overwrite=("requested_at",)
)
RUN_STARTED = _run_merge("pipeline", "version", "started_at")
RUN_STATUS = _run_merge()
RUN_COMPLETED = _run_merge(outcome=_OUTCOME)
RUN_FAILED = _run_merge(outcome=_OUTCOME)
RUN_CANCELLED = _run_merge(outcome=_OUTCOME)

# RunRetried: read-modify-write under the row lock (see projection._run_retried).
RUN_RETRY_PLACEHOLDER = (
    insert(runs)
    .values(_params(runs, "id", "requested_at", "status", "status_at"))
    .on_conflict_do_nothing(index_elements=[runs.c.id])
)
RUN_FOR_RETRY = (
    select(runs.c.status, runs.c.status_at, runs.c.retried_at)
    .where(runs.c.id == bindparam("id"))
    .with_for_update()
)
_run_status_events = ("RunStarted", "RunParked", "RunResumed")
LATEST_LIVE_RUN_EVENT = (
    select(event_log.c.type, event_log.c.occurred_at)
    .where(
        event_log.c.run_id == bindparam("id"),
        event_log.c.type.in_(_run_status_events),
        event_log.c.occurred_at > bindparam("after", type_=runs.c.status_at.type),
    )
    .order_by(event_log.c.occurred_at.desc(), event_log.c.seq.desc())
    .limit(1)
)
RUN_RETRY_COUNTED = (
    update(runs)
    .where(runs.c.id == bindparam("run"))
    .values(retries=runs.c.retries + 1, updated_at=func.now())
)


def _retried(**values: Any) -> Any:
    """The run's counter and fence moved to this retry, its input replaced by the re-run's.
    (Parameters are named ``new_*``: an UPDATE's own column names are reserved.)"""
    return (
        update(runs)
        .where(runs.c.id == bindparam("run"))
        .values(
            retries=runs.c.retries + 1,
            retried_at=bindparam("new_retried_at", type_=runs.c.retried_at.type),
            input=bindparam("new_input", type_=runs.c.input.type),
            updated_at=func.now(),
            **values,
        )
    )


RUN_RETRIED = _retried()
RUN_REOPENED = _retried(
    status=bindparam("new_status", type_=runs.c.status.type),
    status_at=bindparam("new_status_at", type_=runs.c.status_at.type),
    output=null(),
    error=null(),
    finished_at=null(),
)

FILL_ERROR_PIPELINE = (
    update(errors)
    .where(errors.c.run_id == bindparam("for_run"), errors.c.pipeline.is_(None))
    .values(pipeline=bindparam("run_pipeline"))
)

_usage = insert(runs).values(_params(runs, "id", "requested_at", "tokens", "cost"))
ADD_USAGE = _usage.on_conflict_do_update(
    index_elements=[runs.c.id],
    set_={
        "tokens": runs.c.tokens + _usage.excluded.tokens,
        "cost": runs.c.cost + _usage.excluded.cost,
        "updated_at": func.now(),
    },
)

_ATTEMPT_KEY = ("run_id", "step_id", "attempt", "item_index")


def _attempt_merge(*values: str, latest: tuple[str, ...] = ()) -> Insert:
    return merge_statement(
        step_attempts,
        rank="attempt_rank",
        key=_ATTEMPT_KEY,
        values=values,
        latest=latest,
        latest_at="progress_at" if latest else None,
    )


STEP_SCHEDULED = _attempt_merge("kind", "input", "scheduled_at")
STEP_STARTED = _attempt_merge("kind", "scheduled_at", "started_at", "worker")
STEP_PROGRESS = _attempt_merge(latest=("progress", "progress_message", "progress_at"))
STEP_FINISHED = _attempt_merge(
    "kind",
    "scheduled_at",
    "output",
    "error",
    "input",
    "metrics",
    "started_at",
    "finished_at",
    "worker",
)
STEP_SKIPPED = _attempt_merge("reason", "finished_at")
STEP_CANCELLED = STEP_SKIPPED  # the same shape: why, and when

_pipeline_of_run = select(runs.c.pipeline).where(runs.c.id == bindparam("run_id")).scalar_subquery()
ERROR = (
    insert(errors)
    .values(
        _params(
            errors,
            "event_id",
            "run_id",
            "step_id",
            "attempt",
            "scope",
            "type",
            "message",
            "traceback",
            "retryable",
            "occurred_at",
        )
        | {"pipeline": func.coalesce(bindparam("pipeline", type_=Text), _pipeline_of_run)}
    )
    .on_conflict_do_nothing(index_elements=[errors.c.event_id])
)

PIPELINE = (
    insert(pipelines)
    .values(_params(pipelines, "name", "version", "digest", "spec", "registered_at"))
    .on_conflict_do_nothing(index_elements=[pipelines.c.name, pipelines.c.version])
)

DEAD_LETTER = (
    insert(dead_letters)
    .values(
        _params(
            dead_letters,
            "event_id",
            "source_topic",
            "partition",
            "offset",
            "consumer_group",
            "reason",
            "key_b64",
            "value_b64",
            "headers",
            "occurred_at",
        )
    )
    .on_conflict_do_nothing(index_elements=[dead_letters.c.event_id])
)

_schedule = insert(schedules).values(
    _params(schedules, "name", "paused", "changed_at", "changed_by")
)
_schedule_newer = _schedule.excluded.changed_at >= schedules.c.changed_at
SCHEDULE = _schedule.on_conflict_do_update(
    index_elements=[schedules.c.name],
    set_={
        name: case((_schedule_newer, _schedule.excluded[name]), else_=schedules.c[name])
        for name in ("paused", "changed_at", "changed_by")
    },
)
