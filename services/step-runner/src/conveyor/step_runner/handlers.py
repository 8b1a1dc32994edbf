"""The step-runner's one subscriber: every kind it serves, one consumer group.

One subscriber lists all the ready topics because each consumer-group join costs the
embedded broker about a second, and FastStream starts subscribers one after another.
"""

from __future__ import annotations

from faststream.kafka import KafkaRouter
from faststream.kafka.annotations import KafkaMessage

from conveyor.contracts import StepCompleted, StepFailed, StepStarted
from conveyor.runtime import ConsumerGuard, KafkaSettings, consumer_options
from conveyor.runtime.runner import StepHarness

__all__ = ["GROUP", "create_router"]

GROUP = "step-runner"


def create_router(
    *, kafka: KafkaSettings, guard: ConsumerGuard, harness: StepHarness
) -> KafkaRouter:
    topics = kafka.topics
    router = KafkaRouter()

    @router.subscriber(
        *(topics.ready(kind) for kind in harness.kinds),
        title="step-runner:on_step_ready",
        description="StepReady (conveyor.contracts.StepReady) of the kinds this runner "
        f"serves ({', '.join(harness.kinds)}); undecodable messages go to {topics.dlq}.",
        **consumer_options(kafka, group=GROUP),
    )
    async def on_step_ready(msg: KafkaMessage) -> None:
        await guard.handle(msg, harness.execute)

    # Documents what the harness emits (it publishes through the broker, keyed by run id).
    router.publisher(
        topics.steps_completed,
        schema=StepStarted | StepCompleted | StepFailed,
        title=f"{topics.steps_completed}:step-runner",
        description="StepStarted when a step begins, then StepCompleted (the data packet) "
        "or StepFailed (the error as data); key: run_id.",
    )
    return router
