"""Deleted runs: a tombstone per run deleted through ``DELETE /runs/{id}``.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deleted_runs",
        sa.Column("run_id", sa.Uuid, primary_key=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deleted_by", sa.Text),
        schema="recorder",
    )


def downgrade() -> None:
    op.drop_table("deleted_runs", schema="recorder")
