"""The runner's dispatcher in memory (TestKafkaBroker): several steps at once, a limit, runs
cancelled from the control topic, and the drain on stop."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

from conveyor.contracts import CancelRun, RetryRun, StepReady, Topics
from conveyor.runtime import ConsumerGuard, KafkaSettings
from conveyor.runtime.runner import Executor, RunnerSettings, StepDispatcher, StepHarness
from conveyor.step_runner.handlers import GROUP, create_router


@dataclass
class Runner:
    broker: Any
    topics: Topics
    dispatcher: StepDispatcher
    results: list[dict[str, Any]] = field(default_factory=list)
    dead: list[dict[str, Any]] = field(default_factory=list)

    async def ready(self, step: StepReady) -> None:
        await self.broker.publish(
            step.model_dump_json().encode(), self.topics.ready("transform"), key=b"k"
        )

    async def control(self, body: bytes) -> None:
        await self.broker.publish(body, self.topics.runs_control, key=b"k")

    def result(self, step: StepReady) -> dict[str, Any] | None:
        for event in self.results:
            if event["step_id"] == step.step_id and event["run_id"] == str(step.run_id):
                return event
        return None


@asynccontextmanager
async def _runner(
    topic_prefix: str, executor: Executor, *, concurrency: int = 8, drain_seconds: float = 20
) -> AsyncIterator[Runner]:
    kafka = KafkaSettings(topic_prefix=topic_prefix)
    broker = KafkaBroker()
    harness = StepHarness(
        broker=broker, topics=kafka.topics, executors={"transform": executor}, worker="w:1"
    )
    guard = ConsumerGuard(broker=broker, topics=kafka.topics, group=kafka.group(GROUP))
    dispatcher = StepDispatcher(
        harness=harness,
        guard=guard,
        settings=RunnerSettings(concurrency=concurrency, drain_seconds=drain_seconds),
    )
    broker.include_router(create_router(kafka=kafka, dispatcher=dispatcher))
    runner = Runner(broker=None, topics=kafka.topics, dispatcher=dispatcher)

    @broker.subscriber(kafka.topics.steps_completed)
    async def collect(msg: KafkaMessage) -> None:
        event = json.loads(msg.body)
        if event["type"] != "StepStarted":
            runner.results.append(event)

    @broker.subscriber(kafka.topics.dlq)
    async def collect_dead(msg: KafkaMessage) -> None:
        runner.dead.append(json.loads(msg.body))

    async with TestKafkaBroker(broker) as test_broker:
        runner.broker = test_broker
        try:
            yield runner
        finally:
            await dispatcher.drain()


def _step(step_id: str = "s", *, run_id: uuid.UUID | None = None, **kw: Any) -> StepReady:
    return StepReady(
        run_id=run_id or uuid.uuid4(),
        pipeline="p",
        version=1,
        step_id=step_id,
        attempt=1,
        kind="transform",
        config={"template": "x"},
        **kw,
    )


async def _until(predicate: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_steps_run_at_the_same_time(topic_prefix: str) -> None:
    barrier = asyncio.Barrier(4)

    async def meet(config: Any, step: StepReady) -> Any:
        async with asyncio.timeout(5):
            await barrier.wait()  # passes only when 4 steps run at once
        return step.step_id

    async with _runner(topic_prefix, meet, concurrency=4) as runner:
        steps = [_step(f"s{i}") for i in range(4)]
        for step in steps:
            await runner.ready(step)  # each returns as soon as its step started
        await runner.dispatcher.idle()
    assert sorted(e["output"] for e in runner.results) == ["s0", "s1", "s2", "s3"]
    assert {e["type"] for e in runner.results} == {"StepCompleted"}


async def test_no_more_steps_run_than_the_concurrency(topic_prefix: str) -> None:
    running: list[int] = [0]
    peak: list[int] = [0]

    async def busy(config: Any, step: StepReady) -> Any:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.05)
        running[0] -= 1
        return "ok"

    async with _runner(topic_prefix, busy, concurrency=2) as runner:
        for i in range(7):
            await runner.ready(_step(f"s{i}"))
            assert runner.dispatcher.running <= 2
        await runner.dispatcher.idle()
    assert len(runner.results) == 7
    assert peak[0] == 2


async def test_concurrency_one_runs_steps_one_after_another(topic_prefix: str) -> None:
    spans: list[tuple[float, float]] = []

    async def timed(config: Any, step: StepReady) -> Any:
        began = time.monotonic()
        await asyncio.sleep(0.05)
        spans.append((began, time.monotonic()))

    async with _runner(topic_prefix, timed, concurrency=1) as runner:
        for i in range(3):
            await runner.ready(_step(f"s{i}"))
        await runner.dispatcher.idle()
    spans.sort()
    assert all(end <= later for (_, end), (later, _) in itertools.pairwise(spans))


async def test_cancel_run_cancels_its_running_steps(topic_prefix: str) -> None:
    outcome: dict[str, str] = {}

    async def slow(config: Any, step: StepReady) -> Any:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            outcome[step.step_id] = "interrupted"
            raise
        return "late"

    async def quick_or_slow(config: Any, step: StepReady) -> Any:
        return "quick" if step.step_id == "other" else await slow(config, step)

    async with _runner(topic_prefix, quick_or_slow) as runner:
        run_id = uuid.uuid4()
        doomed = [_step("a", run_id=run_id), _step("b", run_id=run_id, item_index=1)]
        other = _step("other")
        for step in [*doomed, other]:
            await runner.ready(step)
        await _until(lambda: runner.result(other) is not None)
        began = time.monotonic()
        cancel = CancelRun(run_id=run_id, reason="user asked", requested_by="ada")
        await runner.control(cancel.model_dump_json().encode())
        await runner.dispatcher.idle()
        latency = time.monotonic() - began
    assert latency < 1.0
    assert outcome == {"a": "interrupted", "b": "interrupted"}
    for step in doomed:
        failed = runner.result(step)
        assert failed is not None
        assert failed["type"] == "StepFailed"
        assert failed["item_index"] == step.item_index
        error = failed["error"]
        assert (error["type"], error["retryable"]) == ("Cancelled", False)
        assert error["message"] == "the run was cancelled: user asked (by ada)"
        assert error["details"] == {"reason": "user asked", "requested_by": "ada"}
    assert runner.result(other)["output"] == "quick"  # type: ignore[index]


async def test_a_step_of_a_cancelled_run_fails_without_running(topic_prefix: str) -> None:
    ran: list[str] = []

    async def record(config: Any, step: StepReady) -> Any:
        ran.append(step.step_id)
        return "ran"

    async with _runner(topic_prefix, record) as runner:
        run_id = uuid.uuid4()
        await runner.control(CancelRun(run_id=run_id).model_dump_json().encode())
        queued = _step("queued", run_id=run_id)
        await runner.ready(queued)
        await runner.dispatcher.idle()
        # A retry of the run un-cancels it here.
        await runner.control(RetryRun(run_id=run_id).model_dump_json().encode())
        retried = _step("retried", run_id=run_id)
        await runner.ready(retried)
        await runner.dispatcher.idle()
    assert ran == ["retried"]
    assert runner.result(queued)["error"]["type"] == "Cancelled"  # type: ignore[index]
    assert runner.result(queued)["error"]["message"] == "the run was cancelled"  # type: ignore[index]
    assert runner.result(retried)["output"] == "ran"  # type: ignore[index]


async def test_bad_control_messages_are_skipped_not_dead_lettered(topic_prefix: str) -> None:
    async def echo(config: Any, step: StepReady) -> Any:
        return "ok"

    async with _runner(topic_prefix, echo) as runner:
        await runner.control(b"{not json")
        await runner.control(json.dumps({"type": "CancelRun"}).encode())
        await runner.control(json.dumps({"type": "Bogus", "run_id": str(uuid.uuid4())}).encode())
        step = _step()
        await runner.ready(step)
        await runner.dispatcher.idle()
    assert runner.dead == []
    assert runner.result(step)["output"] == "ok"  # type: ignore[index]


async def test_drain_lets_quick_steps_finish_and_cancels_the_rest(topic_prefix: str) -> None:
    interrupted: list[str] = []

    async def sleeper(config: Any, step: StepReady) -> Any:
        try:
            await asyncio.sleep(0.1 if step.step_id == "quick" else 30)
        except asyncio.CancelledError:
            interrupted.append(step.step_id)
            raise
        return step.step_id

    async with _runner(topic_prefix, sleeper, drain_seconds=0.5) as runner:
        quick, slow = _step("quick"), _step("slow")
        await runner.ready(quick)
        await runner.ready(slow)
        began = time.monotonic()
        await runner.dispatcher.drain()
        took = time.monotonic() - began
        late = _step("late")
        await runner.ready(late)  # after the drain began: not taken
    assert 0.4 < took < 2.0
    assert runner.result(quick)["output"] == "quick"  # type: ignore[index]
    assert runner.result(slow) is None  # cancelled without a result: another runner's now
    assert interrupted == ["slow"]
    assert runner.result(late) is None
