"""The http kind against a real HTTP server on 127.0.0.1, through the real httpx client."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from faststream.kafka import KafkaBroker

from conveyor.contracts import StepReady
from conveyor.runtime import KafkaSettings
from conveyor.runtime.runner import StepControl, StepHarness
from conveyor.step_runner.http_step import HttpStep, parse_retry_after


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        request = {
            "method": self.command,
            "path": parts.path,
            "query": {k: v[0] for k, v in parse_qs(parts.query).items()},
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body,
        }
        self.server.requests.append(request)
        json_type = {"Content-Type": "application/json"}
        if parts.path == "/echo":
            self._reply(200, json.dumps(request).encode(), json_type)
        elif parts.path == "/text":
            self._reply(200, b"plain hello", {"Content-Type": "text/plain; charset=utf-8"})
        elif parts.path == "/fail":
            self._reply(500, b"database on fire", {"Retry-After": "7", "X-Trace": "abc"})
        elif parts.path == "/busy":
            later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
            self._reply(503, b"busy", {"Retry-After": later})
        elif parts.path == "/missing":
            self._reply(404, b'{"detail": "no such thing"}', json_type)
        elif parts.path == "/redirect":
            self._reply(302, b"", {"Location": "/text"})
        elif parts.path == "/slow":
            time.sleep(1.5)
            self._reply(200, b"late", {})
        else:
            self._reply(418, b"teapot", {})

    do_GET = do_POST = do_PUT = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    requests: list[dict[str, Any]]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out hangs up before /slow answers: expected here


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as http:
        yield http


def _harness(client: httpx.AsyncClient) -> StepHarness:
    return StepHarness(
        broker=KafkaBroker("127.0.0.1:1"),
        topics=KafkaSettings(topic_prefix="unit").topics,
        executors={"http": HttpStep(client)},
        worker="test:1",
    )


async def _run(client: httpx.AsyncClient, config: dict[str, Any], **kw: Any) -> dict[str, Any]:
    step = StepReady(
        run_id=uuid.uuid4(),
        pipeline="p",
        version=1,
        step_id="call",
        attempt=1,
        kind="http",
        config=config,
        context=kw.pop("context", {}),
        **kw,
    )
    return dict(json.loads(await _harness(client).run_step(step)))


async def test_json_response(server: str, client: httpx.AsyncClient) -> None:
    result = await _run(
        client,
        {
            "method": "post",
            "url": f"{server}/echo",
            "json": {"name": "{{ item }}"},
            "params": {"q": "{{ input.q }}", "flag": True},
            "headers": {"x-run": "{{ input.q }}"},
        },
        context={"item": "acme", "input": {"q": "lookup"}},
    )
    assert result["type"] == "StepCompleted", result
    output = result["output"]
    assert output["status"] == 200
    assert output["headers"]["content-type"] == "application/json"
    assert output["text"] is None
    echoed = output["json"]
    assert echoed["method"] == "POST"
    assert json.loads(echoed["body"]) == {"name": "acme"}
    assert echoed["query"] == {"q": "lookup", "flag": "true"}
    assert echoed["headers"]["x-run"] == "lookup"
    assert result["input"]["json"] == {"name": "acme"}


async def test_text_response(server: str, client: httpx.AsyncClient) -> None:
    result = await _run(client, {"url": f"{server}/text"})
    output = result["output"]
    assert (output["status"], output["json"], output["text"]) == (200, None, "plain hello")


async def test_redirect_is_followed(server: str, client: httpx.AsyncClient) -> None:
    result = await _run(client, {"url": f"{server}/redirect"})
    assert result["output"]["text"] == "plain hello"
    kept = await _run(client, {"url": f"{server}/redirect", "follow_redirects": False})
    assert kept["output"]["status"] == 302  # 3xx counts as success when not followed


async def test_raw_body_is_sent(server: str, client: httpx.AsyncClient) -> None:
    result = await _run(client, {"method": "PUT", "url": f"{server}/echo", "body": "a=1"})
    assert result["output"]["json"]["body"] == "a=1"


async def test_server_error_is_retryable_with_retry_after(
    server: str, client: httpx.AsyncClient
) -> None:
    result = await _run(client, {"method": "POST", "url": f"{server}/fail"})
    assert result["type"] == "StepFailed"
    error = result["error"]
    assert error["type"] == "HttpStatusError"
    assert error["message"] == f"POST {server}/fail returned 500 Internal Server Error"
    assert error["retryable"] is True
    assert error["retry_after_s"] == 7
    assert error["details"]["status"] == 500
    assert error["details"]["body"] == "database on fire"
    assert error["details"]["headers"]["x-trace"] == "abc"


async def test_retry_after_as_http_date(server: str, client: httpx.AsyncClient) -> None:
    error = (await _run(client, {"url": f"{server}/busy"}))["error"]
    assert error["retryable"] is True
    assert 100 < error["retry_after_s"] <= 120


async def test_not_found_is_not_retryable(server: str, client: httpx.AsyncClient) -> None:
    error = (await _run(client, {"url": f"{server}/missing"}))["error"]
    assert (error["type"], error["retryable"]) == ("HttpStatusError", False)
    assert "returned 404 Not Found" in error["message"]


async def test_expect_overrides_success(server: str, client: httpx.AsyncClient) -> None:
    accepted = await _run(client, {"url": f"{server}/missing", "expect": [404]})
    assert accepted["type"] == "StepCompleted"
    assert accepted["output"]["json"] == {"detail": "no such thing"}
    refused = await _run(
        client,
        {"url": f"{server}/text", "expect": ["{{ input.code }}"]},
        context={"input": {"code": 201}},
    )
    assert refused["error"]["type"] == "HttpStatusError"


async def test_connection_refused(client: httpx.AsyncClient) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = (await _run(client, {"url": f"http://127.0.0.1:{port}/x"}))["error"]
    assert (error["type"], error["retryable"]) == ("HttpConnectError", True)


async def test_timeout_from_config(server: str, client: httpx.AsyncClient) -> None:
    started = time.monotonic()
    error = (await _run(client, {"url": f"{server}/slow", "timeout": "200ms"}))["error"]
    assert (error["type"], error["retryable"]) == ("HttpTimeout", True)
    assert time.monotonic() - started < 1.4


async def test_step_timeout_bounds_the_request(server: str, client: httpx.AsyncClient) -> None:
    error = (await _run(client, {"url": f"{server}/slow"}, timeout_s=0.2))["error"]
    assert error["type"] == "StepTimeout"
    assert error["retryable"] is True
    assert error["message"] == "step exceeded its 0.2s timeout"


@pytest.mark.parametrize("url", ["http://[::1", "ftp://example.org/file", "not a url"])
async def test_invalid_url_is_not_retryable(client: httpx.AsyncClient, url: str) -> None:
    """Refused by the config check (as at registration), before any request is made."""
    error = (await _run(client, {"url": url}))["error"]
    assert (error["type"], error["retryable"]) == ("ConfigError", False)
    assert "url" in error["message"]


async def test_secret_header_is_sent_but_masked(
    server: str, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_SECRET_CRM_TOKEN", "tok-9f8e7d")
    result = await _run(
        client,
        {"url": f"{server}/echo", "headers": {"authorization": "Bearer {{ secrets.CRM_TOKEN }}"}},
    )
    assert result["output"]["json"]["headers"]["authorization"] == "Bearer ***"
    assert result["input"]["headers"]["authorization"] == "Bearer ***"
    assert "tok-9f8e7d" not in json.dumps(result)


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:01:00 GMT", now=now) == 60.0
    assert parse_retry_after("Wed, 31 Dec 2025 00:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


class _Hang(BaseHTTPRequestHandler):
    """Answers after 5 s unless the client hangs up first; says which, and when."""

    server: _HangServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        began = time.monotonic()
        self.connection.settimeout(0.02)
        while time.monotonic() - began < 5:
            try:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":
                    self.server.outcomes.append(("aborted", time.monotonic() - began))
                    return
            except (TimeoutError, BlockingIOError):
                pass
        self.server.outcomes.append(("served", time.monotonic() - began))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _HangServer(ThreadingHTTPServer):
    outcomes: list[tuple[str, float]]


@pytest.fixture
def hang_server() -> Iterator[_HangServer]:
    httpd = _HangServer(("127.0.0.1", 0), _Hang)
    httpd.outcomes = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


async def _outcome(httpd: _HangServer) -> tuple[str, float]:
    deadline = time.monotonic() + 3
    while not httpd.outcomes:
        assert time.monotonic() < deadline, "the server saw neither an answer nor a hang-up"
        await asyncio.sleep(0.01)
    return httpd.outcomes[0]


async def test_step_timeout_aborts_the_request(
    hang_server: _HangServer, client: httpx.AsyncClient
) -> None:
    url = f"http://127.0.0.1:{hang_server.server_address[1]}/hang"
    error = (await _run(client, {"url": url}, timeout_s=0.3))["error"]
    assert error["type"] == "StepTimeout"
    what, after = await _outcome(hang_server)
    assert what == "aborted"  # the connection was closed, not left to finish
    assert after < 1.0


async def test_cancelled_run_aborts_the_request(
    hang_server: _HangServer, client: httpx.AsyncClient
) -> None:
    url = f"http://127.0.0.1:{hang_server.server_address[1]}/hang"
    step = StepReady(
        run_id=uuid.uuid4(),
        pipeline="p",
        version=1,
        step_id="call",
        attempt=1,
        kind="http",
        config={"url": url},
    )
    control = StepControl()
    task = asyncio.create_task(_harness(client).run_step(step, control=control))
    for _ in range(300):
        if control.executing:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the request is in the server's hands
    assert control.executing
    control.cancelled, control.cancel_reason = True, "changed my mind"
    task.cancel()  # what the dispatcher does on CancelRun
    result = json.loads(await task)
    assert result["type"] == "StepFailed"
    assert result["error"]["type"] == "Cancelled"
    assert result["error"]["message"] == "the run was cancelled: changed my mind"
    what, after = await _outcome(hang_server)
    assert what == "aborted"
    assert after < 1.0
