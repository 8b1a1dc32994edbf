"""The recorder's one subscriber: every topic it records, one consumer group.

One subscriber rather than one per topic because each consumer-group join costs about a
second on the embedded broker and FastStream starts subscribers one after another.
"""

import contextlib
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

from faststream.kafka import KafkaBroker, KafkaRouter
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contracts import Event, RunDeleted, Topics
from conveyor.run_recorder._quarantine import DeadLetterQueueGuard
from conveyor.run_recorder.projection import project_events, record_event
from conveyor.runtime import ConsumerGuard, KafkaSettings, consumer_options, prompt_batches
from conveyor.runtime.inject import RawMessage

__all__ = ["GROUP", "create_router", "recorded_topics"]

GROUP = "run-recorder"


def recorded_topics(topics: Topics) -> list[str]:
    """Everything but ``runs.requested`` (RunQueued says all about a new run) and the
    ``steps.ready.<kind>`` topics (StepScheduled says it first)."""
    return [
        topics.steps_completed,
        topics.runs_events,
        topics.runs_control,
        topics.pipelines,
        topics.dlq,
    ]


def create_router(
    *,
    broker: KafkaBroker,
    kafka: KafkaSettings,
    engine: AsyncEngine,
    tracer_provider: TracerProvider | None = None,
) -> KafkaRouter:
    """The router to include in ``broker``; undecodable messages are dead-lettered through it."""
    topics = kafka.topics
    group = kafka.group(GROUP)
    guard = ConsumerGuard(
        broker=broker, topics=topics, group=group, tracer_provider=tracer_provider
    )
    # What comes off the DLQ is never dead-lettered again: that could loop forever.
    dlq_guard = DeadLetterQueueGuard(
        broker=broker, topics=topics, group=group, tracer_provider=tracer_provider
    )
    router = KafkaRouter()
    # The events of the batch being handled, projected together when its transaction ends.
    batch: ContextVar[list[tuple[Event, Any]] | None] = ContextVar("recorder_batch", default=None)

    @contextlib.asynccontextmanager
    async def transaction() -> AsyncIterator[None]:
        """One transaction per batch; ``project`` only collects the events, and they are
        projected together at the end, in the order they came (see ``project_events``). An
        error there rolls the batch back, and the guard replays it one event at a time."""
        events: list[tuple[Event, Any]] = []
        token = batch.set(events)
        try:
            yield
        finally:
            batch.reset(token)
        if events:
            async with engine.begin() as conn:
                await project_events(conn, events)

    async def project(event: Event, record: Any) -> None:
        events = batch.get()
        if events is None:  # one event alone (a batch that failed is replayed one by one)
            await record_event(engine, event, record)
        else:
            events.append((event, record))

    subscriber = router.subscriber(
        *recorded_topics(topics),
        **consumer_options(
            kafka, group=GROUP, batch=True, fetch_max_wait_ms=kafka.history_fetch_max_wait_ms
        ),
        title="run-recorder",
        description="Projects the event stream into the run history and error log.",
    )

    @prompt_batches(subscriber)  # type: ignore[untyped-decorator]
    async def on_events(msg: RawMessage) -> None:
        # What one poll returned, projected in one transaction (see handle_batch).
        records: tuple[Any, ...] = msg.raw_message
        letters = [r for r in records if r.topic == topics.dlq]
        others = [r for r in records if r.topic != topics.dlq]
        if others:
            await guard.handle_batch(others, project, transaction=transaction)
        if letters:
            await dlq_guard.handle_batch(letters, project, transaction=transaction)

    # Documents what ``DELETE /runs/{id}`` publishes (through the broker, keyed by run id).
    router.publisher(
        topics.runs_control,
        schema=RunDeleted,
        title=f"{topics.runs_control}:run-recorder",
        description="RunDeleted once DELETE /runs/{id} deleted an ended run's history: the "
        "scheduler drops its state, media runners delete its artifacts; key: run_id.",
    )
    return router
