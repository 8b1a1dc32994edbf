"""Composition root of the media runner: settings, telemetry, broker, executors, router."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from faststream import FastStream
from faststream.kafka import KafkaBroker

from conveyor.media.handlers import create_router
from conveyor.media.probe import MediaProber, find_ffmpeg, find_ffprobe
from conveyor.media.settings import MediaSettings
from conveyor.runtime import (
    KafkaSettings,
    create_broker,
    create_tracer_provider,
    run_service,
)
from conveyor.runtime.runner import (
    RunnerSettings,
    StepDispatcher,
    StepHarness,
    create_runner_app,
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

    async def prepare_root() -> None:
        prober.root.mkdir(parents=True, exist_ok=True)
        log.info("media root %s, probing with %s", prober.root, prober.mode)

    async def close() -> None:
        tracer_provider.shutdown()

    wired = create_runner_app(
        service=SERVICE,
        kafka=kafka,
        runner=runner,
        broker=broker,
        executors={"media.probe": prober},
        create_router=create_router,
        on_startup=[prepare_root],
        after_shutdown=[close],
    )
    app, harness, dispatcher = wired.app, wired.harness, wired.dispatcher
    return MediaService(
        app=app, broker=broker, harness=harness, dispatcher=dispatcher, prober=prober
    )


def create_app() -> FastStream:
    """For ``faststream run|docs gen --factory conveyor.media.main:create_app``."""
    return create_service().app


def main() -> None:
    run_service(create_app(), name=SERVICE)
