"""The recorder's one subscriber: every topic it records, one consumer group.

One subscriber rather than one per topic because each consumer-group join costs about a
second on the embedded broker and FastStream starts subscribers one after another.
"""

from typing import Any

from faststream.kafka import KafkaBroker, KafkaRouter
from faststream.kafka.annotations import KafkaMessage
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contracts import Event, Topics
from conveyor.run_recorder._quarantine import DeadLetterQueueGuard
from conveyor.run_recorder.projection import record_event
from conveyor.runtime import ConsumerGuard, KafkaSettings, consumer_options

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


def create_router(*, broker: KafkaBroker, kafka: KafkaSettings, engine: AsyncEngine) -> KafkaRouter:
    """The router to include in ``broker``; undecodable messages are dead-lettered through it."""
    topics = kafka.topics
    group = kafka.group(GROUP)
    guard = ConsumerGuard(broker=broker, topics=topics, group=group)
    # What comes off the DLQ is never dead-lettered again: that could loop forever.
    dlq_guard = DeadLetterQueueGuard(broker=broker, topics=topics, group=group)
    router = KafkaRouter()

    async def project(event: Event, record: Any) -> None:
        await record_event(engine, event, record)

    @router.subscriber(  # type: ignore[untyped-decorator]
        *recorded_topics(topics),
        **consumer_options(kafka, group=GROUP),
        title="run-recorder",
        description="Projects the event stream into the run history and error log.",
    )
    async def on_event(msg: KafkaMessage) -> None:
        record: Any = msg.raw_message  # one ConsumerRecord: this is not a batch subscriber
        chosen = dlq_guard if record.topic == topics.dlq else guard
        await chosen.handle(msg, project)

    return router
