"""The step-runner's subscriber and harness in memory, through FastStream's TestKafkaBroker."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

from conveyor.contracts import StepMetrics, StepReady, Topics
from conveyor.runtime import ConsumerGuard, KafkaSettings
from conveyor.runtime.runner import (
    Executor,
    StepDispatcher,
    StepError,
    StepHarness,
    StepOutput,
)
from conveyor.step_runner import create_service
from conveyor.step_runner.handlers import GROUP, create_router


@dataclass
class Bus:
    broker: Any
    topics: Topics
    dispatcher: StepDispatcher
    completed: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)

    @property
    def harness(self) -> StepHarness:
        return self.dispatcher.harness

    async def ready(self, step: StepReady | bytes, kind: str = "transform") -> None:
        """Publish and wait for the step to finish (the handler returns once it started)."""
        body = step if isinstance(step, bytes) else step.model_dump_json().encode()
        await self.broker.publish(body, self.topics.ready(kind), key=b"k")
        await self.dispatcher.idle()


@asynccontextmanager
async def _bus(
    broker: KafkaBroker, topics: Topics, dispatcher: StepDispatcher
) -> AsyncIterator[Bus]:
    state = Bus(broker=None, topics=topics, dispatcher=dispatcher)

    # results on steps.completed; StepStarted/StepProgress on runs.events (for the recorder)
    @broker.subscriber(topics.steps_completed, topics.runs_events)
    async def collect(msg: KafkaMessage) -> None:
        state.completed.append((msg.raw_message.key, json.loads(msg.body)))

    @broker.subscriber(topics.dlq)
    async def collect_dead(msg: KafkaMessage) -> None:
        state.dead.append(json.loads(msg.body))

    async with TestKafkaBroker(broker) as test_broker:
        state.broker = test_broker
        yield state


@pytest.fixture
async def bus(topic_prefix: str) -> AsyncIterator[Bus]:
    """The step-runner as ``create_service`` builds it."""
    service = create_service(kafka=KafkaSettings(topic_prefix=topic_prefix))
    async with _bus(service.broker, Topics(topic_prefix), service.dispatcher) as state:
        yield state
    await service.http_client.aclose()


@asynccontextmanager
async def _custom_bus(
    topic_prefix: str, executor: Executor, *, announce_after_s: float = 0.0
) -> AsyncIterator[Bus]:
    """The step-runner's router around a harness whose transform is ``executor``."""
    kafka = KafkaSettings(topic_prefix=topic_prefix)
    broker = KafkaBroker()
    harness = StepHarness(
        broker=broker,
        topics=kafka.topics,
        executors={"transform": executor},
        worker="w:1",
        announce_after_s=announce_after_s,
    )
    guard = ConsumerGuard(broker=broker, topics=kafka.topics, group=kafka.group(GROUP))
    dispatcher = StepDispatcher(harness=harness, guard=guard)
    broker.include_router(create_router(kafka=kafka, dispatcher=dispatcher))
    async with _bus(broker, kafka.topics, dispatcher) as state:
        yield state


def _step(config: dict[str, Any], **kw: Any) -> StepReady:
    fields: dict[str, Any] = {
        "run_id": uuid.uuid4(),
        "pipeline": "p",
        "version": 1,
        "step_id": "s",
        "attempt": 1,
        "kind": "transform",
        **kw,
    }
    return StepReady(config=config, **fields)


async def test_a_quick_step_says_when_it_started_through_its_result(bus: Bus) -> None:
    """Quicker than ``announce_after_ms``: no StepStarted; the result carries what it
    would have said (when, and which worker)."""
    step = _step({"template": "{{ input.x }}-done"}, context={"input": {"x": "a"}}, item_index=3)
    before = datetime.now(UTC)
    await bus.ready(step)
    assert [event["type"] for _, event in bus.completed] == ["StepCompleted"]
    ((key, completed),) = bus.completed
    assert key == str(step.run_id).encode()
    assert completed["worker"] == bus.harness.worker
    assert completed["output"] == "a-done"
    assert completed["item_index"] == 3
    assert completed["run_id"] == str(step.run_id)
    assert before <= datetime.fromisoformat(completed["started_at"]) <= datetime.now(UTC)
    # what the history needs of the StepReady (there is no StepScheduled)
    assert completed["kind"] == "transform"
    assert datetime.fromisoformat(completed["scheduled_at"]) == step.occurred_at


