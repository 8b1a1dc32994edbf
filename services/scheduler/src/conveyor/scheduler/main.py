"""Composition root of the scheduler: settings, tracing, broker, database, outbox relay,
retry timers, the Kafka router and the control API."""

from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from faststream import FastStream
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.contracts import KIND_CONFIGS
from conveyor.contracts.pipeline import Duration
from conveyor.runtime import (
    ConsumerGuard,
    DatabaseSettings,
    KafkaSettings,
    OutboxRelay,
    create_broker,
    create_db_engine,
    create_tracer_provider,
    ensure_topics,
    run_service,
    upgrade_schema,
)
from conveyor.scheduler import tables
from conveyor.scheduler.api import create_api
from conveyor.scheduler.cron import CronRunner
from conveyor.scheduler.cron_api import cron_router
from conveyor.scheduler.handlers import create_router
from conveyor.scheduler.recovery import recover_lost_dispatches
from conveyor.scheduler.scheduling import Scheduler

__all__ = [
    "ApiSettings",
    "SchedulerService",
    "SchedulerSettings",
    "create_app",
    "create_service",
    "main",
]

MIGRATIONS = Path(__file__).parent / "migrations"


class ApiSettings(BaseSettings):
    """``CONVEYOR_API_HOST`` / ``CONVEYOR_API_PORT``; port 0 turns the API off (a replica)."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_API_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8701


class SchedulerSettings(BaseSettings):
    """``CONVEYOR_SCHEDULER_*``."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_SCHEDULER_", extra="ignore")

    idempotency_window: Duration = 86400.0
    """How long an idempotency key maps to its run (seconds, or text like 24h)."""
    deadline_grace: Duration = 30.0
    """Added to twice a step's timeout before the watchdog dispatches it again."""


@dataclass
class SchedulerService:
    app: FastStream
    api: FastAPI
    scheduler: Scheduler
    settings: ApiSettings


def create_service() -> SchedulerService:
    kafka = KafkaSettings()
    database = DatabaseSettings()
    api_settings = ApiSettings()
    settings = SchedulerSettings()
    tracer_provider = create_tracer_provider("scheduler")
    broker = create_broker(kafka, service="scheduler", tracer_provider=tracer_provider)
    engine = create_db_engine(database)
    relay = OutboxRelay(
        engine=engine,
        table=tables.outbox,
        broker=broker,
        lock_key=zlib.crc32(b"conveyor-scheduler-outbox"),
        bootstrap=kafka.bootstrap,
        dead_letters=kafka.topics.dlq,
    )
    scheduler = Scheduler(
        engine=engine,
        topics=kafka.topics,
        relay=relay,
        idempotency_window_s=settings.idempotency_window,
        deadline_grace_s=settings.deadline_grace,
    )
    cron = CronRunner(scheduler)
    guard = ConsumerGuard(
        broker=broker,
        topics=kafka.topics,
        group=kafka.group("scheduler"),
        tracer_provider=tracer_provider,
    )
    broker.include_router(create_router(kafka=kafka, scheduler=scheduler, guard=guard))

    async def migrate_and_create_topics() -> None:
        await asyncio.to_thread(
            upgrade_schema, database.url, migrations=MIGRATIONS, schema="scheduler"
        )
        topics = kafka.topics
        await ensure_topics(kafka, [*topics.core(), *(topics.ready(k) for k in KIND_CONFIGS)])
        await recover_lost_dispatches(scheduler, kafka)

    async def start_background() -> None:
        await relay.start()
        await scheduler.start_timers()
        await cron.start()

    async def stop_background() -> None:
        await cron.stop()
        await scheduler.stop_timers()
        await relay.stop()

    async def dispose() -> None:
        await engine.dispose()

    app = FastStream(
        broker,
        on_startup=[migrate_and_create_topics],
        after_startup=[start_background],
        on_shutdown=[stop_background],
        after_shutdown=[dispose],
    )
    api = create_api(scheduler)
    api.include_router(cron_router(scheduler, runner=cron))
    return SchedulerService(app=app, api=api, scheduler=scheduler, settings=api_settings)


def create_app() -> FastStream:
    """The FastStream app alone, for ``faststream docs gen --factory``."""
    return create_service().app


def main() -> None:
    service = create_service()
    run_service(
        service.app,
        name="scheduler",
        http=service.api,
        host=service.settings.host,
        port=service.settings.port,
    )
