"""``local_stack`` (what ``conveyor up`` and ``conveyor demo`` run) with stand-in services.

The broker and the database are the real embedded ones; the services are tiny stand-ins
(``python -m`` packages written to a temporary directory) that serve ``/healthz`` on the
port they are given, report the environment they were started with, and note a graceful
SIGTERM. That checks the wiring (topics, env, ports, supervision, shutdown) without
depending on the services themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from conveyor.cli.errors import StackError
from conveyor.cli.stack import free_port
from conveyor.cli.up import local_stack
from conveyor.contracts import RUNNER_KINDS, Topics

_SERVICE = """
import http.server, json, os, signal, sys, threading

role = {role!r}
markers = os.environ["FAKE_MARKERS"]
print(f"{{role}} starting pid={{os.getpid()}}", flush=True)


def stopped(*_):
    open(os.path.join(markers, f"{{os.getpid()}}.stopped"), "w").close()
    print(f"{{role}} stopping", flush=True)
    os._exit(0)


signal.signal(signal.SIGTERM, stopped)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {{"status": "ok"}} if self.path == "/healthz" else dict(os.environ)
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


port_variable = {port_variable!r}
if port_variable:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ[port_variable])), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
print(f"{{role}} ready", flush=True)
threading.Event().wait()
"""

_ENV_TO_CLEAR = (
    "CONVEYOR_KAFKA_BOOTSTRAP",
    "CONVEYOR_DATABASE_URL",
    "CONVEYOR_KAFKA_TOPIC_PREFIX",
    "CONVEYOR_MEDIA_ROOT",
    "CONVEYOR_API_URL",
    "CONVEYOR_RECORDER_URL",
    "CONVEYOR_KAFKA_SESSION_TIMEOUT_MS",
    "CONVEYOR_KAFKA_HEARTBEAT_INTERVAL_MS",
)


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Stand-in packages for the four services, importable here and in the children."""
    root = tmp_path / "fakes"
    roles = {
        "scheduler": ("fake_scheduler", "CONVEYOR_API_PORT"),
        "run-recorder": ("fake_recorder", "CONVEYOR_RECORDER_PORT"),
        "step-runner": ("fake_step_runner", None),
        "media": ("fake_media", None),
    }
    for role, (package, port_variable) in roles.items():
        directory = root / package
        directory.mkdir(parents=True)
        (directory / "__init__.py").write_text("")
        (directory / "__main__.py").write_text(
            _SERVICE.format(role=role, port_variable=port_variable)
        )
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.syspath_prepend(str(root))
    for variable in _ENV_TO_CLEAR:
        monkeypatch.delenv(variable, raising=False)
    return {
        "modules": {role: package for role, (package, _) in roles.items()},
        "extra_env": {"PYTHONPATH": str(root), "FAKE_MARKERS": str(markers)},
        "markers": markers,
    }


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _topics(bootstrap: str) -> set[str]:
    async def list_topics() -> set[str]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    return asyncio.run(list_topics())


