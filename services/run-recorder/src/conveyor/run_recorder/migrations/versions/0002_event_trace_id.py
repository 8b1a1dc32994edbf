"""The trace id each event travelled under, so a run's history links to its trace.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("event_log", sa.Column("trace_id", sa.Text), schema="recorder")


def downgrade() -> None:
    op.drop_column("event_log", "trace_id", schema="recorder")
