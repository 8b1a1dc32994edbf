"""The reliability suite's tools: a stack shared by the kill and poison tests, a steady load
of runs, and direct reads of both databases and of the dead-letter topic.

``CONVEYOR_CHAOS_SCALE`` picks the size: ``ci`` (the default, part of ``make test``) or
``full`` (``make chaos``: 200 runs, several rounds of kills).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from psycopg.rows import dict_row

from conveyor.cli import stack
from conveyor.contracts import run_id_for_request
from tests.e2e.conftest import Stack, StepServer, launch_stack

TERMINAL = ("succeeded", "failed", "cancelled", "skipped")
NO_ITEM = -1  # the recorder's item_index of a step that does not fan out


@dataclass(frozen=True)
class Scale:
    """How hard the suite pushes. Deadlines are liveness bounds, not performance figures."""

    name: str
    rate: float
    """Runs triggered a second, from before the first kill until after the last restart."""
    min_runs: int
    max_runs: int
    """The load stops here even if the kills go on (a slow machine restarts slowly)."""
    kill_rounds: int
    kill_spacing_s: float
    """Load between one restarted service being up again and the next kill."""
    step_runners: int
    settle_s: float
    """How long every triggered run gets to end once the load and the kills are over."""
    timeout_s: float
    """pytest-timeout for one test."""


SCALES = {
    "ci": Scale(
        "ci", rate=1.5, min_runs=15, max_runs=40, kill_rounds=1, kill_spacing_s=0.5,
        step_runners=1, settle_s=180, timeout_s=420,
    ),
    "full": Scale(
        "full", rate=3.0, min_runs=200, max_runs=600, kill_rounds=3, kill_spacing_s=3.0,
        step_runners=2, settle_s=600, timeout_s=1800,
    ),
}  # fmt: skip


def chaos_scale() -> Scale:
    name = os.environ.get("CONVEYOR_CHAOS_SCALE", "ci")
    try:
        return SCALES[name]
    except KeyError:
        raise pytest.UsageError(
            f"CONVEYOR_CHAOS_SCALE={name!r}: expected one of {', '.join(SCALES)}"
        ) from None


@pytest.fixture(scope="session")
def scale() -> Scale:
    return chaos_scale()


# --- the pipeline under load -----------------------------------------------------------

PIPELINE = """
name: {name}
input: {{n: {{type: integer}}}}
steps:
  - {{id: first, type: transform, with: {{template: "n={{{{ input.n }}}}"}}}}
  - id: probe
    type: media.probe
    needs: []
    with: {{source: tiny.wav}}
  - id: call
    type: http
    needs: [first]
    with:
      method: POST
      url: "{url}/sleep"
      json: {{seconds: 0.05, echo: "{{{{ input.n }}}}"}}
  - id: last
    type: transform
    needs: [call, probe]
    with: {{template: "{last}"}}
