"""The recorder as it runs: the composition root against the real broker and PostgreSQL
(migrations and topics at start, one consumer group for every recorded topic), and
``python -m conveyor.run_recorder`` as a process that serves its API and stops cleanly on
SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from conveyor.cli import stack
from conveyor.contracts import RunCompleted, RunQueued, RunStarted, StepCompleted, StepMetrics
from conveyor.run_recorder import RecorderService, RecorderSettings, create_service
from conveyor.runtime import DatabaseSettings, KafkaSettings

FAST_JOIN = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}


@pytest.fixture
async def service(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> AsyncIterator[RecorderService]:
    service = create_service(
        kafka=KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, **FAST_JOIN),
        database=DatabaseSettings(url=database_url),
        recorder=RecorderSettings(port=0),
    )
    await service.app.start()
    try:
        yield service
    finally:
        await service.app.stop()


async def _produce(bootstrap: str, *messages: tuple[str, bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for topic, value in messages:
            await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()


async def _poll(client: httpx.AsyncClient, path: str, done: Any, within: float = 20) -> Any:
    deadline = time.monotonic() + within
    while True:
        response = await client.get(path)
        if response.status_code == 200 and done(response.json()):
            return response.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: {response.status_code} {response.text}")
        await asyncio.sleep(0.1)


async def test_events_from_the_broker_are_recorded(
    service: RecorderService, kafka_bootstrap: str, topic_prefix: str
) -> None:
    topics = KafkaSettings(topic_prefix=topic_prefix).topics
    run_id = uuid.uuid4()
    usage = StepMetrics(tokens_in=2, tokens_out=3)
    await _produce(
        kafka_bootstrap,
        (topics.steps_completed, StepCompleted(run_id=run_id, step_id="s", attempt=1, output="o",
                                               metrics=usage).model_dump_json().encode()),
        (topics.runs_events, RunQueued(run_id=run_id, pipeline="p").model_dump_json().encode()),
        (topics.runs_events, RunStarted(run_id=run_id, pipeline="p", version=1)
         .model_dump_json().encode()),
        (topics.runs_events, RunCompleted(run_id=run_id, output="o").model_dump_json().encode()),
        (topics.runs_control, b"not json at all"),
    )  # fmt: skip
    transport = httpx.ASGITransport(app=service.http)
    async with httpx.AsyncClient(transport=transport, base_url="http://recorder") as client:
        run = await _poll(client, f"/runs/{run_id}", lambda r: r["status"] == "succeeded")
        letters = await _poll(client, "/dead-letters", lambda body: body["items"])
    assert (run["pipeline"], run["tokens"], run["output"]) == ("p", 5, "o")
    assert [s["status"] for s in run["steps"]] == ["succeeded"]
    [letter] = letters["items"]
    assert (letter["source_topic"], letter["value"]) == (topics.runs_control, "not json at all")


def test_the_process_serves_its_api_and_stops_cleanly_on_sigterm(
    kafka_bootstrap: str, database_url: str, topic_prefix: str
) -> None:
    port = stack.free_port()
    env = {
        **os.environ,
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_KAFKA_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_DATABASE_URL": database_url,
        "CONVEYOR_RECORDER_PORT": str(port),
        "CONVEYOR_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "CONVEYOR_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "conveyor.run_recorder"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        stack.wait_for_port("127.0.0.1", port, timeout=30)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        listing = httpx.get(f"{base}/runs").json()  # the module's database: runs of other tests
        assert set(listing) == {"items", "next_cursor"}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "run-recorder stopped" in text
    assert "Traceback" not in text


def test_a_missing_database_url_fails_at_start_with_a_hint() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "conveyor.run_recorder"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "CONVEYOR_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
