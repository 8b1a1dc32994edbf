"""A step-runner process running several http steps at once against the real broker:
overlap, at-least-once across a SIGKILL, CancelRun from a plain producer, and SIGTERM with
steps in flight (finished within the drain, or left uncommitted to another runner)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from conveyor.cli import stack
from conveyor.contracts import StepReady, Topics

log = logging.getLogger(__name__)


@dataclass
class Call:
    tag: str
    began: float
    ended: float | None = None
    outcome: str = "running"  # then "served" or "aborted" (the client hung up)


class _SlowServer(ThreadingHTTPServer):
    calls: list[Call]
    lock: threading.Lock
    stall: bool

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up: recorded as "aborted"


class _Slow(BaseHTTPRequestHandler):
    """``/sleep/SECONDS/TAG`` answers after SECONDS; ``/once/SECONDS/TAG`` only the first
    time, then at once; ``/stall/SECONDS/TAG`` while the server's ``stall`` is set. Each
    notices when the client hangs up first."""

    server: _SlowServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        _, mode, seconds, tag = self.path.split("/", 3)
        if mode == "big":  # a JSON body of SECONDS bytes, at once
            self._answer(json.dumps({"blob": "x" * int(seconds)}).encode())
            return
        call = Call(tag=tag, began=time.monotonic())
        with self.server.lock:
            first = not any(c.tag == tag for c in self.server.calls)
            self.server.calls.append(call)
        wait = float(seconds) if mode in ("sleep", "stall") or first else 0.0
        self.connection.settimeout(0.02)
        while time.monotonic() - call.began < wait and (mode != "stall" or self.server.stall):
            try:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":
                    call.ended, call.outcome = time.monotonic(), "aborted"
                    return
            except (TimeoutError, BlockingIOError):
                pass
        self.connection.settimeout(None)
        self._answer(json.dumps({"tag": tag}).encode())
        call.ended, call.outcome = time.monotonic(), "served"

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def slow_server() -> Iterator[_SlowServer]:
    httpd = _SlowServer(("127.0.0.1", 0), _Slow)
    httpd.calls, httpd.lock, httpd.stall = [], threading.Lock(), True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def _url(server: _SlowServer, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


@dataclass
class Stack:
    bootstrap: str
    topics: Topics
    lines: list[str] = field(default_factory=list)
    procs: list[stack.ServiceProcess] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    producer: AIOKafkaProducer | None = None
    consumer: AIOKafkaConsumer | None = None

    async def runner(self, **env: str) -> stack.ServiceProcess:
        """A step-runner process of the test's group, once it has joined."""
        name = f"runner{len(self.procs) + 1}"
        proc = stack.ServiceProcess(
            name=name,
            module="conveyor.step_runner",
            env={
                "CONVEYOR_KAFKA_BOOTSTRAP": self.bootstrap,
                "CONVEYOR_KAFKA_TOPIC_PREFIX": self.topics.prefix,
                "CONVEYOR_KAFKA_SESSION_TIMEOUT_MS": "2000",
                "CONVEYOR_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
                **env,
            },
            sink=self.lines.append,
        )
        self.procs.append(proc)
        proc.start()
        deadline = time.monotonic() + 60
        while not any(line.startswith(f"[{name}]") and "started" in line for line in self.lines):
            assert proc.alive(), f"{name} exited early:\n" + self.log()
            assert time.monotonic() < deadline, f"{name} did not start:\n" + self.log()
            await asyncio.sleep(0.05)
        return proc

    def log(self) -> str:
        return "\n".join(self.lines)

    async def ready(self, step: StepReady) -> None:
        assert self.producer is not None
        meta = await self.producer.send_and_wait(
            self.topics.ready(step.kind),
            step.model_dump_json().encode(),
            key=str(step.run_id).encode(),
        )
        self.sent.append(
            {"run_id": str(step.run_id), "partition": meta.partition, "offset": meta.offset}
        )

    async def collect(self) -> None:
        assert self.consumer is not None
        for records in (await self.consumer.getmany(timeout_ms=50)).values():
            self.events.extend(json.loads(record.value) for record in records)

    def results(self, step: StepReady) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["run_id"] == str(step.run_id)
            and e["step_id"] == step.step_id
            and e["type"] != "StepStarted"
        ]

    async def wait_for(self, predicate: Any, *, within: float, what: str) -> None:
        """Collect results until ``predicate()`` holds."""
        deadline = time.monotonic() + within
        while not predicate():
            assert time.monotonic() < deadline, f"no {what} in {within}s:\n" + self.log()
            await self.collect()

    async def until(self, predicate: Any, *, within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            assert time.monotonic() < deadline, f"no {what} in {within}s:\n" + self.log()
            await asyncio.sleep(0.02)

    async def committed(self, step: StepReady) -> int | None:
        """The test group's committed offset of the partition ``step`` went to."""
        partitions = {e["partition"] for e in self.sent if e["run_id"] == str(step.run_id)}
        assert len(partitions) == 1
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=f"{self.topics.prefix}.step-runner"
        )
        await consumer.start()
        try:
            return await consumer.committed(
                TopicPartition(self.topics.ready(step.kind), partitions.pop())
            )
        finally:
            await consumer.stop()


