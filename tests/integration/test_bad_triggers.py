"""Malformed triggers against the real scheduler: through the control API (a 4xx naming
the field, and no run, nothing in the outbox), and produced straight onto the requests
topic of a real broker, where the scheduler and the run recorder run in this process.

On the topic, a request that cannot be a run at all (not JSON, a NaN, a NUL character, an
empty idempotency key) is dead-lettered with the reason and creates no run; a well-formed
request whose input does not fit the pipeline becomes a failed run whose error names the
input. Either way the partition goes on: a good request after them starts its run.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import func, select

from conveyor.contracts import Topics, load_pipeline, run_id_for_request
from conveyor.contracts._limits import MAX_RUN_INPUT_BYTES
from conveyor.run_recorder import RecorderSettings
from conveyor.run_recorder import create_service as create_recorder
from conveyor.runtime import DatabaseSettings, KafkaSettings, create_db_engine, upgrade_schema
from conveyor.scheduler import tables
from conveyor.scheduler.api import create_api
from conveyor.scheduler.main import MIGRATIONS
from conveyor.scheduler.main import create_service as create_scheduler
from conveyor.scheduler.registry import register_pipeline
from conveyor.scheduler.scheduling import Scheduler

NAME = f"typed-{uuid.uuid4().hex[:6]}"
TYPED = f"""
name: {NAME}
input: {{text: {{type: string}}, count: {{type: integer}}}}
steps:
  - {{id: echo, type: transform, with: {{template: "{{{{ input.text }}}}"}}}}