"""
"""Four steps on both runner services: two transforms, an HTTP call whose output differs
each time it runs (timestamps), so that a step run twice with both results kept shows, and a
media probe of a tiny file."""


def write_tiny_wav(path: Path, *, seconds: float = 0.25, rate: int = 8000) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"\x00\x00" * int(seconds * rate))


_LAST = (
    "{{ steps.first.output }} {{ steps.call.output.json.echo }} {{ steps.probe.output.duration }}"
)


def register_pipeline(s: Stack, url: str, prefix: str = "chaos") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    s.register(PIPELINE.format(name=name, url=url, last=_LAST))
    return name


# --- a stack that can take a beating ---------------------------------------------------


class ChaosServer(StepServer):
    """The e2e StepServer plus ``POST /hold-first`` with ``{"key": k, "hold": bool}``: a held
    key's first call waits until ``release`` is set, every other call answers at once with
    the time (so that two runs of one step give two different outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def answer(self, path: str, body: dict[str, Any], calls: int) -> tuple[int, Any]:
        if path == "/hold-first":
            if calls == 1 and body.get("hold") in (True, "True", "true"):
                self.release.wait(300)
            return 200, {"key": body.get("key"), "call": calls, "at": time.time()}
        return super().answer(path, body, calls)


def wait_started(s: Stack, process: stack.ServiceProcess, *, timeout: float = 90) -> None:
    """Until ``process`` says it started: its consumers joined their groups (a service
    killed before that has nothing in flight to lose)."""
    line = f"started (pid {process.pid})"
    wait_until(
        lambda: any(line in out for out in s.output),
        timeout=timeout,
        what=f"{process.name} (pid {process.pid}) started\n{s.tail(40)}",
        interval=0.1,
    )


@dataclass
class ChaosStack:
    stack: Stack
    database_url: str
    step_server: ChaosServer

    def kill_and_restart(self, name: str, *, down_s: float = 0.5) -> None:
        """SIGKILL one running process of ``name``, start a new one ``down_s`` later, and
        wait until it is up."""
        victim = next(p for p in self.stack.services[name] if p.alive())
        victim.kill()
        self.stack.output.append(f"[chaos] SIGKILLed {name} (pid {victim.pid})")
        time.sleep(down_s)
        self.stack.start(name)
        wait_started(self.stack, self.stack.services[name][-1])


@pytest.fixture(scope="package")
def chaos_stack(
    kafka_bootstrap: str,
    postgres_server_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    scale: Scale,
) -> Iterator[ChaosStack]:
    """Scheduler, step-runner(s), media and recorder as OS processes, shared by the kill
    and the poison tests (the poison test runs on what the kills left behind)."""
    name = f"conveyor_chaos_{uuid.uuid4().hex[:12]}"
    database_url = stack.create_database(postgres_server_url, name)
    server = ChaosServer()
    server.start()
    work = tmp_path_factory.mktemp("chaos")
    try:
        with launch_stack(
            kafka_bootstrap=kafka_bootstrap,
            database_url=database_url,
            work=work,
            runners=(*["step-runner"] * scale.step_runners, "media"),
        ) as s:
            write_tiny_wav(s.media_root / "tiny.wav")
            for processes in s.services.values():
                for process in processes:
                    wait_started(s, process)
            yield ChaosStack(stack=s, database_url=database_url, step_server=server)
            server.release.set()
            codes = stop_in_parallel([p for ps in s.services.values() for p in ps if p.alive()])
            assert set(codes.values()) <= {0}, (codes, s.tail(60))
    finally:
        server.release.set()
        server.stop()
        if os.environ.get("CONVEYOR_CHAOS_KEEP_DB"):  # to look into a failure afterwards
            print(f"chaos database kept: {database_url}")  # noqa: T201
        else:
            stack.drop_database(postgres_server_url, name)


def stop_in_parallel(processes: list[stack.ServiceProcess]) -> dict[str, int | None]:
    """SIGTERM them all at once (one by one, each waits for the others' consumer groups to
    settle); the exit status of each, by name and pid."""
    codes: dict[str, int | None] = {}

    def stop(process: stack.ServiceProcess) -> None:
        codes[f"{process.name}:{process.pid}"] = process.stop()

    threads = [threading.Thread(target=stop, args=(p,)) for p in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


# --- a steady load -----------------------------------------------------------------------


@dataclass
class Load:
    """Triggers runs of ``pipeline`` at ``rate`` a second from a thread, through one
    producer, exactly as any Kafka client would, until stopped and at least ``min_runs``
    were triggered (at most ``max_runs``); remembers every run id it asked for."""

    bootstrap: str
    topic: str
    pipeline: str
    min_runs: int
    max_runs: int
    rate: float
    run_ids: list[uuid.UUID] = field(default_factory=list)
    error: BaseException | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="chaos-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop once ``min_runs`` were triggered; raise what the generator ran into."""
        assert self._thread is not None
        self._stop.set()
        self._thread.join(self.min_runs / self.rate + 60)
        assert not self._thread.is_alive(), "the load generator did not finish"
        if self.error is not None:
            raise self.error

    def _main(self) -> None:
        try:
            asyncio.run(self._produce())
        except BaseException as exc:
            self.error = exc

    async def _produce(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await producer.start()
        try:
            began = time.monotonic()
            n = 0
            while n < self.max_runs and (n < self.min_runs or not self._stop.is_set()):
                await asyncio.sleep(max(0.0, began + n / self.rate - time.monotonic()))
                event_id = uuid.uuid4()
                body = {"pipeline": self.pipeline, "input": {"n": n}, "event_id": str(event_id)}
                await producer.send_and_wait(
                    self.topic, json.dumps(body).encode(), key=self.pipeline.encode()
                )
                self.run_ids.append(run_id_for_request(event_id))
                n += 1
        finally:
            await producer.stop()


# --- reading both databases ----------------------------------------------------------------


def query(database_url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        return list(conn.execute(sql, params).fetchall())


def wait_until(
    predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.5
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = predicate()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout:.0f}s")
        time.sleep(interval)


def unfinished(database_url: str, run_ids: list[uuid.UUID]) -> dict[str, list[str]]:
    """Run ids (as text) that the scheduler, or the recorder, does not have as ended."""
    ids = [str(r) for r in run_ids]
    out = {}
    for schema in ("scheduler", "recorder"):
        rows = query(
            database_url,
            f"SELECT id::text AS id FROM {schema}.runs WHERE id::text = ANY(%s) "
            "AND status = ANY(%s)",
            (ids, list(TERMINAL)),
        )
        ended = {r["id"] for r in rows}
        out[schema] = [r for r in ids if r not in ended]
    return out


def describe_runs(database_url: str, run_ids: list[str]) -> str:
    """What each database holds about ``run_ids``: the story of a run that did not end."""
    lines = []
    for run_id in run_ids[:10]:
        state = query(
            database_url,
            "SELECT status, steps FROM scheduler.runs WHERE id::text = %s",
            (run_id,),
        )
        seen = query(
            database_url,
            "SELECT step_id, attempt, status FROM recorder.step_attempts "
            "WHERE run_id::text = %s ORDER BY step_id, attempt",
            (run_id,),
        )
        steps = {
            sid: (st["status"], st["attempt"], st["redeliveries"])
            for sid, st in (state[0]["steps"] if state else {}).items()
        }
        status = state[0]["status"] if state else None
        recorded = [(r["step_id"], r["attempt"], r["status"]) for r in seen]
        lines.append(f"{run_id}: scheduler {status} {steps}; recorder {recorded}")
    return "\n".join(lines)


def history_mismatches(database_url: str, run_ids: list[uuid.UUID]) -> list[str]:
    """Every way the recorder's history of ``run_ids`` differs from the scheduler's state
    (run, steps and fan-out items), or shows a step result recorded more than once; empty
    when they agree."""
    ids = [str(r) for r in run_ids]
    scheduler = {
        r["id"]: r
        for r in query(
            database_url,
            "SELECT id::text AS id, status, output, steps FROM scheduler.runs "
            "WHERE id::text = ANY(%s)",
            (ids,),
        )
    }
    recorder = {
        r["id"]: r
        for r in query(
            database_url,
            "SELECT id::text AS id, status, output FROM recorder.runs WHERE id::text = ANY(%s)",
            (ids,),
        )
    }
    attempts: dict[str, dict[tuple[str, int, int], dict[str, Any]]] = {}
    for row in query(
        database_url,
        "SELECT run_id::text AS run_id, step_id, attempt, item_index, status, output "
        "FROM recorder.step_attempts WHERE run_id::text = ANY(%s)",
        (ids,),
    ):
        key = (row["step_id"], row["attempt"], row["item_index"])
        attempts.setdefault(row["run_id"], {})[key] = row
    doubled = query(
        database_url,
        "SELECT run_id::text AS run_id, payload->>'step_id' AS step_id, "
        "(payload->>'attempt')::int AS attempt, payload->>'item_index' AS item, "
        "count(*) AS n FROM recorder.event_log WHERE run_id::text = ANY(%s) "
        "AND type IN ('StepCompleted', 'StepFailed') AND topic LIKE '%%.steps.completed' "
        "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1",
        (ids,),
    )
    problems = [
        f"run {r['run_id']}: {r['n']} results recorded for step {r['step_id']} "
        f"attempt {r['attempt']} item {r['item']}"
        for r in doubled
    ]
    for run_id in ids:
        state, seen = scheduler.get(run_id), recorder.get(run_id)
        if state is None or seen is None:
            problems.append(f"run {run_id}: scheduler has it: {state is not None}, "
                            f"recorder has it: {seen is not None}")  # fmt: skip
            continue
        if (state["status"], state["output"]) != (seen["status"], seen["output"]):
            problems.append(
                f"run {run_id}: scheduler says {state['status']} {state['output']!r}, "
                f"recorder says {seen['status']} {seen['output']!r}"
            )
        recorded = attempts.get(run_id, {})
        expected: dict[tuple[str, int, int], dict[str, Any]] = {}
        for step_id, step in state["steps"].items():
            if step["attempt"]:  # 0: never dispatched (skipped, or not reached)
                expected[(step_id, step["attempt"], NO_ITEM)] = step
            for index, item in enumerate(step.get("items") or []):
                if item["attempt"]:
                    expected[(step_id, item["attempt"], index)] = item
        for (step_id, attempt, index), want in expected.items():
            where = f"run {run_id}: step {step_id} #{attempt} item {index}"
            row = recorded.get((step_id, attempt, index))
            if row is None:
                problems.append(f"{where}: not in the recorder")
            elif (row["status"], row["output"]) != (want["status"], want["output"]):
                problems.append(
                    f"{where}: scheduler says {want['status']} {want['output']!r}, "
                    f"recorder says {row['status']} {row['output']!r}"
                )
        current = {(step_id, index): attempt for step_id, attempt, index in expected}
        extra = sorted(
            f"{step_id}#{attempt}/{index}"
            for step_id, attempt, index in recorded
            if attempt > current.get((step_id, index), 0)
        )
        if extra:
            problems.append(f"run {run_id}: attempts the scheduler never made: {extra}")
    return problems


# --- the dead-letter topic -----------------------------------------------------------------


def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[list[Any]], bool],
    timeout: float,
) -> list[Any]:
    """Every record of ``topic`` from the beginning (no consumer group), read until
    ``until(records)`` holds or ``timeout`` passes; the records either way."""

    async def read() -> list[Any]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=4 << 20,
        )
        await consumer.start()
        try:
            await consumer.topics()  # fresh metadata
            tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            records: list[Any] = []
            deadline = time.monotonic() + timeout
            while not until(records) and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                for part in batch.values():
                    records.extend(part)
            return records
        finally:
            await consumer.stop()

    return asyncio.run(read())
