"""The step-runner's one subscriber, built by the runner harness shared with the other
runner services."""

from __future__ import annotations

from faststream.kafka import KafkaRouter

from conveyor.runtime import KafkaSettings
from conveyor.runtime.runner import StepDispatcher, create_runner_router

__all__ = ["GROUP", "create_router"]

GROUP = "step-runner"


def create_router(*, kafka: KafkaSettings, dispatcher: StepDispatcher) -> KafkaRouter:
    return create_runner_router(kafka=kafka, dispatcher=dispatcher, group=GROUP)
