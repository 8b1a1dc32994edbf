"""Alembic environment: the connection and schema come from ``conveyor.runtime.upgrade_schema``."""

from conveyor.run_recorder.tables import metadata
from conveyor.runtime import run_alembic_env

run_alembic_env(metadata)
