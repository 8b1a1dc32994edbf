"""The recorder's read model, in PostgreSQL schema ``recorder``.

There are no foreign keys on purpose: events reach the recorder out of order across topics
(a StepCompleted can be read before its StepScheduled), so a row may refer to a run that is
not recorded yet. Every table can be rebuilt by replaying the stream into an empty schema.

``status_at`` on runs and attempts is the ``occurred_at`` of the event that set the status;
it breaks ties between statuses of the same rank (parked and running) so that the latest
event wins whatever order the two were read in. A run's ``retried_at`` is the time of its
latest RunRetried: the run was reopened then, and no event from before it can set the
run's status again (see ``_merge``).

The migrations under ``migrations/versions`` are written by hand and must match this file.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

__all__ = [
    "NO_ITEM",
    "SCHEMA",
    "dead_letters",
    "deleted_runs",
    "errors",
    "event_log",
    "metadata",
    "pipelines",
    "runs",
    "schedules",
    "step_attempts",
]

SCHEMA = "recorder"

# ``item_index`` is part of the attempts' primary key, which cannot hold NULL: a step that
# does not fan out is stored with -1 and shown as null.
NO_ITEM = -1

metadata = MetaData(schema=SCHEMA)


def _when(name: str, *, nullable: bool = True) -> Column[object]:
    return Column(name, DateTime(timezone=True), nullable=nullable)


def _json(name: str) -> Column[object]:
    # SQL NULL for Python None, so that COALESCE can tell "not known" from a value.
    return Column(name, JSONB(none_as_null=True))


event_log = Table(
    "event_log",
    metadata,
    Column("event_id", Uuid, primary_key=True),
    # Arrival order, to order events that carry the same ``occurred_at``.
    Column("seq", BigInteger, Identity(always=True), nullable=False),
    Column("type", Text, nullable=False),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("run_id", Uuid),
    _when("occurred_at", nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("payload", JSONB, nullable=False),
    # W3C trace id the event travelled under: every event of a run shares one.
    Column("trace_id", Text),
    Index("event_log_run", "run_id", "occurred_at", "seq"),
)

runs = Table(
    "runs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("pipeline", Text),
    Column("version", Integer),
    Column("status", Text, nullable=False, server_default=text("'queued'")),
    _when("status_at"),
    _json("input"),
    _json("output"),
    _json("error"),
    _when("requested_at", nullable=False),
    _when("started_at"),
    _when("finished_at"),
    Column("tokens", BigInteger, nullable=False, server_default=text("0")),
    Column("cost", Double, nullable=False, server_default=text("0")),
    Column("idempotency_key", Text),
    Column("requested_by", Text),
    Column("retries", Integer, nullable=False, server_default=text("0")),
    _when("retried_at"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("runs_newest", "requested_at", "id"),
    Index("runs_pipeline_newest", "pipeline", "requested_at", "id"),
    Index("runs_status_newest", "status", "requested_at", "id"),
)

step_attempts = Table(
    "step_attempts",
    metadata,
    Column("run_id", Uuid, primary_key=True),
    Column("step_id", Text, primary_key=True),
    Column("attempt", Integer, primary_key=True),
    Column("item_index", Integer, primary_key=True, server_default=text(str(NO_ITEM))),
    Column("status", Text, nullable=False),
    _when("status_at"),
    Column("kind", Text),
    _json("input"),
    _json("output"),
    _json("error"),
    _json("metrics"),
    Column("reason", Text),
    Column("progress", Double),
    Column("progress_message", Text),
    _when("progress_at"),
    Column("worker", Text),
    _when("scheduled_at"),
    _when("started_at"),
    _when("finished_at"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

errors = Table(
    "errors",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("event_id", Uuid, nullable=False, unique=True),
    Column("run_id", Uuid),
    Column("pipeline", Text),
    Column("step_id", Text),
    Column("attempt", Integer),
    Column("scope", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("traceback", Text),
    Column("retryable", Boolean, nullable=False, server_default=text("false")),
    _when("occurred_at", nullable=False),
    CheckConstraint("scope IN ('step', 'run', 'dead_letter')", name="errors_scope"),
    Index("errors_newest", "occurred_at", "id"),
    Index("errors_run", "run_id"),
    Index("errors_pipeline_newest", "pipeline", "occurred_at", "id"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("event_id", Uuid, primary_key=True),
    Column("source_topic", Text, nullable=False),
    Column("partition", Integer, nullable=False),
    Column("offset", BigInteger, nullable=False),
    Column("consumer_group", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("key_b64", Text),
    Column("value_b64", Text, nullable=False),
    Column("headers", JSONB, nullable=False),
    _when("occurred_at", nullable=False),
    Index("dead_letters_newest", "occurred_at", "event_id"),
)

pipelines = Table(
    "pipelines",
    metadata,
    Column("name", Text, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("digest", Text, nullable=False),
    Column("spec", JSONB, nullable=False),
    _when("registered_at", nullable=False),
)

# A pipeline's cron schedule, paused or not: the latest ScheduleUpdated by its time.
schedules = Table(
    "schedules",
    metadata,
    Column("name", Text, primary_key=True),
    Column("paused", Boolean, nullable=False),
    _when("changed_at", nullable=False),
    Column("changed_by", Text),
)

# Runs deleted through ``DELETE /runs/{id}``: their rows are gone, and any event about them
# read later (a late result, a replay of the stream) is dropped instead of recreating them.
deleted_runs = Table(
    "deleted_runs",
    metadata,
    Column("run_id", Uuid, primary_key=True),
    _when("deleted_at", nullable=False),
    Column("deleted_by", Text),
)
