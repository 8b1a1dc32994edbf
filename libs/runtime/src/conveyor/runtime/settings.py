"""Settings shared by every service: one pydantic-settings class, one env prefix, per concern.

Built inside each service's ``create_app()``, never at import time.
"""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.contracts import Topics

__all__ = ["DatabaseSettings", "KafkaSettings", "TelemetrySettings", "database_url"]


class KafkaSettings(BaseSettings):
    """``CONVEYOR_KAFKA_*``. Consumer timings default to what suits the embedded broker."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_KAFKA_", extra="ignore")

    bootstrap: str = "127.0.0.1:19092"
    topic_prefix: str = "conveyor"
    partitions: int = Field(default=6, ge=1)
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    # Tansu holds every fetch for the whole wait even when data is waiting (see README);
    # Apache Kafka answers as soon as data arrives, so a larger value costs nothing there.
    fetch_max_wait_ms: int = 5
    control_fetch_max_wait_ms: int = 100
    """For the rare control events (a cancel) that every runner process reads."""
    max_poll_records: int = 200
    history_fetch_max_wait_ms: int = Field(default=50, ge=1)
    """The recorder's fetch wait. It is off every run's critical path: a longer wait costs
    the history a few ms of lag, and saves the broker and the recorder most of their idle
    polling (the embedded broker answers each fetch only when the wait is over)."""
    batch_wait_ms: int = Field(default=200, ge=1)
    """How long a batch subscriber's idle poll lasts before its loop turns (to see whether
    it should stop). Records are handed over as soon as they arrive, whatever this is."""

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def group(self, name: str) -> str:
        return f"{self.topic_prefix}.{name}"


def database_url(url: str) -> str:
    """Accept ``postgresql://`` and friends; SQLAlchemy gets the psycopg 3 driver."""
    for prefix in (
        "postgresql+psycopg://",
        "postgresql+asyncpg://",
        "postgresql://",
        "postgres://",
    ):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"CONVEYOR_DATABASE_URL must be a PostgreSQL URL, got {url.split(':')[0]}://")


class DatabaseSettings(BaseSettings):
    """``CONVEYOR_DATABASE_URL``: required. ``conveyor up`` sets it to an embedded server."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_DATABASE_", extra="ignore")

    url: str = Field(
        description="PostgreSQL URL, e.g. postgresql://postgres@127.0.0.1:5432/conveyor "
        "(run services through `conveyor up` to get an embedded server)"
    )
    pool_size: int = 5
    pool_pre_ping: bool = False
    """Ping each connection on checkout. Off: it doubled the scheduler's cost per event,
    and a dead connection surfaces as an error the consumer guard retries anyway."""

    @field_validator("url")
    @classmethod
    def _normalise(cls, value: str) -> str:
        return database_url(value)


class TelemetrySettings(BaseSettings):
    """Standard OTel variables, plus ``CONVEYOR_TRACE_FILE`` (spans as JSON lines)."""

    model_config = SettingsConfigDict(extra="ignore")

    otel_exporter_otlp_endpoint: str | None = None
    conveyor_trace_file: str | None = None
