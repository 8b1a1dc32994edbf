"""The runners as real OS processes against the real broker: StepReady in through a plain
Kafka producer, StepStarted/StepCompleted out through a plain consumer, SIGTERM stops them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from conveyor.cli import stack
from conveyor.contracts import StepReady, Topics


class _Echo(BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []  # noqa: RUF012 - one server per test module

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.seen.append(headers)
        body = json.dumps({"path": self.path, "auth": headers.get("authorization")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


async def _wait_for_line(lines: list[str], text: str, proc: stack.ServiceProcess) -> None:
    deadline = time.monotonic() + 60
    while not any(text in line for line in lines):
        assert proc.alive(), "step-runner exited early:\n" + "\n".join(lines)
        assert time.monotonic() < deadline, f"no {text!r} in:\n" + "\n".join(lines)
        await asyncio.sleep(0.05)


def _step(kind: str, step_id: str, config: dict[str, Any], **kw: Any) -> StepReady:
    return StepReady(
        run_id=uuid.uuid4(),
        pipeline="it",
        version=1,
        step_id=step_id,
        attempt=1,
        kind=kind,
        config=config,
        **kw,
    )


async def test_step_runner_process(
    kafka_bootstrap: str, topic_prefix: str, http_server: str
) -> None:
    topics = Topics(topic_prefix)
    lines: list[str] = []
    proc = stack.ServiceProcess(
        name="step-runner",
        module="conveyor.step_runner",
        env={
            "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "CONVEYOR_KAFKA_TOPIC_PREFIX": topic_prefix,
            "CONVEYOR_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "CONVEYOR_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
            "CONVEYOR_SECRET_IT_TOKEN": "tok-it-4242",
            # every step announces itself, however quick (by default only those still
            # running after 200 ms do)
            "CONVEYOR_RUNNER_ANNOUNCE_AFTER_MS": "0",
        },
        sink=lines.append,
    )
    proc.start()
    try:
        await _wait_for_line(lines, "step-runner started", proc)
        steps = [
            _step(
                "transform",
                "shape",
                {"template": '{"who": "{{ input.who | upper }}"}'},
                context={"input": {"who": "ada"}},
            ),
            _step(
                "http",
                "call",
                {
                    "url": f"{http_server}/lookup",
                    "headers": {"authorization": "Bearer {{ secrets.IT_TOKEN }}"},
                },
                timeout_s=10,
                item_index=0,
            ),
        ]
        consumer = AIOKafkaConsumer(
            topics.steps_completed,
            topics.runs_events,
            bootstrap_servers=kafka_bootstrap,
            auto_offset_reset="earliest",
            group_id=None,
        )
        await consumer.start()
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for step in steps:
                await producer.send_and_wait(
                    topics.ready(step.kind),
                    step.model_dump_json().encode(),
                    key=str(step.run_id).encode(),
                )
            events: dict[str, list[dict[str, Any]]] = {s.step_id: [] for s in steps}
            deadline = time.monotonic() + 30
            while any(len(e) < 2 for e in events.values()):
                assert time.monotonic() < deadline, f"results: {events}\n" + "\n".join(lines)
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        event = json.loads(record.value)
                        assert record.key == event["run_id"].encode()
                        # results on steps.completed, StepStarted on runs.events
                        expected = topics.steps_completed
                        if event["type"] == "StepStarted":
                            expected = topics.runs_events
                        assert record.topic == expected
                        events[event["step_id"]].append(event)
        finally:
            await producer.stop()
            await consumer.stop()

        by_type = {step: {e["type"]: e for e in found} for step, found in events.items()}
        assert sorted(by_type["shape"]) == ["StepCompleted", "StepStarted"]
        shape_done = by_type["shape"]["StepCompleted"]
        assert shape_done["output"] == {"who": "ADA"}
        assert shape_done["worker"].endswith(f":{proc.pid}")

        assert sorted(by_type["call"]) == ["StepCompleted", "StepStarted"]
        call_done = by_type["call"]["StepCompleted"]
        assert call_done["item_index"] == 0
        assert call_done["output"]["status"] == 200
        assert call_done["output"]["json"] == {"path": "/lookup", "auth": "Bearer ***"}
        assert call_done["input"]["headers"]["authorization"] == "Bearer ***"
        assert _Echo.seen[-1]["authorization"] == "Bearer tok-it-4242"
    finally:
        code = proc.stop(timeout=20)
    assert code == 0, "\n".join(lines)
    assert any("step-runner stopped" in line for line in lines)


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    subprocess.run(
        [
            *(imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error"),
            *("-f", "lavfi", "-i", "sine=frequency=440:duration=1", str(tmp_path / "a.wav")),
        ],
        check=True,
    )
    return tmp_path


async def test_media_process(kafka_bootstrap: str, topic_prefix: str, media_root: Path) -> None:
    topics = Topics(topic_prefix)
    lines: list[str] = []
    proc = stack.ServiceProcess(
        name="media",
        module="conveyor.media",
        env={
            "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "CONVEYOR_KAFKA_TOPIC_PREFIX": topic_prefix,
            "CONVEYOR_KAFKA_SESSION_TIMEOUT_MS": "2000",
            "CONVEYOR_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
            "CONVEYOR_MEDIA_ROOT": str(media_root),
            "CONVEYOR_MEDIA_ARTIFACT_DIR": str(media_root / "artifacts"),
            "CONVEYOR_FFPROBE": "off",
        },
        sink=lines.append,
    )
    proc.start()
    try:
        await _wait_for_line(lines, "media started", proc)
        assert any("probing with ffmpeg" in line for line in lines)
        good = _step("media.probe", "probe", {"source": "a.wav"})
        evil = _step("media.probe", "evil", {"source": "../../../etc/passwd"})
        consumer = AIOKafkaConsumer(
            topics.steps_completed,
            bootstrap_servers=kafka_bootstrap,
            auto_offset_reset="earliest",
            group_id=None,
        )
        await consumer.start()
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            for step in (good, evil):
                await producer.send_and_wait(
                    topics.ready("media.probe"),
                    step.model_dump_json().encode(),
                    key=str(step.run_id).encode(),
                )
            results: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + 30
            while len(results) < 2:
                assert time.monotonic() < deadline, f"results: {results}\n" + "\n".join(lines)
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        event = json.loads(record.value)
                        if event["type"] != "StepStarted":
                            results[event["step_id"]] = event
        finally:
            await producer.stop()
            await consumer.stop()
        assert results["probe"]["type"] == "StepCompleted"
        assert results["probe"]["output"]["streams"][0]["sample_rate"] == 44100
        assert results["evil"]["type"] == "StepFailed"
        assert results["evil"]["error"]["type"] == "PathOutsideRoot"
    finally:
        code = proc.stop(timeout=20)
    assert code == 0, "\n".join(lines)
