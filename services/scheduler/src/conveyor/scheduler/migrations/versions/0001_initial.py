"""Scheduler state: pipelines, runs, inbox, timers, outbox.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

S = "scheduler"


def upgrade() -> None:
    now = sa.text("now()")
    op.create_table(
        "pipelines",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("digest", sa.Text, nullable=False),
        sa.Column("spec", pg.JSONB, nullable=False),
        sa.Column("source_file", sa.Text),
        sa.Column("registered_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        schema=S,
    )
    op.create_table(
        "runs",
        sa.Column("id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("pipeline", sa.Text, nullable=False),
        sa.Column("version", sa.Integer),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("input", pg.JSONB, nullable=False),
        sa.Column("output", pg.JSONB),
        sa.Column("error", pg.JSONB),
        sa.Column("steps", pg.JSONB, nullable=False),
        sa.Column("idempotency_key", sa.Text),
        sa.Column("requested_event_id", pg.UUID(as_uuid=True)),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.UniqueConstraint("pipeline", "idempotency_key", name="runs_idempotency_key"),
        schema=S,
    )
    op.create_index("runs_status", "runs", ["status"], schema=S)
    op.create_table(
        "inbox",
        sa.Column("event_id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("received_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        schema=S,
    )
    op.create_table(
        "timers",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("step_id", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        schema=S,
    )
    op.create_index("timers_due_at", "timers", ["due_at"], schema=S)
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("key", sa.Text),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("headers", pg.JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        schema=S,
    )


def downgrade() -> None:
    for table in ("outbox", "timers", "inbox", "runs", "pipelines"):
        op.drop_table(table, schema=S)
