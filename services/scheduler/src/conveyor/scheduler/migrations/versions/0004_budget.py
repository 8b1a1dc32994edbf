"""Per-run spending, for the budget cap of pipelines that declare one.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

S = "scheduler"


def upgrade() -> None:
    op.add_column("runs", sa.Column("cost", sa.Float, nullable=False, server_default="0"), schema=S)
    op.add_column(
        "runs", sa.Column("budget_grants", sa.Integer, nullable=False, server_default="1"), schema=S
    )


def downgrade() -> None:
    op.drop_column("runs", "budget_grants", schema=S)
    op.drop_column("runs", "cost", schema=S)
