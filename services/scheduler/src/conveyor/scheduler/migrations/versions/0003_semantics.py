"""Pipeline semantics: timer kinds and fan-out items, per-run config edits, the
idempotency window, and the run queue of pipelines with a concurrency limit.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

S = "scheduler"


def upgrade() -> None:
    op.add_column(
        "timers", sa.Column("kind", sa.Text, nullable=False, server_default="retry"), schema=S
    )
    op.add_column("timers", sa.Column("item_index", sa.Integer), schema=S)
    op.add_column(
        "runs",
        sa.Column("overrides", pg.JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        schema=S,
    )
    # The key now lives in idempotency_keys, with an expiry: after the window the same key
    # starts a new run, which a unique constraint on runs would forbid.
    op.drop_constraint("runs_idempotency_key", "runs", schema=S)
    op.create_index("runs_queue", "runs", ["pipeline", "status", "requested_at"], schema=S)
    op.create_table(
        "idempotency_keys",
        sa.Column("pipeline", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        schema=S,
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys", schema=S)
    op.drop_index("runs_queue", "runs", schema=S)
    op.create_unique_constraint(
        "runs_idempotency_key", "runs", ["pipeline", "idempotency_key"], schema=S
    )
    op.drop_column("runs", "overrides", schema=S)
    op.drop_column("timers", "item_index", schema=S)
    op.drop_column("timers", "kind", schema=S)
