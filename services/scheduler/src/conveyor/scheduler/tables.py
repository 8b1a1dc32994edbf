"""The scheduler's own state, in PostgreSQL schema ``scheduler``.

A run's step states live as JSONB on the run row: every event about a run is handled
under that row's lock, in one transaction with the inbox entry and the outbox rows.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from conveyor.runtime import outbox_table

__all__ = [
    "idempotency_keys",
    "inbox",
    "metadata",
    "outbox",
    "pipelines",
    "runs",
    "schedules",
    "timers",
]

metadata = MetaData(schema="scheduler")

pipelines = Table(
    "pipelines",
    metadata,
    Column("name", Text, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("digest", Text, nullable=False),
    Column("spec", JSONB, nullable=False),
    Column("source_file", Text),
    Column("registered_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
)

runs = Table(
    "runs",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("pipeline", Text, nullable=False),
    Column("version", Integer),
    Column("status", Text, nullable=False),
    Column("input", JSONB, nullable=False),
    Column("output", JSONB),
    Column("error", JSONB),
    Column("steps", JSONB, nullable=False),
    Column("overrides", JSONB, nullable=False, server_default="{}"),
    Column("cost", Float, nullable=False, server_default="0"),
    Column("budget_grants", Integer, nullable=False, server_default="1"),
    Column("idempotency_key", Text),
    Column("requested_event_id", UUID(as_uuid=True)),
    Column("requested_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    Index("runs_status", "status"),
    Index("runs_queue", "pipeline", "status", "requested_at"),
)

inbox = Table(
    "inbox",
    metadata,
    Column("event_id", UUID(as_uuid=True), primary_key=True),
    Column("received_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
)

timers = Table(
    "timers",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("run_id", UUID(as_uuid=True), nullable=False),
    Column("step_id", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("item_index", Integer),
    Column("kind", Text, nullable=False, server_default="retry"),
    Column("due_at", DateTime(timezone=True), nullable=False),
    Index("timers_due_at", "due_at"),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("pipeline", Text, primary_key=True),
    Column("key", Text, primary_key=True),
    Column("run_id", UUID(as_uuid=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)

outbox = outbox_table(metadata)

# --- cron schedules (conveyor.scheduler.cron) ----------------------------------------------

schedules = Table(
    "schedules",
    metadata,
    Column("pipeline", Text, primary_key=True),
    Column("cron", Text, nullable=False),
    Column("timezone", Text, nullable=False),
    Column("catch_up", Text, nullable=False),
    Column("input", JSONB, nullable=False),
    Column("paused", Boolean, nullable=False, server_default=false()),
    Column("next_fire_at", DateTime(timezone=True), nullable=False),
    Column("last_fired_at", DateTime(timezone=True)),
    Column("last_tick", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    Index("schedules_due", "next_fire_at", postgresql_where=text("NOT paused")),
)
