"""Cron schedules: one row per pipeline whose latest version has a ``schedule``.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

S = "scheduler"


def upgrade() -> None:
    now = sa.text("now()")
    op.create_table(
        "schedules",
        sa.Column("pipeline", sa.Text, primary_key=True),
        sa.Column("cron", sa.Text, nullable=False),
        sa.Column("timezone", sa.Text, nullable=False),
        sa.Column("catch_up", sa.Text, nullable=False),
        sa.Column("input", pg.JSONB, nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("next_fire_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_fired_at", sa.DateTime(timezone=True)),
        sa.Column("last_tick", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        schema=S,
    )
    # The firing loop's question: which unpaused schedules are due?
    op.create_index(
        "schedules_due",
        "schedules",
        ["next_fire_at"],
        schema=S,
        postgresql_where=sa.text("NOT paused"),
    )


def downgrade() -> None:
    op.drop_table("schedules", schema=S)
