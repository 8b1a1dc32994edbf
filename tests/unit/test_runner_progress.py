"""``report_progress``: StepProgress from inside an executor, rate-limited, never after the
result; the harness in memory through FastStream's TestKafkaBroker."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage
from pydantic import BaseModel

from conveyor.contracts import StepReady, Topics
from conveyor.runtime.runner import StepHarness, report_progress


class _Config(BaseModel):
    pass


def _step() -> StepReady:
    return StepReady(
        run_id=uuid.uuid4(), pipeline="p", version=1, step_id="long", attempt=1, kind="long"
    )


async def test_progress_is_published_rate_limited_and_before_the_result(
    topic_prefix: str,
) -> None:
    topics = Topics(topic_prefix)
    broker = KafkaBroker("127.0.0.1:1")
    seen: list[dict[str, Any]] = []
    leaked: list[asyncio.Task[None]] = []

    @broker.subscriber(topics.steps_completed, topics.runs_events)
    async def collect(msg: KafkaMessage) -> None:
        seen.append(json.loads(msg.body))

    async def late_report() -> None:
        await asyncio.sleep(0.3)
        report_progress(0.99, "too late")  # the step is over: nothing is sent

    async def executor(config: _Config, step: StepReady) -> str:
        for i in range(100):  # a burst: only the first goes out
            report_progress(i / 100, "encoding")
        await asyncio.sleep(0.3)  # past the interval: the next one goes out
        report_progress(1.5, "finishing")  # clamped to 1
        leaked.append(asyncio.create_task(late_report()))
        return "done"

    harness = StepHarness(
        broker=broker,
        topics=topics,
        executors={"long": executor},
        config_models={"long": _Config},
        progress_interval_s=0.2,
    )
    async with TestKafkaBroker(broker):
        await harness.execute(_step())
        await asyncio.gather(*leaked)
        await asyncio.sleep(0.05)

    assert [e["type"] for e in seen] == [
        "StepStarted",
        "StepProgress",
        "StepProgress",
        "StepCompleted",
    ]
    first, second = seen[1], seen[2]
    assert (first["progress"], first["message"]) == (0.0, "encoding")
    assert (second["progress"], second["message"]) == (1.0, "finishing")
    assert first["step_id"] == "long"
    assert first["attempt"] == 1


def test_outside_a_step_a_report_does_nothing() -> None:
    report_progress(0.5, "nobody listens")
