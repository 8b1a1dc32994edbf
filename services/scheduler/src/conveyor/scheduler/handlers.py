"""The scheduler's only subscriber: triggers, step results and control events.

One subscriber over three topics means one consumer-group join at start (each join costs
about a second on the embedded broker, and FastStream starts subscribers one by one). It
consumes in batches: what one poll returns is handled in one database transaction.
The publishers are declared for the AsyncAPI document; events actually leave through the
outbox relay.
"""

from __future__ import annotations

from faststream.kafka import KafkaRouter

from conveyor.contracts import (
    KIND_CONFIGS,
    PipelineRegistered,
    RunQueued,
    StepFailed,
    StepReady,
)
from conveyor.runtime import ConsumerGuard, KafkaSettings, consumer_options, prompt_batches
from conveyor.runtime.inject import RawMessage
from conveyor.scheduler.scheduling import Scheduler

__all__ = ["create_router"]


def create_router(
    *, kafka: KafkaSettings, scheduler: Scheduler, guard: ConsumerGuard
) -> KafkaRouter:
    topics = kafka.topics
    router = KafkaRouter()

    subscriber = router.subscriber(
        topics.runs_requested,
        topics.steps_completed,
        topics.runs_control,
        title="scheduler",
        description="RunRequested, StepCompleted/StepFailed and control events; "
        "undecodable messages go to the dead-letter topic",
        **consumer_options(kafka, group="scheduler", batch=True),
    )

    @prompt_batches(subscriber)  # type: ignore[untyped-decorator]
    async def on_events(msg: RawMessage) -> None:
        # A batch: one transaction (each event a savepoint of it), one offset commit.
        await guard.handle_batch(
            msg.raw_message,
            scheduler.handle,
            transaction=scheduler.batch,
            prepare=scheduler.prepare,
        )

    router.publisher(topics.runs_events, title="run events", schema=RunQueued)
    router.publisher(
        topics.steps_completed,
        title=f"{topics.steps_completed}:scheduler",
        schema=StepFailed,
        description="StepFailed 'InputTooLarge' for an attempt whose StepReady would be over "
        "the broker's message limit (it is never dispatched), read back like a runner's "
        "result; key: run_id.",
    )
    router.publisher(topics.pipelines, title="pipeline versions", schema=PipelineRegistered)
    for kind in KIND_CONFIGS:
        router.publisher(topics.ready(kind), title=f"steps ready: {kind}", schema=StepReady)
    return router
