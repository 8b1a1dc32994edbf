from conveyor.runtime import run_alembic_env
from conveyor.scheduler.tables import metadata

run_alembic_env(metadata)
