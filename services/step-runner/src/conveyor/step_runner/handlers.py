"""The step-runner's one subscriber, built by the runner harness shared with the other
runner services."""

from __future__ import annotations

from faststream.kafka import KafkaRouter

from conveyor.runtime import ConsumerGuard, KafkaSettings
from conveyor.runtime.runner import StepHarness, create_runner_router

__all__ = ["GROUP", "create_router"]

GROUP = "step-runner"


def create_router(
    *, kafka: KafkaSettings, guard: ConsumerGuard, harness: StepHarness
) -> KafkaRouter:
    return create_runner_router(kafka=kafka, guard=guard, harness=harness, group=GROUP)