@pytest.fixture
async def conveyor(kafka_bootstrap: str, topic_prefix: str) -> AsyncIterator[Stack]:
    topics = Topics(topic_prefix)
    state = Stack(bootstrap=kafka_bootstrap, topics=topics)
    state.producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await state.producer.start()
    try:
        yield state
    finally:
        for proc in state.procs:
            proc.kill()
        if state.consumer is not None:
            await state.consumer.stop()
        await state.producer.stop()


async def _listen(state: Stack) -> None:
    """Read results from the start of the topic (it exists once a runner has started)."""
    state.consumer = AIOKafkaConsumer(
        state.topics.steps_completed,
        bootstrap_servers=state.bootstrap,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await state.consumer.start()


def _http(url: str, *, step_id: str = "call", timeout_s: float = 60) -> StepReady:
    return StepReady(
        run_id=uuid.uuid4(),
        pipeline="it",
        version=1,
        step_id=step_id,
        attempt=1,
        kind="http",
        config={"url": url, "timeout": "60s"},
        timeout_s=timeout_s,
    )


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def test_one_process_runs_several_steps_at_once(
    conveyor: Stack, slow_server: _SlowServer
) -> None:
    await conveyor.runner(CONVEYOR_RUNNER_CONCURRENCY="4")
    await _listen(conveyor)
    steps = [_http(_url(slow_server, f"/sleep/1/s{i}"), step_id=f"s{i}") for i in range(4)]
    began = time.monotonic()
    for step in steps:
        await conveyor.ready(step)
    await conveyor.wait_for(
        lambda: all(conveyor.results(s) for s in steps), within=30, what="4 results"
    )
    took = time.monotonic() - began
    done = [conveyor.results(s)[0] for s in steps]
    assert {e["type"] for e in done} == {"StepCompleted"}, done
    assert sorted(e["output"]["json"]["tag"] for e in done) == ["s0", "s1", "s2", "s3"]
    # Every step began before any ended: the four intervals overlap, by the server's clock
    # and by the runner's own timestamps.
    calls = slow_server.calls
    overlap = min(c.ended for c in calls if c.ended) - max(c.began for c in calls)
    assert len(calls) == 4
    assert overlap > 0.5, [(c.began, c.ended) for c in calls]
    assert max(_at(e["started_at"]) for e in done) < min(_at(e["occurred_at"]) for e in done)
    assert took < 3.5  # one after another would take 4 s and more
    log.info("4 steps of 1 s: overlap %.3f s by the server's clock, %.2f s total", overlap, took)


async def test_a_killed_runner_s_steps_run_on_another(
    conveyor: Stack, slow_server: _SlowServer
) -> None:
    first = await conveyor.runner(CONVEYOR_RUNNER_CONCURRENCY="4")
    await _listen(conveyor)
    steps = [_http(_url(slow_server, f"/stall/30/k{i}"), step_id=f"k{i}") for i in range(6)]
    for step in steps:
        await conveyor.ready(step)
    # Four in flight, two waiting for a slot.
    await conveyor.until(lambda: len(slow_server.calls) >= 4, within=30, what="4 requests")
    first.kill()  # SIGKILL mid-step: nothing was committed for the steps in flight
    await conveyor.collect()
    assert not any(conveyor.results(s) for s in steps)
    slow_server.stall = False
    began = time.monotonic()
    await conveyor.runner(CONVEYOR_RUNNER_CONCURRENCY="4")
    await conveyor.wait_for(
        lambda: all(conveyor.results(s) for s in steps), within=60, what="6 results"
    )
    took = time.monotonic() - began
    for step in steps:
        assert {e["type"] for e in conveyor.results(step)} == {"StepCompleted"}
    calls = slow_server.calls
    assert {c.tag for c in calls if c.outcome == "served"} == {f"k{i}" for i in range(6)}
    aborted = {c.tag for c in calls if c.outcome == "aborted"}
    assert len(aborted) == 4  # the four in flight died with the first runner, then ran again
    log.info("6 steps after a SIGKILL: all done %.2f s after the kill", took)


async def test_cancel_run_reaches_a_running_step(conveyor: Stack, slow_server: _SlowServer) -> None:
    proc = await conveyor.runner()
    await _listen(conveyor)
    doomed = _http(_url(slow_server, "/sleep/30/doomed"), step_id="doomed")
    spared = _http(_url(slow_server, "/sleep/1/spared"), step_id="spared")
    await conveyor.ready(doomed)
    await conveyor.ready(spared)
    await conveyor.until(lambda: len(slow_server.calls) >= 2, within=30, what="requests")
    cancel = {"type": "CancelRun", "run_id": str(doomed.run_id), "reason": "user said stop"}
    assert conveyor.producer is not None
    began = time.monotonic()
    await conveyor.producer.send_and_wait(
        conveyor.topics.runs_control,
        json.dumps(cancel).encode(),
        key=str(doomed.run_id).encode(),
    )
    await conveyor.wait_for(lambda: conveyor.results(doomed), within=10, what="StepFailed")
    latency = time.monotonic() - began
    [failed] = conveyor.results(doomed)
    assert failed["type"] == "StepFailed"
    error = failed["error"]
    assert (error["type"], error["retryable"]) == ("Cancelled", False)
    assert "user said stop" in error["message"]
    assert latency < 2.0
    call = next(c for c in slow_server.calls if c.tag == "doomed")
    await conveyor.until(lambda: call.outcome != "running", within=2, what="hang-up")
    assert call.outcome == "aborted"  # the request was closed, not left running
    # Other runs are not touched.
    await conveyor.wait_for(lambda: conveyor.results(spared), within=10, what="spared")
    assert conveyor.results(spared)[0]["type"] == "StepCompleted"
    # Messages the runner cannot use on the control topic are skipped, not dead-lettered.
    await conveyor.producer.send_and_wait(conveyor.topics.runs_control, b"{not json")
    await conveyor.until(
        lambda: "skipping undecodable" in conveyor.log(), within=5, what="skip notice"
    )
    assert proc.alive()
    assert "dead-lettering" not in conveyor.log()
    log.info("CancelRun to StepFailed(Cancelled): %.0f ms", latency * 1000)


async def test_sigterm_finishes_the_step_in_flight(
    conveyor: Stack, slow_server: _SlowServer
) -> None:
    proc = await conveyor.runner()
    await _listen(conveyor)
    step = _http(_url(slow_server, "/sleep/2/inflight"))
    await conveyor.ready(step)
    await conveyor.until(lambda: bool(slow_server.calls), within=30, what="requests")
    code = await asyncio.to_thread(proc.stop, 30)
    assert code == 0, conveyor.log()
    await conveyor.wait_for(lambda: conveyor.results(step), within=10, what="the result")
    [done] = conveyor.results(step)
    assert done["type"] == "StepCompleted"
    assert slow_server.calls[0].outcome == "served"
    # ... and its offset was committed before the runner left the group.
    assert await conveyor.committed(step) == conveyor.sent[0]["offset"] + 1


async def test_sigterm_past_the_drain_leaves_the_step_to_another_runner(
    conveyor: Stack, slow_server: _SlowServer
) -> None:
    proc = await conveyor.runner(CONVEYOR_RUNNER_DRAIN_SECONDS="1")
    await _listen(conveyor)
    step = _http(_url(slow_server, "/once/30/long"))
    await conveyor.ready(step)
    await conveyor.until(lambda: bool(slow_server.calls), within=30, what="requests")
    began = time.monotonic()
    code = await asyncio.to_thread(proc.stop, 30)
    stopped_in = time.monotonic() - began
    assert code == 0, conveyor.log()
    assert stopped_in < 6
    assert slow_server.calls[0].outcome == "aborted"
    await conveyor.collect()
    assert conveyor.results(step) == []  # no result for a step that did not finish
    assert await conveyor.committed(step) in (None, conveyor.sent[0]["offset"])
    # The next runner of the group gets it (the server answers at once the second time).
    await conveyor.runner()
    await conveyor.wait_for(lambda: conveyor.results(step), within=30, what="the rerun")
    assert conveyor.results(step)[0]["type"] == "StepCompleted"
    assert [c.outcome for c in slow_server.calls] == ["aborted", "served"]


async def test_a_runner_joining_mid_step_loses_nothing(
    conveyor: Stack, slow_server: _SlowServer
) -> None:
    await conveyor.runner()
    await _listen(conveyor)
    steps = [_http(_url(slow_server, f"/stall/30/j{i}"), step_id=f"j{i}") for i in range(6)]
    for step in steps:
        await conveyor.ready(step)
    await conveyor.until(lambda: len(slow_server.calls) >= 6, within=30, what="6 requests")
    joining = asyncio.create_task(conveyor.runner())  # partitions are revoked, reassigned
    # The first runner holds the rebalance a moment for its steps of revoked partitions:
    # the steps that finish meanwhile are committed, and the newcomer does not redo them.
    await conveyor.until(lambda: "rebalance: waiting" in conveyor.log(), within=30, what="wait")
    slow_server.stall = False
    await joining
    await conveyor.wait_for(
        lambda: all(conveyor.results(s) for s in steps), within=30, what="6 results"
    )
    await asyncio.sleep(1)  # a redelivery to the newcomer, if any, has run by now
    await conveyor.collect()
    for step in steps:
        assert [e["type"] for e in conveyor.results(step)] == ["StepCompleted"], conveyor.log()
    assert len(slow_server.calls) == 6


async def test_a_result_too_large_for_the_broker_fails_the_step(
    conveyor: Stack, slow_server: _SlowServer
) -> None:
    await conveyor.runner()
    await _listen(conveyor)
    big = _http(_url(slow_server, "/big/2000000/blob"), step_id="big")
    small = _http(_url(slow_server, "/sleep/0/small"), step_id="small")
    await conveyor.ready(big)
    await conveyor.ready(small)
    await conveyor.wait_for(
        lambda: conveyor.results(big) and conveyor.results(small), within=30, what="results"
    )
    [failed] = conveyor.results(big)
    assert failed["type"] == "StepFailed"
    assert failed["error"]["type"] == "OutputTooLarge"
    assert failed["error"]["details"]["size"] > 2_000_000
    assert conveyor.results(small)[0]["type"] == "StepCompleted"
