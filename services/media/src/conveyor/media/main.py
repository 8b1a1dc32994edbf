"""Composition root of the media runner: settings, telemetry, broker, executors, router."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from faststream import FastStream
from faststream.kafka import KafkaBroker

from conveyor.media.handlers import GROUP, create_router
from conveyor.media.probe import MediaProber, find_ffmpeg, find_ffprobe
from conveyor.media.settings import MediaSettings
from conveyor.runtime import (
    ConsumerGuard,
    KafkaSettings,
    create_broker,
    create_tracer_provider,
    ensure_topics,
    run_service,
)
from conveyor.runtime.runner import (
    RunnerSettings,
    StepDispatcher,
    StepHarness,
    require_kinds,
    runner_topics,
)

__all__ = ["SERVICE", "MediaService", "create_app", "create_service", "main"]

SERVICE = "media"

log = logging.getLogger("conveyor.media")


@dataclass(frozen=True)
class MediaService:
    app: FastStream
    broker: KafkaBroker
    harness: StepHarness
    dispatcher: StepDispatcher
    prober: MediaProber


def create_service(
    *,
    kafka: KafkaSettings | None = None,
    settings: MediaSettings | None = None,
    runner: RunnerSettings | None = None,
) -> MediaService:
    kafka = kafka or KafkaSettings()
    settings = settings or MediaSettings()
    runner = runner or RunnerSettings()
    tracer_provider = create_tracer_provider(SERVICE)
    broker = create_broker(kafka, service=SERVICE, tracer_provider=tracer_provider)
    prober = MediaProber(
        root=settings.root,
        ffprobe=find_ffprobe(settings.ffprobe),
        ffmpeg=find_ffmpeg(settings.ffmpeg),
        timeout_s=settings.probe_timeout_s,
    )
    harness = StepHarness(broker=broker, topics=kafka.topics, executors={"media.probe": prober})
    require_kinds(SERVICE, harness)
    guard = ConsumerGuard(broker=broker, topics=kafka.topics, group=kafka.group(GROUP))
    dispatcher = StepDispatcher(harness=harness, guard=guard, settings=runner)
    broker.include_router(create_router(kafka=kafka, dispatcher=dispatcher))

    topics = runner_topics(kafka, harness)

    async def start() -> None:
        prober.root.mkdir(parents=True, exist_ok=True)
        log.info("media root %s, probing with %s", prober.root, prober.mode)
        await ensure_topics(kafka, topics)

    async def close() -> None:
        tracer_provider.shutdown()

    app = FastStream(
        broker,
        on_startup=[start],
        # Before the broker stops: running steps finish and are committed, then it leaves.
        on_shutdown=[dispatcher.drain],
        after_shutdown=[close],
    )
    return MediaService(
        app=app, broker=broker, harness=harness, dispatcher=dispatcher, prober=prober
    )


def create_app() -> FastStream:
    """For ``faststream run|docs gen --factory conveyor.media.main:create_app``."""
    return create_service().app


def main() -> None:
    run_service(create_app(), name=SERVICE)
