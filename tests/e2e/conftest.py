"""A whole Conveyor stack for end-to-end tests: every service as its own OS process,
against the real broker and a real PostgreSQL, isolated by topic prefix and database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from conveyor.cli import stack
from conveyor.contracts import Topics
from conveyor.testing.fake_llm import FakeLLMServer

SERVICE_TIMINGS = {
    # Fast group joins on the embedded broker: a join takes about half the session timeout.
    "CONVEYOR_KAFKA_SESSION_TIMEOUT_MS": "2000",
    "CONVEYOR_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
}


@dataclass
class Stack:
    bootstrap: str
    topics: Topics
    api_url: str
    recorder_url: str
    media_root: Path
    trace_file: Path
    env: dict[str, str]
    services: dict[str, list[stack.ServiceProcess]] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)

    # --- driving it -------------------------------------------------------------------

    def register(
        self,
        source: str,
        filename: str = "test.yaml",
        *,
        prompts: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body = {"source": source, "filename": filename, "prompts": prompts or {}}
        response = httpx.post(f"{self.api_url}/pipelines", json=body, timeout=30)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def produce(self, topic: str, value: bytes, *, key: bytes | None = None) -> None:
        """Publish raw bytes with a plain aiokafka producer, as any client would."""

        async def send() -> None:
            producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(topic, value, key=key)
            finally:
                await producer.stop()

        asyncio.run(send())

    def read_all(self, topic: str) -> list[dict[str, Any]]:
        """Every message on ``topic`` so far, decoded, with a plain consumer (no group)."""

        async def read() -> list[dict[str, Any]]:
            consumer = AIOKafkaConsumer(
                topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest"
            )
            await consumer.start()
            try:
                ends = await consumer.end_offsets(list(consumer.assignment()))
                found: list[dict[str, Any]] = []
                while True:
                    behind = [tp for tp, end in ends.items() if await consumer.position(tp) < end]
                    if not behind:
                        return found
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        found.extend(json.loads(r.value) for r in records)
            finally:
                await consumer.stop()

        return asyncio.run(read())

    def trigger(self, pipeline: str, run_input: dict[str, Any] | None = None) -> uuid.UUID:
        """A trigger exactly as the README shows it, with a chosen event id so that the run
        id is known: run_id_for_request(event_id)."""
        from conveyor.contracts import run_id_for_request

        event_id = uuid.uuid4()
        body = {"pipeline": pipeline, "input": run_input or {}, "event_id": str(event_id)}
        self.produce(self.topics.runs_requested, json.dumps(body).encode(), key=pipeline.encode())
        return run_id_for_request(event_id)

    # --- reading the recorder ---------------------------------------------------------

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.recorder_url}{path}", params=params, timeout=10)

    def wait_for_run(
        self,
        run_id: uuid.UUID,
        *,
        statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled", "skipped"),
        timeout: float = 30,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            response = self.get(f"/runs/{run_id}")
            if response.status_code == 200:
                last = response.json()
                if last["status"] in statuses:
                    return dict(last)
            time.sleep(0.1)
        raise AssertionError(
            f"run {run_id} not {statuses} after {timeout}s; last seen: {last}\n{self.tail()}"
        )

    def wait_for(self, path: str, predicate: Any, *, timeout: float = 30, **params: Any) -> Any:
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            response = self.get(path, **params)
            if response.status_code == 200:
                body = response.json()
                if predicate(body):
                    return body
            time.sleep(0.1)
        raise AssertionError(f"{path} never matched; last body: {body}\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output[-lines:])

    # --- processes --------------------------------------------------------------------

    def start(self, name: str, *, count: int = 1, extra_env: dict[str, str] | None = None) -> None:
        for _ in range(count):
            process = stack.ServiceProcess(
                name,
                stack.SERVICES[name],
                {**self.env, **(extra_env or {})},
                sink=self.output.append,
            )
            process.start()
            self.services.setdefault(name, []).append(process)

    def stop_all(self) -> dict[str, list[int | None]]:
        """Stop what still runs; the exit status of each (a graceful stop gives 0)."""
        codes: dict[str, list[int | None]] = {}
        for name, processes in self.services.items():
            codes[name] = [p.stop() for p in processes if p.alive()]
        return codes


def _wait_healthy(url: str, stack_: Stack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy after {timeout}s\n{stack_.tail(80)}")


@contextlib.contextmanager
def launch_stack(
    *,
    kafka_bootstrap: str,
    database_url: str,
    work: Path,
    extra_env: dict[str, str] | None = None,
    schedulers: int = 1,
    runners: tuple[str, ...] = ("step-runner", "media"),
) -> Iterator[Stack]:
    """Every service as its own process on a fresh topic prefix; at the end each must stop
    gracefully (exit status 0). Extra schedulers run without a control API."""
    prefix = f"e{uuid.uuid4().hex[:10]}"
    media_root = work / "media"
    media_root.mkdir(exist_ok=True)
    api_port, recorder_port = stack.free_port(), stack.free_port()
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_KAFKA_TOPIC_PREFIX": prefix,
        "CONVEYOR_DATABASE_URL": database_url,
        "CONVEYOR_API_PORT": str(api_port),
        "CONVEYOR_RECORDER_PORT": str(recorder_port),
        "CONVEYOR_MEDIA_ROOT": str(media_root),
        "CONVEYOR_MEDIA_ARTIFACT_DIR": str(work / "artifacts"),
        "CONVEYOR_TRACE_FILE": str(work / "spans.jsonl"),
        **SERVICE_TIMINGS,
        **(extra_env or {}),
    }
    s = Stack(
        bootstrap=kafka_bootstrap,
        topics=Topics(prefix),
        api_url=f"http://127.0.0.1:{api_port}",
        recorder_url=f"http://127.0.0.1:{recorder_port}",
        media_root=media_root,
        trace_file=work / "spans.jsonl",
        env=env,
    )
    # The scheduler first: it migrates its schema and creates every topic.
    s.start("scheduler")
    _wait_healthy(s.api_url, s)
    for _ in range(schedulers - 1):
        s.start("scheduler", extra_env={"CONVEYOR_API_PORT": "0"})
    for name in (*runners, "run-recorder"):
        s.start(name)
    _wait_healthy(s.recorder_url, s)
    try:
        yield s
    finally:
        codes = s.stop_all()
        (work / "services.log").write_text("\n".join(s.output))
        assert all(code == 0 for group in codes.values() for code in group), (codes, s.tail(60))


@pytest.fixture(scope="module")
def conveyor_stack(
    kafka_bootstrap: str,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    fake_llm_server: FakeLLMServer,
) -> Iterator[Stack]:
    # LLM steps talk to the fake provider, as `make demo` does without an API key.
    llm = {
        "OPENAI_BASE_URL": fake_llm_server.openai_base_url,
        "OPENAI_API_KEY": "fake",
        "ANTHROPIC_BASE_URL": fake_llm_server.anthropic_base_url,
        "ANTHROPIC_API_KEY": "fake",
    }
    with launch_stack(
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        work=tmp_path_factory.mktemp("stack"),
        extra_env=llm,
    ) as s:
        yield s


class StepServer:
    """A local HTTP server for steps to call: slow, flaky and counting endpoints.

    - ``POST /sleep`` with ``{"seconds": s}`` answers after ``s`` seconds;
    - ``POST /flaky`` with ``{"key": k, "failures": n}`` answers 500 n times per key, then 200;
    - ``POST /check`` with ``{"value": v}`` answers 200 when v == "good", else 400;
    - every request is counted, with the most requests seen in flight at once per ``group``.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(
                    self.rfile.read(int(self.headers["content-length"] or 0)) or b"{}"
                )
                group = str(body.get("group", self.path))
                with owner.lock:
                    owner.in_flight[group] = owner.in_flight.get(group, 0) + 1
                    owner.max_in_flight[group] = max(
                        owner.max_in_flight.get(group, 0), owner.in_flight[group]
                    )
                    key = str(body.get("key", self.path))
                    owner.calls[key] = owner.calls.get(key, 0) + 1
                    calls = owner.calls[key]
                try:
                    status, payload = owner.answer(self.path, body, calls)
                finally:
                    with owner.lock:
                        owner.in_flight[group] -= 1
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the caller gave up (a timeout or a cancel)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def answer(self, path: str, body: dict[str, Any], calls: int) -> tuple[int, Any]:
        started = time.time()
        if path == "/sleep":
            time.sleep(float(body.get("seconds", 1)))
            return 200, {"started": started, "finished": time.time(), "echo": body.get("echo")}
        if path == "/flaky":
            if calls <= int(body.get("failures", 0)):
                return 500, {"error": f"call {calls} fails"}
            return 200, {"calls": calls}
        if path == "/check":
            ok = body.get("value") == "good"
            return (200 if ok else 400), {"value": body.get("value")}
        return 404, {"error": path}

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def step_server() -> Iterator[StepServer]:
    server = StepServer()
    server.start()
    yield server
    server.stop()
