"""Composition root of the media runner: settings, telemetry, broker, executors, router."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from faststream import FastStream
from faststream.kafka import KafkaBroker

from conveyor.contracts import Event, RunDeleted
from conveyor.media._workdir import sweep_workdirs
from conveyor.media.artifacts import ArtifactStore, create_store
from conveyor.media.executors import MediaSteps
from conveyor.media.handlers import create_router
from conveyor.media.probe import MediaProber, find_ffmpeg, find_ffprobe
from conveyor.media.settings import MediaSettings
from conveyor.media.sources import SourceResolver
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
    store: ArtifactStore


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
    store = create_store(settings)
    resolver = SourceResolver(
        root=settings.root,
        store=store,
        max_download_bytes=settings.max_download_bytes,
        http_timeout_s=settings.download_timeout_s,
        allow_private_urls=settings.allow_private_urls,
    )
    work_dir = (settings.work_dir or settings.artifact_dir / "work").resolve()
    ffmpeg = find_ffmpeg(settings.ffmpeg)
    prober = MediaProber(
        root=settings.root,
        ffprobe=find_ffprobe(settings.ffprobe),
        ffmpeg=ffmpeg,
        timeout_s=settings.probe_timeout_s,
        resolver=resolver,
        work_dir=work_dir,
    )
    steps = MediaSteps(
        prober=prober,
        resolver=resolver,
        store=store,
        ffmpeg=ffmpeg,
        work_dir=work_dir,
        timeout_s=settings.ffmpeg_timeout_s,
    )

    async def prepare_root() -> None:
        prober.root.mkdir(parents=True, exist_ok=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        swept = await asyncio.to_thread(sweep_workdirs, work_dir)
        if swept:
            log.info("removed %d scratch directories left by steps cut short", swept)
        log.info("media root %s, probing with %s, ffmpeg %s", prober.root, prober.mode, ffmpeg)

    async def prepare_store() -> None:
        await store.prepare()
        log.info("artifacts in %r", store)

    async def on_control(event: Event) -> None:
        # Every media process sees RunDeleted (no consumer group) and deletes: the second
        # deletion finds nothing left. One that was down runs `conveyor artifacts gc`.
        if isinstance(event, RunDeleted):
            deleted = await store.delete_run(event.run_id)
            log.info("run %s deleted: %d artifact(s) deleted with it", event.run_id, deleted)

    async def close() -> None:
        tracer_provider.shutdown()

    wired = create_runner_app(
        service=SERVICE,
        kafka=kafka,
        runner=runner,
        broker=broker,
        executors={"media.probe": prober, **steps.executors()},
        create_router=create_router,
        tracer_provider=tracer_provider,
        on_startup=[prepare_root, prepare_store],
        after_shutdown=[close],
        on_control=[on_control],
    )
    app, harness, dispatcher = wired.app, wired.harness, wired.dispatcher
    return MediaService(
        app=app,
        broker=broker,
        harness=harness,
        dispatcher=dispatcher,
        prober=prober,
        store=store,
    )


def create_app() -> FastStream:
    """For ``faststream run|docs gen --factory conveyor.media.main:create_app``."""
    return create_service().app


def main() -> None:
    run_service(create_app(), name=SERVICE)