@pytest.mark.parametrize("after_s", [0.0, 0.05])
async def test_a_step_that_runs_on_announces_itself(topic_prefix: str, after_s: float) -> None:
    """Still running after ``announce_after_s`` (or with 0, at once): StepStarted goes out
    first, with the same start time and worker as the result."""

    async def slow(config: Any, step: StepReady) -> Any:
        await asyncio.sleep(0.3)
        return config.template

    async with _custom_bus(topic_prefix, slow, announce_after_s=after_s) as bus:
        step = _step({"template": "x"}, item_index=3)
        await bus.ready(step)
        assert [event["type"] for _, event in bus.completed] == ["StepStarted", "StepCompleted"]
        (key1, started), (key2, completed) = bus.completed
        assert key1 == key2 == str(step.run_id).encode()
        assert started["worker"] == completed["worker"] == "w:1"
        assert started["item_index"] == completed["item_index"] == 3
        assert started["occurred_at"] == completed["started_at"]
        assert started["kind"] == completed["kind"] == "transform"
        assert started["scheduled_at"] == completed["scheduled_at"]


async def test_failure_is_published_as_data(bus: Bus) -> None:
    await bus.ready(_step({"template": "{{ nope }}"}))
    failed = bus.completed[-1][1]
    assert failed["type"] == "StepFailed"
    assert failed["error"]["type"] == "TemplateError"
    assert bus.dead == []


async def test_malformed_json_is_dead_lettered(bus: Bus) -> None:
    await bus.ready(b"{not json", kind="http")
    assert bus.completed == []
    [letter] = bus.dead
    assert letter["type"] == "DeadLetter"
    assert letter["source_topic"] == bus.topics.ready("http")
    assert "not JSON" in letter["reason"]
    assert base64.b64decode(letter["value_b64"]) == b"{not json"
    assert letter["consumer_group"] == f"{bus.topics.prefix}.step-runner"


async def test_invalid_event_is_dead_lettered(bus: Bus) -> None:
    await bus.ready(json.dumps({"type": "StepReady", "step_id": "s"}).encode())
    [letter] = bus.dead
    assert "run_id" in letter["reason"]


async def test_step_timeout(topic_prefix: str) -> None:
    async def sleepy(config: Any, step: StepReady) -> Any:
        await asyncio.sleep(5)

    async with _custom_bus(topic_prefix, sleepy) as bus:
        await bus.ready(_step({"template": "x"}, timeout_s=0.05))
    error = bus.completed[-1][1]["error"]
    assert error == {
        "type": "StepTimeout",
        "message": "step exceeded its 0.05s timeout",
        "traceback": None,
        "retryable": True,
        "retry_after_s": None,
        "details": {"timeout_s": 0.05},
    }


async def test_unexpected_exception_is_data(topic_prefix: str) -> None:
    async def broken(config: Any, step: StepReady) -> Any:
        raise KeyError("boom")

    async with _custom_bus(topic_prefix, broken) as bus:
        await bus.ready(_step({"template": "x"}))
    error = bus.completed[-1][1]["error"]
    assert (error["type"], error["retryable"]) == ("KeyError", False)
    assert "boom" in error["message"]
    assert "raise KeyError" in error["traceback"]


async def test_step_error_keeps_its_fields(topic_prefix: str) -> None:
    async def limited(config: Any, step: StepReady) -> Any:
        raise StepError(
            "quota", type="RateLimited", retryable=True, retry_after_s=3, details={"n": 1}
        )

    async with _custom_bus(topic_prefix, limited) as bus:
        await bus.ready(_step({"template": "x"}))
    error = bus.completed[-1][1]["error"]
    assert error["type"] == "RateLimited"
    assert (error["retryable"], error["retry_after_s"], error["details"]) == (True, 3, {"n": 1})


async def test_metrics_from_the_executor_are_kept(topic_prefix: str) -> None:
    async def counted(config: Any, step: StepReady) -> Any:
        return StepOutput(output="ok", metrics=StepMetrics(tokens_in=5, cost=0.25))

    async with _custom_bus(topic_prefix, counted) as bus:
        await bus.ready(_step({"template": "x"}))
    metrics = bus.completed[-1][1]["metrics"]
    assert (metrics["tokens_in"], metrics["cost"]) == (5, 0.25)
    assert metrics["duration_ms"] > 0


async def test_output_that_is_not_json_fails_the_step(topic_prefix: str) -> None:
    async def weird(config: Any, step: StepReady) -> Any:
        return object()

    async with _custom_bus(topic_prefix, weird) as bus:
        await bus.ready(_step({"template": "x"}))
    error = bus.completed[-1][1]["error"]
    assert error["type"] == "OutputNotSerializable"
