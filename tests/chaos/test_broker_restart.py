"""The broker goes away and comes back empty (the embedded broker keeps everything in
memory). Services supervised as ``conveyor up`` supervises them stay up through the outage
and say so, answer their APIs, then, finding their topics gone, exit with status 75 and are
restarted; the run that was in flight is dispatched again and completes, and so does a new
one."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.cli import stack
from conveyor.contracts import Topics
from conveyor.runtime import KafkaSettings, ensure_topics
from conveyor.runtime.watchdog import EXIT_BROKER_LOST_DATA, BrokerWatchdog
from tests.chaos.conftest import wait_until
from tests.e2e.conftest import SERVICE_TIMINGS, Stack, StepServer

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

SERVICES = ("scheduler", "step-runner", "run-recorder")

PIPELINE = """
name: {name}
input: {{n: {{type: integer}}}}
steps:
  - {{id: first, type: transform, with: {{template: "{{{{ input.n }}}}"}}}}
  - id: wait
    type: http
    with:
      method: POST
      url: "{url}/slow-once"
      json: {{key: "{{{{ input.n }}}}"}}
      timeout: 300
  - {{id: last, type: transform, with: {{template: "done {{{{ input.n }}}}"}}}}
"""
"""The HTTP step has no step timeout (the one under ``with`` is the request's), so no
deadline would ever dispatch it again: only the recovery after the broker's loss can."""


class SlowOnce(StepServer):
    """``POST /slow-once`` with ``{"key": k}`` hangs the first call for ``hold_key`` until
    ``release`` is set, and answers every other call at once: the attempt in flight when
    the broker goes is still running when its runner exits, so its result is never sent;
    only a new dispatch can finish it."""

    def __init__(self, hold_key: str) -> None:
        super().__init__()
        self.hold_key = hold_key
        self.release = threading.Event()

    def answer(self, path: str, body: dict[str, Any], calls: int) -> tuple[int, Any]:
        if path == "/slow-once":
            if calls == 1 and str(body.get("key")) == self.hold_key:
                self.release.wait(300)
            return 200, {"calls": calls}
        return super().answer(path, body, calls)


@dataclass
class Supervised:
    stack: Stack
    supervisor: stack.Supervisor
    broker: stack.Broker
    log_file: Path

    def restart_broker(self) -> None:
        self.broker = stack.start_broker(self.broker.port, log_file=self.log_file)

    def started(self, name: str) -> int:
        return sum(f"{name} started (pid" in line for line in self.stack.output)


@pytest.fixture
def supervised(database_url: str, tmp_path: Path) -> Iterator[Supervised]:
    """A broker of its own, and the services under the supervisor ``conveyor up`` uses."""
    log_file = tmp_path / "tansu.log"
    broker = stack.start_broker(log_file=log_file)
    prefix = f"b{uuid.uuid4().hex[:10]}"
    api_port, recorder_port = stack.free_port(), stack.free_port()
    env = {
        "CONVEYOR_KAFKA_BOOTSTRAP": broker.bootstrap,
        "CONVEYOR_KAFKA_TOPIC_PREFIX": prefix,
        "CONVEYOR_DATABASE_URL": database_url,
        "CONVEYOR_API_PORT": str(api_port),
        "CONVEYOR_RECORDER_PORT": str(recorder_port),
        "CONVEYOR_TRACE_FILE": str(tmp_path / "spans.jsonl"),
        **SERVICE_TIMINGS,
    }
    s = Stack(
        bootstrap=broker.bootstrap,
        topics=Topics(prefix),
        api_url=f"http://127.0.0.1:{api_port}",
        recorder_url=f"http://127.0.0.1:{recorder_port}",
        media_root=tmp_path,
        trace_file=tmp_path / "spans.jsonl",
        env=env,
    )
    processes = [
        stack.ServiceProcess(name, stack.SERVICES[name], env, sink=s.output.append)
        for name in SERVICES
    ]
    s.services = {p.name: [p] for p in processes}
    supervisor = stack.Supervisor(processes, echo=s.output.append)
    supervised = Supervised(stack=s, supervisor=supervisor, broker=broker, log_file=log_file)
    supervisor.start()
    try:
        yield supervised
    finally:
        supervisor.stop()
        supervised.broker.stop()
        (tmp_path / "services.log").write_text("\n".join(s.output))


def _up(s: Supervised, *, times: int) -> None:
    """Every service has started ``times`` times, and both APIs answer."""
    wait_until(
        lambda: all(s.started(name) >= times for name in SERVICES),
        timeout=120,
        what=f"every service started {times} time(s)\n{s.stack.tail(60)}",
    )
    for url in (s.stack.api_url, s.stack.recorder_url):
        wait_until(lambda u=url: _answers(f"{u}/healthz"), timeout=60, what=f"{url} answers")


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_services_ride_out_a_broker_restart_and_runs_complete_after_it(
    supervised: Supervised,
) -> None:
    s = supervised.stack
    server = SlowOnce(hold_key="2")
    server.start()
    try:
        _up(supervised, times=1)
        name = f"outage-{uuid.uuid4().hex[:6]}"
        s.register(PIPELINE.format(name=name, url=server.url))
        assert s.wait_for_run(s.trigger(name, {"n": 1}), timeout=60)["status"] == "succeeded"

        in_flight = s.trigger(name, {"n": 2})
        s.wait_for(
            f"/runs/{in_flight}",
            lambda r: any(
                (st["step_id"], st["status"]) == ("wait", "running") for st in r["steps"]
            ),
            timeout=60,
        )
        supervised.broker.stop()
        outage = f"broker {s.bootstrap} unreachable"
        wait_until(
            lambda: all(
                any(line.startswith(f"[{n}]") and outage in line for line in s.output)
                for n in SERVICES
            ),
            timeout=30,
            what=f"every service reported the outage\n{s.tail(40)}",
        )
        # Through the outage: nobody crashed, and the APIs answer (the history is there).
        time.sleep(1)
        assert all(p.alive() for p in supervised.supervisor.services), s.tail(40)
        assert sum(supervised.supervisor.restarts.values()) == 0
        assert s.get(f"/runs/{in_flight}").status_code == 200
        assert _answers(f"{s.api_url}/healthz")

        supervised.restart_broker()  # same port, no topics, no offsets, no groups
        _up(supervised, times=2)
        lost = f"exited with status {EXIT_BROKER_LOST_DATA}"
        for n in SERVICES:
            assert any(line.startswith(f"[supervisor] {n} {lost}") for line in s.output), n
            assert any(line.startswith(f"[{n}]") and "no longer has topic" in line
                       for line in s.output), n  # fmt: skip

        after = s.wait_for_run(s.trigger(name, {"n": 3}), timeout=120)
        assert (after["status"], after["output"]) == ("succeeded", "done 3")
        run = s.wait_for_run(in_flight, timeout=120)
        assert (run["status"], run["output"]) == ("succeeded", "done 2"), run
        assert server.calls["2"] == 2  # the lost attempt, and its new dispatch
        assert any("dispatching the 1 attempt(s) in flight again" in line for line in s.output)
        # One restart each: the outage itself caused none, and none followed.
        assert supervised.supervisor.restarts == dict.fromkeys(SERVICES, 1), s.tail(60)
    finally:
        server.release.set()
        server.stop()


async def test_the_watchdog_reports_an_outage_once_then_the_topics_the_broker_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log_file = tmp_path / "tansu.log"
    broker = stack.start_broker(log_file=log_file)
    try:
        kafka = KafkaSettings(bootstrap=broker.bootstrap)
        await ensure_topics(kafka, ["w.one", "w.two"])
        lost: list[str] = []
        dog = BrokerWatchdog(
            bootstrap=broker.bootstrap,
            topics=["w.one", "w.two"],
            service="test",
            probe_timeout_s=2,
            on_lost_topics=lost.append,
        )
        await dog.check()
        assert (dog.unreachable_since, lost) == (None, [])
        broker.stop()
        for _ in range(3):
            await dog.check()
        assert dog.unreachable_since is not None
        said = [r.getMessage() for r in caplog.records if r.name.endswith("watchdog")]
        assert len(said) == 1, said  # once, not once a probe
        assert said[0].startswith(f"broker {broker.bootstrap} unreachable")
        broker = stack.start_broker(broker.port, log_file=log_file)  # empty
        await dog.check()
        assert dog.unreachable_since is None
        [message] = lost
        assert "no longer has topic(s) w.one, w.two that test reads" in message
        assert f"status {EXIT_BROKER_LOST_DATA}" in message
    finally:
        broker.stop()
