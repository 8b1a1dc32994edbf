"""Every statement the projection runs, built once at import with bind parameters.

Building SQLAlchemy expressions for each event cost more than the database work itself;
built once, each statement is compiled once and its SQL stays in psycopg's query cache.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table, Text, bindparam, cast, func, select, update
from sqlalchemy.dialects.postgresql import JSONB, Insert, insert

from conveyor.run_recorder._merge import merge_statement
from conveyor.run_recorder.tables import (
    dead_letters,
    errors,
    event_log,
    pipelines,
    runs,
    step_attempts,
)

__all__ = [
    "ADD_USAGE",
    "DEAD_LETTER",
    "ERROR",
    "FILL_ERROR_PIPELINE",
    "LOG",
    "PIPELINE",
    "RUN_CANCELLED",
    "RUN_COMPLETED",
    "RUN_FAILED",
    "RUN_QUEUED",
    "RUN_STARTED",
    "RUN_STATUS",
    "STEP_FINISHED",
    "STEP_PROGRESS",
    "STEP_SCHEDULED",
    "STEP_SKIPPED",
    "STEP_STARTED",
]


def _params(table: Table, *names: str) -> dict[str, Any]:
    return {n: bindparam(n, type_=table.c[n].type) for n in names}


LOG = (
    insert(event_log)
    .values(
        _params(
            event_log,
            "event_id",
            "type",
            "topic",
            "partition",
            "offset",
            "run_id",
            "occurred_at",
            "trace_id",
        )
        # JSON text made once by the projection, not re-serialised from a dict
        | {"payload": cast(bindparam("payload", type_=Text), JSONB)}
    )
    .on_conflict_do_nothing(index_elements=[event_log.c.event_id])
    .returning(event_log.c.event_id)
)


def _run_merge(*values: str, overwrite: tuple[str, ...] = ()) -> Insert:
    return merge_statement(
        runs,
        rank="run_rank",
        key=("id",),
        values=values,
        overwrite=overwrite,
        on_insert=("requested_at",),
    )


RUN_QUEUED = _run_merge(
    "pipeline", "version", "input", "idempotency_key", "requested_by", overwrite=("requested_at",)
)
RUN_STARTED = _run_merge("pipeline", "version", "started_at")
RUN_STATUS = _run_merge()
RUN_COMPLETED = _run_merge("output", "finished_at")
RUN_FAILED = _run_merge("error", "finished_at")
RUN_CANCELLED = _run_merge("finished_at")

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
STEP_STARTED = _attempt_merge("started_at", "worker")
STEP_PROGRESS = _attempt_merge(latest=("progress", "progress_message", "progress_at"))
STEP_FINISHED = _attempt_merge(
    "output", "error", "input", "metrics", "started_at", "finished_at", "worker"
)
STEP_SKIPPED = _attempt_merge("reason", "finished_at")

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
