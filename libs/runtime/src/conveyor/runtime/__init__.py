"""What every Conveyor service shares: settings, broker, telemetry, database, outbox, DLQ.

No business logic lives here.
"""

from conveyor.runtime.broker import consumer_options, create_broker, ensure_topics, prompt_batches
from conveyor.runtime.database import create_db_engine, run_alembic_env, upgrade_schema
from conveyor.runtime.guard import ConsumerGuard, Undeliverable, record_event_id
from conveyor.runtime.outbox import (
    OutboxMessage,
    OutboxRelay,
    Staged,
    outbox_rows,
    outbox_table,
    stage,
)
from conveyor.runtime.runner import Secrets, StepError, StepHarness, StepOutput
from conveyor.runtime.service import run_service
from conveyor.runtime.settings import (
    DatabaseSettings,
    KafkaSettings,
    TelemetrySettings,
    database_url,
)
from conveyor.runtime.telemetry import create_tracer_provider

__all__ = [
    "ConsumerGuard",
    "DatabaseSettings",
    "KafkaSettings",
    "OutboxMessage",
    "OutboxRelay",
    "Secrets",
    "Staged",
    "StepError",
    "StepHarness",
    "StepOutput",
    "TelemetrySettings",
    "Undeliverable",
    "consumer_options",
    "create_broker",
    "create_db_engine",
    "create_tracer_provider",
    "database_url",
    "ensure_topics",
    "outbox_rows",
    "outbox_table",
    "prompt_batches",
    "record_event_id",
    "run_alembic_env",
    "run_service",
    "stage",
    "upgrade_schema",
]
