"""Composition root of the run recorder: settings, tracing, broker, router, database, API.

``create_service()`` builds everything and connects to nothing: the database is migrated
and the topics are created when the FastStream app starts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from faststream import FastStream
from faststream.kafka import KafkaBroker
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contracts import RunDeleted
from conveyor.run_recorder.api import create_api
from conveyor.run_recorder.handlers import create_router
from conveyor.run_recorder.tables import SCHEMA
from conveyor.runtime import (
    DatabaseSettings,
    KafkaSettings,
    create_broker,
    create_db_engine,
    create_tracer_provider,
    ensure_topics,
    run_service,
    upgrade_schema,
)

__all__ = [
    "MIGRATIONS",
    "RecorderService",
    "RecorderSettings",
    "create_app",
    "create_service",
    "main",
]

SERVICE = "run-recorder"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class RecorderSettings(BaseSettings):
    """``CONVEYOR_RECORDER_*``: where the HTTP API listens."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_RECORDER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)


@dataclass(frozen=True)
class RecorderService:
    """What ``main()`` runs, and what tests take apart."""

    app: FastStream
    http: FastAPI
    broker: KafkaBroker
    engine: AsyncEngine
    settings: RecorderSettings


def create_service(
    *,
    kafka: KafkaSettings | None = None,
    database: DatabaseSettings | None = None,
    recorder: RecorderSettings | None = None,
) -> RecorderService:
    """Settings not given are read from the environment."""
    kafka = kafka or KafkaSettings()
    database = database or DatabaseSettings()  # the url comes from the environment
    recorder = recorder or RecorderSettings()
    tracer_provider = create_tracer_provider(SERVICE)
    broker = create_broker(kafka, service=SERVICE, tracer_provider=tracer_provider)
    engine = create_db_engine(database)
    broker.include_router(
        create_router(broker=broker, kafka=kafka, engine=engine, tracer_provider=tracer_provider)
    )

    async def prepare() -> None:
        await asyncio.to_thread(upgrade_schema, database.url, migrations=MIGRATIONS, schema=SCHEMA)
        await ensure_topics(kafka, kafka.topics.core())

    async def release() -> None:
        # after_shutdown, not on_shutdown: FastStream runs on_shutdown hooks before it stops
        # the broker, while a message may still be in hand.
        await engine.dispose()
        tracer_provider.shutdown()

    async def announce(event: RunDeleted) -> None:
        await broker.publish(
            event.model_dump_json().encode(),
            kafka.topics.runs_control,
            key=str(event.run_id).encode(),
            headers={"content-type": "application/json"},
        )

    app = FastStream(broker, on_startup=[prepare], after_shutdown=[release])
    return RecorderService(
        app=app,
        http=create_api(engine, announce=announce),
        broker=broker,
        engine=engine,
        settings=recorder,
    )


def create_app() -> FastStream:
    """The FastStream app alone: ``faststream docs gen conveyor.run_recorder.main:create_app
    --factory``."""
    return create_service().app


def _settings_problem(exc: ValidationError) -> str:
    """One line per bad setting, named as the environment variable a user sets."""
    settings = {cls.__name__: cls for cls in (KafkaSettings, DatabaseSettings, RecorderSettings)}
    cls = settings.get(exc.title)
    prefix = str(cls.model_config.get("env_prefix", "")) if cls else ""
    problems = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"])
        hint = cls.model_fields[field].description if cls and field in cls.model_fields else None
        problems.append(
            f"{(prefix + field).upper()}: {err['msg']}" + (f" ({hint})" if hint else "")
        )
    return "; ".join(problems)


def main() -> None:
    try:
        service = create_service()
    except ValidationError as exc:
        raise SystemExit(f"{SERVICE}: {_settings_problem(exc)}") from None
    run_service(
        service.app,
        name=SERVICE,
        http=service.http,
        host=service.settings.host,
        port=service.settings.port,
    )