def _partitions(bootstrap: str, topic: str) -> int:
    async def count() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
        await consumer.start()
        try:
            await consumer.topics()
            return len(consumer.partitions_for_topic(topic) or ())
        finally:
            await consumer.stop()

    return asyncio.run(count())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child still answers signal 0; its state says it is gone
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.fixture
def home() -> Iterator[Path]:
    """Outside pytest's base temp: pytest makes that 0700 at every session start, which
    locks the embedded PostgreSQL (run as its own user when we are root) out mid-test."""
    path = Path(tempfile.mkdtemp(prefix="conveyor-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_local_stack_starts_wires_supervises_and_stops_everything(
    fakes: dict[str, Any], home: Path
) -> None:
    with local_stack(
        home=home,
        quiet=True,
        runners=2,
        free_ports=True,
        modules=fakes["modules"],
        extra_env=fakes["extra_env"],
        ready_timeout=30,
    ) as stack:
        assert stack.embedded_broker
        assert stack.embedded_database
        assert _get_json(f"{stack.api_url}/healthz") == {"status": "ok"}
        assert _get_json(f"{stack.recorder_url}/healthz") == {"status": "ok"}
        names = sorted(p.name for p in stack.processes)
        assert names == ["media", "run-recorder", "scheduler", "step-runner-1", "step-runner-2"]

        # every service got the same wiring
        env = _get_json(f"{stack.api_url}/env")
        assert env["CONVEYOR_KAFKA_BOOTSTRAP"] == stack.bootstrap
        assert env["CONVEYOR_KAFKA_TOPIC_PREFIX"] == "conveyor"
        assert env["CONVEYOR_API_PORT"] == stack.api_url.rsplit(":", 1)[1]
        assert env["CONVEYOR_RECORDER_PORT"] == stack.recorder_url.rsplit(":", 1)[1]
        assert env["CONVEYOR_MEDIA_ROOT"] == str((home / "media").resolve())
        assert Path(env["CONVEYOR_MEDIA_ROOT"]).is_dir()
        assert env["CONVEYOR_KAFKA_SESSION_TIMEOUT_MS"] == "2000"
        assert env["CONVEYOR_KAFKA_HEARTBEAT_INTERVAL_MS"] == "500"
        with psycopg.connect(env["CONVEYOR_DATABASE_URL"], connect_timeout=5) as conn:
            row = conn.execute("SELECT current_database()").fetchone()
        assert row == ("conveyor",)

        # the topics exist before any service starts, ready topics included
        topics = Topics("conveyor")
        expected = set(topics.core()) | {
            topics.ready(kind) for kinds in RUNNER_KINDS.values() for kind in kinds
        }
        assert expected <= _topics(stack.bootstrap)
        # on the embedded broker: a partition per step-runner (at least 2), not 6
        assert env["CONVEYOR_KAFKA_PARTITIONS"] == "2"
        assert {_partitions(stack.bootstrap, t) for t in expected} == {2}

        # service output goes to a log file per process
        log = (stack.logs / "step-runner-2.log").read_text()
        assert "step-runner ready" in log

        # a crashed service is restarted, and the restart is logged
        runner = next(p for p in stack.processes if p.name == "step-runner-1")
        first_pid = runner.pid
        runner.kill()
        deadline = time.monotonic() + 15
        log_file = stack.logs / "step-runner-1.log"
        while not (
            runner.alive()
            and runner.pid != first_pid
            and log_file.read_text().count("step-runner ready") == 2
        ):
            assert time.monotonic() < deadline, "the crashed runner was not restarted"
            time.sleep(0.1)
        assert stack.supervisor.restarts["step-runner-1"] == 1
        supervisor_log = (stack.logs / "supervisor.log").read_text()
        assert "step-runner-1 exited with status -9; restarting" in supervisor_log

        pids = [p.pid for p in stack.processes]
        broker_pid = _broker_pid(stack.bootstrap)
        pg_pid = _postgres_pid(home / "pg")
        assert broker_pid is not None
        assert pg_pid is not None
        # each runs in a session of its own, so a Ctrl-C in the terminal reaches `up` alone
        ours = os.getsid(0)
        assert all(os.getsid(pid) != ours for pid in [*pids, broker_pid, pg_pid] if pid)

    # on the way out: services got SIGTERM, then the broker and PostgreSQL were stopped
    stopped = {int(p.name.split(".")[0]) for p in fakes["markers"].iterdir()}
    assert set(pids) <= stopped
    assert not any(_alive(pid) for pid in pids if pid is not None)
    assert not _alive(broker_pid)
    assert not _alive(pg_pid)


def _broker_pid(bootstrap: str) -> int | None:
    port = bootstrap.rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"broker" in cmdline and f"tcp://127.0.0.1:{port}".encode() in cmdline:
            return int(proc.name)
    return None


def _postgres_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def test_a_busy_port_is_named_unless_free_ports_are_allowed(
    fakes: dict[str, Any], tmp_path: Path, busy_port: int
) -> None:
    url = f"http://127.0.0.1:{busy_port}"
    with (
        pytest.raises(StackError, match=f"port {busy_port} \\(control API\\) is already in use"),
        local_stack(home=tmp_path, quiet=True, api_url=url, modules=fakes["modules"]),
    ):
        pass
    assert not (tmp_path / "pg").exists(), "nothing should start when a port is busy"


def test_the_embedded_broker_port_falls_back_to_a_free_one(
    fakes: dict[str, Any], home: Path, busy_port: int
) -> None:
    with local_stack(
        home=home,
        quiet=True,
        services=["step-runner"],
        broker_port=busy_port,
        free_ports=True,
        modules=fakes["modules"],
        extra_env=fakes["extra_env"],
    ) as stack:
        assert stack.bootstrap != f"127.0.0.1:{busy_port}"
        assert [p.name for p in stack.processes] == ["step-runner"]


def test_a_service_that_cannot_run_is_reported_before_anything_starts(tmp_path: Path) -> None:
    with (
        pytest.raises(StackError, match="service scheduler cannot start: `python -m nope_x`"),
        local_stack(
            home=tmp_path, quiet=True, modules={"scheduler": "nope_x"}, services=["scheduler"]
        ),
    ):
        pass


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_conveyor_up_runs_until_a_signal_then_stops_everything_and_exits_0(
    fakes: dict[str, Any], home: Path, kafka_bootstrap: str, stop_signal: signal.Signals
) -> None:
    """The real command in a real process, with the stand-ins in place of the services."""
    api_port, recorder_port = free_port(), free_port()
    swap = f"import conveyor.cli.stack as s; s.SERVICES.update({fakes['modules']!r})"
    env = {
        **os.environ,
        **fakes["extra_env"],
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_KAFKA_TOPIC_PREFIX": f"up{uuid.uuid4().hex[:8]}",
        "CONVEYOR_API_URL": f"http://127.0.0.1:{api_port}",
        "CONVEYOR_RECORDER_URL": f"http://127.0.0.1:{recorder_port}",
    }
    code = f"{swap}; from conveyor.cli.main import main; main()"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "up", "--home", str(home), "--runners", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(ln) for ln in process.stdout or []], daemon=True
    ).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any(ln.startswith("ready") for ln in seen):
            assert process.poll() is None, "".join(seen)
            assert time.monotonic() < deadline, "".join(seen)
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=0.5))
        assert _get_json(f"http://127.0.0.1:{api_port}/healthz") == {"status": "ok"}
        assert _get_json(f"http://127.0.0.1:{recorder_port}/healthz") == {"status": "ok"}
        env_seen = _get_json(f"http://127.0.0.1:{api_port}/env")
        # a broker from the environment keeps Kafka's own session timeout
        assert "CONVEYOR_KAFKA_SESSION_TIMEOUT_MS" not in env_seen
        assert env_seen["CONVEYOR_KAFKA_BOOTSTRAP"] == kafka_bootstrap
        pg_pid = _postgres_pid(home / "pg")
        assert pg_pid is not None

        process.send_signal(stop_signal)
        status = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(seen) + "".join(_drain(lines))
    assert status == 0, output
    assert output.rstrip().endswith("stopped")
    assert len(list(fakes["markers"].iterdir())) == 5, output
    assert not _alive(pg_pid)


def _drain(lines: queue.Queue[str]) -> list[str]:
    drained = []
    time.sleep(0.2)
    while True:
        try:
            drained.append(lines.get_nowait())
        except queue.Empty:
            return drained
