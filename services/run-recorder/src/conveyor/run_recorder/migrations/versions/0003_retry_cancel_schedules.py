"""Retried runs, cancelled attempts below real results, and paused schedules.

- ``runs.retries`` counts a run's RunRetried events; ``runs.retried_at`` is the latest one's
  time, the fence that keeps events from before a retry from setting the run's status.
- ``attempt_rank``: ``cancelled`` now ranks below ``succeeded``/``failed``/``skipped``, so a
  result the runner reported is never overwritten by the cancellation of its attempt,
  whichever of the two is read first.
- ``schedules``: whether a pipeline's cron schedule is paused (ScheduleUpdated).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = "recorder"

_ATTEMPT_RANK = """
CREATE OR REPLACE FUNCTION {schema}.attempt_rank(status text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE status
        WHEN 'scheduled' THEN 0
        WHEN 'running' THEN 1
        WHEN 'cancelled' THEN 2
        WHEN 'succeeded' THEN {top} WHEN 'failed' THEN {top} WHEN 'skipped' THEN {top}
        ELSE -1 END
$$
"""


def upgrade() -> None:
    op.add_column(
        "runs",
        sa.Column("retries", sa.Integer, nullable=False, server_default=sa.text("0")),
        schema=SCHEMA,
    )
    op.add_column("runs", sa.Column("retried_at", sa.DateTime(timezone=True)), schema=SCHEMA)
    op.execute(_ATTEMPT_RANK.format(schema=SCHEMA, top=3))
    op.create_table(
        "schedules",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("changed_by", sa.Text),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("schedules", schema=SCHEMA)
    # 0001's ranks: cancelled equal to the other terminal statuses
    op.execute(_ATTEMPT_RANK.format(schema=SCHEMA, top=2))
    op.drop_column("runs", "retried_at", schema=SCHEMA)
    op.drop_column("runs", "retries", schema=SCHEMA)