"""
GOOD: dict[str, Any] = {"pipeline": NAME, "input": {"text": "hi", "count": 1}}


@pytest.fixture(scope="module")
def migrated(database_url: str) -> str:
    upgrade_schema(database_url, migrations=Path(MIGRATIONS), schema="scheduler")
    return database_url


@pytest.fixture(scope="module")
async def scheduler(migrated: str) -> AsyncIterator[Scheduler]:
    engine = create_db_engine(DatabaseSettings(url=migrated))
    scheduler = Scheduler(engine=engine, topics=Topics(f"t{uuid.uuid4().hex[:8]}"), relay=None)
    await register_pipeline(scheduler, load_pipeline(TYPED), source_file="typed.yaml")
    yield scheduler
    await engine.dispose()


@pytest.fixture(scope="module")
async def api(scheduler: Scheduler) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_api(scheduler))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client


async def _counts(scheduler: Scheduler) -> tuple[int | None, int | None]:
    async with scheduler.engine.connect() as conn:
        runs = await conn.scalar(select(func.count()).select_from(tables.runs))
        outbox = await conn.scalar(select(func.count()).select_from(tables.outbox))
    return runs, outbox


def _body(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


JSON = {"content-type": "application/json"}
BAD_REQUESTS = {
    # (body, headers, status, where the message is, fragment)
    "not-json": (b'{"pipeline": ', JSON, 422, ["body"], "the body is not valid JSON at character"),
    "not-utf8": (b"\xff\xfe{}", JSON, 422, ["body"], "the body is not valid JSON at character"),
    "empty-body": (b"", JSON, 422, ["body"], "the body is empty"),
    "json-array": (b"[1, 2]", JSON, 422, ["body"], "must be a JSON object, got an array"),
    "wrong-content-type": (
        _body(),
        {"content-type": "text/plain"},
        415,
        ["body"],
        "with content-type: application/json (got text/plain)",
    ),
    "unknown-field": (_body(inputs={}), JSON, 422, ["body", "inputs"], "unknown field 'inputs'"),
    "bad-pipeline-name": (
        _body(pipeline="My Pipe"),
        JSON,
        422,
        ["body", "pipeline"],
        "'My Pipe' is not a pipeline name",
    ),
    "nul-in-pipeline-name": (
        _body(pipeline="ty\x00ped"),
        JSON,
        422,
        ["body", "pipeline"],
        "is not a pipeline name",
    ),
    "unknown-pipeline": (
        _body(pipeline="no-such-pipeline"),
        JSON,
        404,
        None,
        "no pipeline named 'no-such-pipeline' is registered",
    ),
    "unknown-version": (_body(version=9), JSON, 404, None, "has no version 9 (latest: 1)"),
    "version-zero": (
        _body(version=0),
        JSON,
        422,
        ["body", "version"],
        "greater than or equal to 1",
    ),
    "input-not-an-object": (
        _body(input=["hi"]),
        JSON,
        422,
        ["body", "input"],
        "must be a JSON object of name: value, got an array",
    ),
    "missing-required": (_body(input={"count": 1}), JSON, 422, None, "input 'text' is required"),
    "wrong-type": (
        _body(input={"text": "hi", "count": "3"}),
        JSON,
        422,
        None,
        "input 'count' must be integer, got string \"3\"",
    ),
    "undeclared-input": (
        _body(input={**GOOD["input"], "colour": "red"}),
        JSON,
        422,
        None,
        "input 'colour' is not declared by pipeline",
    ),
    "nan-in-input": (
        b'{"pipeline": "%s", "input": {"text": "hi", "count": NaN}}' % NAME.encode(),
        JSON,
        422,
        None,
        "input 'count' is nan, not a finite number",
    ),
    "nul-in-input": (
        _body(input={"text": "a\x00b", "count": 1}),
        JSON,
        422,
        None,
        "input 'text' contains a NUL character",
    ),
    "oversized-input": (
        _body(input={"text": "x" * MAX_RUN_INPUT_BYTES, "count": 1}),
        JSON,
        422,
        None,
        f"the limit is {MAX_RUN_INPUT_BYTES}",
    ),
    "empty-idempotency-key": (
        _body(idempotency_key=""),
        JSON,
        422,
        ["body", "idempotency_key"],
        "at least 1 character",
    ),
    "idempotency-key-control-character": (
        _body(idempotency_key="a\tb"),
        JSON,
        422,
        ["body", "idempotency_key"],
        "no control characters",
    ),
    "idempotency-key-too-long": (
        _body(idempotency_key="k" * 257),
        JSON,
        422,
        ["body", "idempotency_key"],
        "at most 256 characters",
    ),
    "nul-in-requested-by": (
        _body(requested_by="me\x00"),
        JSON,
        422,
        None,
        "requested_by contains a NUL character",
    ),
}


@pytest.mark.parametrize(
    ("body", "headers", "status", "loc", "fragment"),
    list(BAD_REQUESTS.values()),
    ids=list(BAD_REQUESTS),
)
async def test_a_malformed_trigger_is_refused_and_starts_nothing(
    body: bytes,
    headers: dict[str, str],
    status: int,
    loc: list[Any] | None,
    fragment: str,
    api: httpx.AsyncClient,
    scheduler: Scheduler,
) -> None:
    before = await _counts(scheduler)
    response = await api.post("/runs", content=body, headers=headers)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    if loc is None:
        assert isinstance(detail, str)
        assert fragment in detail
    else:
        assert any(d["loc"] == loc and fragment in d["msg"] for d in detail), detail
    assert await _counts(scheduler) == before, "a refused trigger left a run or an event"


async def test_the_same_trigger_done_right_is_accepted(
    api: httpx.AsyncClient, scheduler: Scheduler
) -> None:
    """The rows above fail for the reason they name, not for something in common."""
    runs, outbox = await _counts(scheduler)
    response = await api.post("/runs", content=_body(version=1, idempotency_key="k1"), headers=JSON)
    assert response.status_code == 202, response.text
    assert await _counts(scheduler) == (runs, (outbox or 0) + 1)


# --- straight onto the topic, through a real broker ----------------------------------------

FAST_JOIN = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}


@pytest.fixture
async def services(
    kafka_bootstrap: str, migrated: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Scheduler, httpx.AsyncClient, Topics]]:
    """The scheduler (settings from the environment, as in production) and the recorder,
    each with its consumer group on the real broker, in this process."""
    for name, value in {
        "CONVEYOR_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "CONVEYOR_KAFKA_TOPIC_PREFIX": topic_prefix,
        "CONVEYOR_KAFKA_SESSION_TIMEOUT_MS": "2000",
        "CONVEYOR_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        "CONVEYOR_DATABASE_URL": migrated,
    }.items():
        monkeypatch.setenv(name, value)
    scheduler = create_scheduler()
    recorder = create_recorder(
        kafka=KafkaSettings(bootstrap=kafka_bootstrap, topic_prefix=topic_prefix, **FAST_JOIN),
        database=DatabaseSettings(url=migrated),
        recorder=RecorderSettings(port=0),
    )
    started = []
    try:
        # one after the other: each migrates its schema at start, and Alembic runs one
        # migration per process at a time
        for app in (scheduler.app, recorder.app):
            await app.start()
            started.append(app)
        transport = httpx.ASGITransport(app=recorder.http)
        async with httpx.AsyncClient(transport=transport, base_url="http://recorder") as client:
            yield scheduler.scheduler, client, Topics(topic_prefix)
    finally:
        for app in reversed(started):
            await app.stop()


async def _produce(bootstrap: str, topic: str, values: list[bytes], key: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _poll(
    client: httpx.AsyncClient, path: str, done: Callable[[Any], bool], within: float = 30
) -> Any:
    deadline = time.monotonic() + within
    while True:
        response = await client.get(path)
        if response.status_code == 200 and done(response.json()):
            return response.json()
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: {response.status_code} {response.text[:2000]}")
        await asyncio.sleep(0.1)


async def test_bad_requests_on_the_topic_are_dead_lettered_or_fail_their_run(
    services: tuple[Scheduler, httpx.AsyncClient, Topics], kafka_bootstrap: str
) -> None:
    scheduler, recorder, topics = services
    await register_pipeline(scheduler, load_pipeline(TYPED), source_file="typed.yaml")
    marker = f"m{uuid.uuid4().hex[:8]}"  # in each dead-lettered message, to find them
    unusable = {
        b'{"pipeline": "%s", ' % marker.encode(): "body is not JSON",
        b'{"pipeline": "%s", "input": {"count": NaN}}' % marker.encode(): (
            "input.count is nan, not a finite number"
        ),
        json.dumps({"pipeline": marker, "input": {"text": "a\x00"}}).encode(): (
            "input.text contains a NUL character"
        ),
        json.dumps({"pipeline": marker, "idempotency_key": ""}).encode(): (
            "idempotency_key: String should have at least 1 character"
        ),
    }
    misfits = {  # event id -> (input, what the run's error says)
        uuid.uuid4(): (
            {"count": "3"},
            ["input 'count' must be integer", "input 'text' is required"],
        ),
        uuid.uuid4(): ({**GOOD["input"], "colour": "red"}, ["input 'colour' is not declared"]),
    }
    good = uuid.uuid4()
    values = [
        *unusable,
        *(
            json.dumps({"pipeline": NAME, "input": run_input, "event_id": str(event_id)}).encode()
            for event_id, (run_input, _) in misfits.items()
        ),
        json.dumps({**GOOD, "event_id": str(good)}).encode(),
    ]
    # one key, one partition: the good request comes after every bad one
    await _produce(kafka_bootstrap, topics.runs_requested, values, key=marker.encode())

    for event_id, (_, fragments) in misfits.items():
        run = await _poll(
            recorder,
            f"/runs/{run_id_for_request(event_id)}",
            lambda r: r["status"] == "failed",
        )
        assert run["error"]["type"] == "InvalidInput"
        assert all(f in run["error"]["message"] for f in fragments), run["error"]
    started = await _poll(
        recorder, f"/runs/{run_id_for_request(good)}", lambda r: r["status"] == "running"
    )
    assert started["input"] == GOOD["input"]

    group = f"{topics.prefix}.scheduler"

    def mine(body: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            d
            for d in body["items"]
            if marker in (d["value"] or "") and d["consumer_group"] == group
        ]

    letters = mine(await _poll(recorder, "/dead-letters", lambda b: len(mine(b)) == 4))
    by_value = {letter["value"].encode(): letter for letter in letters}
    for value, reason in unusable.items():
        letter = by_value[value]
        assert letter["source_topic"] == topics.runs_requested
        assert reason in letter["reason"], letter["reason"]
    # the error log files each under the pipeline it names, when the body is JSON at all
    errors = (await recorder.get("/errors", params={"pipeline": marker})).json()["items"]
    assert sorted(e["message"] for e in errors if e["scope"] == "dead_letter") == sorted(
        letter["reason"] for letter in letters if "not JSON" not in letter["reason"]
    )
    async with scheduler.engine.connect() as conn:
        runs = await conn.scalar(
            select(func.count()).select_from(tables.runs).where(tables.runs.c.pipeline == marker)
        )
    assert runs == 0, "a dead-lettered request created a run"
