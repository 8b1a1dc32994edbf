"""The recorder's HTTP API over a real PostgreSQL, through httpx's ASGI transport: the JSON
shapes users script against, keyset pagination, filters and errors."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contracts import (
    DeadLetter,
    ErrorInfo,
    Event,
    PipelineRegistered,
    RunCompleted,
    RunFailed,
    RunQueued,
    RunStarted,
    StepCompleted,
    StepFailed,
    StepMetrics,
    StepScheduled,
    StepStarted,
)
from conveyor.run_recorder import MIGRATIONS, create_api, record_event
from conveyor.runtime import DatabaseSettings, create_db_engine, upgrade_schema

T0 = datetime(2025, 5, 1, 8, 0, tzinfo=UTC)

SUMMARY_KEYS = {
    "id", "pipeline", "version", "status", "requested_at", "started_at", "finished_at",
    "duration_ms", "tokens", "cost", "error", "retries",
}  # fmt: skip
STEP_KEYS = {
    "step_id", "attempt", "item_index", "status", "kind", "input", "output", "error", "reason",
    "worker", "scheduled_at", "started_at", "finished_at", "duration_ms", "metrics",
}  # fmt: skip


@dataclass(frozen=True)
class Origin:
    topic: str
    partition: int = 0
    offset: int = 0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def aware(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    upgrade_schema(database_url, migrations=MIGRATIONS, schema="recorder")
    engine = create_db_engine(DatabaseSettings(url=database_url))
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
async def client(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_api(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://recorder") as client:
        yield client


async def record(engine: AsyncEngine, *events: Event) -> None:
    for event in events:
        await record_event(engine, event, Origin("conveyor.runs.events"))


async def get(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


async def test_healthz(client: httpx.AsyncClient) -> None:
    assert await get(client, "/healthz") == {"status": "ok"}


async def test_runs_are_paged_newest_first_with_a_cursor(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    pipeline = unique("paged")
    ids = [uuid.uuid4() for _ in range(7)]
    # two runs share a requested_at: the keyset's id breaks the tie, none is lost
    times = [at(0), at(1), at(2), at(2), at(3), at(4), at(5)]
    for run_id, when in zip(ids, times, strict=True):
        await record(engine, RunQueued(run_id=run_id, pipeline=pipeline, requested_at=when))
    expected = [str(i) for _, i in sorted(zip(times, ids, strict=True), reverse=True)]

    seen: list[str] = []
    pages = 0
    cursor = None
    while True:
        params: dict[str, Any] = {"pipeline": pipeline, "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = await get(client, "/runs", **params)
        pages += 1
        assert all(set(item) == SUMMARY_KEYS for item in page["items"])
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == expected


async def test_runs_filter_by_pipeline_and_status(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    pipeline, other = unique("filtered"), unique("other")
    done, running, elsewhere = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await record(
        engine,
        RunQueued(run_id=done, pipeline=pipeline, occurred_at=at(0)),
        RunStarted(run_id=done, pipeline=pipeline, version=1, occurred_at=at(1)),
        RunCompleted(run_id=done, output={"ok": True}, occurred_at=at(3.5)),
        RunQueued(run_id=running, pipeline=pipeline, occurred_at=at(1)),
        RunStarted(run_id=running, pipeline=pipeline, version=1, occurred_at=at(2)),
        RunQueued(run_id=elsewhere, pipeline=other, occurred_at=at(2)),
        RunCompleted(run_id=elsewhere, occurred_at=at(3)),
    )
    page = await get(client, "/runs", pipeline=pipeline, status="succeeded")
    assert [item["id"] for item in page["items"]] == [str(done)]
    [item] = page["items"]
    assert item["duration_ms"] == 2500
    assert item["version"] == 1
    assert aware(item["finished_at"]) == at(3.5)
    page = await get(client, "/runs", pipeline=pipeline)
    assert [item["id"] for item in page["items"]] == [str(running), str(done)]
    assert page["next_cursor"] is None
    page = await get(client, "/runs", status="succeeded", limit=500)
    assert {str(done), str(elsewhere)} <= {item["id"] for item in page["items"]}


@pytest.mark.parametrize(
    "params",
    [{"status": "exploded"}, {"limit": 501}, {"limit": 0}, {"cursor": "not-a-cursor"}],
)
async def test_runs_rejects_bad_parameters(client: httpx.AsyncClient, params: Any) -> None:
    response = await client.get("/runs", params=params)
    assert response.status_code == 422


async def test_run_detail_has_every_attempt(engine: AsyncEngine, client: httpx.AsyncClient) -> None:
    pipeline, run_id = unique("detail"), uuid.uuid4()
    usage = StepMetrics(duration_ms=40, tokens_in=10, tokens_out=5, cost=0.5)
    boom = ErrorInfo(type="Timeout", message="took too long", retryable=True)
    await record(
        engine,
        RunQueued(
            run_id=run_id, pipeline=pipeline, version=3, input={"q": 1}, occurred_at=at(0),
            idempotency_key="idem",
        ),
        RunStarted(run_id=run_id, pipeline=pipeline, version=3, occurred_at=at(1)),
        StepScheduled(run_id=run_id, step_id="b", attempt=1, kind="http", occurred_at=at(2)),
        StepFailed(run_id=run_id, step_id="b", attempt=1, error=boom, occurred_at=at(3)),
        StepScheduled(run_id=run_id, step_id="b", attempt=2, kind="http", occurred_at=at(4)),
        StepScheduled(
            run_id=run_id, step_id="a", attempt=1, kind="llm", item_index=0, occurred_at=at(4),
        ),
        StepStarted(run_id=run_id, step_id="b", attempt=2, worker="w", occurred_at=at(4.5)),
        StepCompleted(
            run_id=run_id, step_id="b", attempt=2, output={"x": 1}, metrics=usage,
            occurred_at=at(6), started_at=at(5),
        ),
        RunCompleted(run_id=run_id, output={"x": 1}, occurred_at=at(7)),
    )  # fmt: skip
    run = await get(client, f"/runs/{run_id}")
    assert SUMMARY_KEYS | {"input", "output", "idempotency_key", "steps"} <= set(run)
    assert run["id"] == str(run_id)
    assert (run["pipeline"], run["version"], run["status"]) == (pipeline, 3, "succeeded")
    assert (run["input"], run["output"], run["error"]) == ({"q": 1}, {"x": 1}, None)
    assert (run["tokens"], run["cost"], run["idempotency_key"]) == (15, 0.5, "idem")
    assert run["duration_ms"] == 6000
    assert aware(run["requested_at"]) == at(0)
    steps = run["steps"]
    assert all(set(step) >= STEP_KEYS for step in steps)
    # by first appearance, then step id
    assert [(s["step_id"], s["attempt"], s["item_index"]) for s in steps] == [
        ("b", 1, None),
        ("a", 1, 0),
        ("b", 2, None),
    ]
    failed, fanned, done = steps
    assert (failed["status"], failed["error"]["type"]) == ("failed", "Timeout")
    assert fanned["status"] == "scheduled"
    assert (done["status"], done["kind"], done["worker"]) == ("succeeded", "http", "w")
    assert done["duration_ms"] == 1000  # started_at from the runner, not StepStarted
    assert done["metrics"]["tokens_out"] == 5


async def test_unknown_and_malformed_run_ids(client: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()
    response = await client.get(f"/runs/{missing}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"run {missing} not found"}
    assert (await client.get("/runs/not-a-uuid")).status_code == 422
    assert (await client.get(f"/runs/{missing}/events")).status_code == 404


async def test_run_events_in_the_order_they_happened(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    run_id = uuid.uuid4()
    started = RunStarted(run_id=run_id, pipeline="p", version=1, occurred_at=at(1))
    queued = RunQueued(run_id=run_id, pipeline="p", occurred_at=at(0))
    await record(engine, started, queued)  # read out of order
    page = await get(client, f"/runs/{run_id}/events")
    assert [e["type"] for e in page["items"]] == ["RunQueued", "RunStarted"]
    first = page["items"][0]
    assert set(first) == {"event_id", "type", "topic", "occurred_at", "trace_id", "payload"}
    assert first["event_id"] == str(queued.event_id)
    assert first["payload"]["pipeline"] == "p"
    assert first["topic"] == "conveyor.runs.events"


async def test_errors_newest_first_and_filtered(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    pipeline, run_id = unique("errs"), uuid.uuid4()
    await record(
        engine,
        RunQueued(run_id=run_id, pipeline=pipeline, occurred_at=at(0)),
        StepFailed(
            run_id=run_id, step_id="s", attempt=1, occurred_at=at(1),
            error=ErrorInfo(type="KeyError", message="'x'", traceback="Traceback ..."),
        ),
        RunFailed(
            run_id=run_id, step_id="s", occurred_at=at(2),
            error=ErrorInfo(type="StepFailed", message="s failed"),
        ),
    )  # fmt: skip
    page = await get(client, "/errors", pipeline=pipeline)
    assert [(e["scope"], e["type"]) for e in page["items"]] == [
        ("run", "StepFailed"),
        ("step", "KeyError"),
    ]
    step_error = page["items"][1]
    assert set(step_error) == {
        "id", "event_id", "run_id", "pipeline", "step_id", "attempt", "scope", "type",
        "message", "traceback", "retryable", "occurred_at",
    }  # fmt: skip
    assert (step_error["run_id"], step_error["attempt"]) == (str(run_id), 1)
    assert step_error["traceback"] == "Traceback ..."
    by_run = await get(client, "/errors", run_id=str(run_id), limit=1)
    assert [e["scope"] for e in by_run["items"]] == ["run"]
    by_scope = await get(client, "/errors", pipeline=pipeline, scope="step")
    assert [e["type"] for e in by_scope["items"]] == ["KeyError"]


async def test_dead_letters_show_text_when_they_can(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    def letter(key: bytes | None, value: bytes, when: float) -> DeadLetter:
        return DeadLetter(
            source_topic="conveyor.runs.requested", partition=1, offset=9,
            consumer_group="conveyor.scheduler", reason="body is not JSON", occurred_at=at(when),
            key_b64=base64.b64encode(key).decode() if key else None,
            value_b64=base64.b64encode(value).decode(), headers={"h": "v"},
        )  # fmt: skip

    text, binary = letter(b"key", b"{nope", 10_000), letter(None, b"\xff\x00", 10_001)
    for dead in (text, binary):
        await record_event(engine, dead, Origin("conveyor.dlq"))
    page = await get(client, "/dead-letters", limit=2)
    newest, older = page["items"]
    assert newest["event_id"] == str(binary.event_id)
    assert (newest["key"], newest["value"], newest["value_b64"]) == (None, None, "/wA=")
    assert (older["key"], older["value"]) == ("key", "{nope")
    assert set(older) == {
        "event_id", "source_topic", "partition", "offset", "consumer_group", "reason", "key",
        "value", "value_b64", "headers", "occurred_at",
    }  # fmt: skip
    assert (older["partition"], older["offset"], older["headers"]) == (1, 9, {"h": "v"})


async def test_pipelines_and_their_health(engine: AsyncEngine, client: httpx.AsyncClient) -> None:
    name = unique("health")
    await record(
        engine,
        PipelineRegistered(name=name, version=1, digest="a", spec={}),
        PipelineRegistered(name=name, version=2, digest="b", spec={}),
    )
    listed = [p for p in (await get(client, "/pipelines"))["items"] if p["name"] == name]
    assert [(p["version"], p["digest"]) for p in listed] == [(1, "a"), (2, "b")]
    assert aware(listed[0]["registered_at"])

    assert (await get(client, f"/pipelines/{name}/health"))["runs"] == 0
    ok, bad = uuid.uuid4(), uuid.uuid4()
    await record(
        engine,
        RunQueued(run_id=ok, pipeline=name, occurred_at=at(0)),
        RunStarted(run_id=ok, pipeline=name, version=2, occurred_at=at(0)),
        RunCompleted(run_id=ok, occurred_at=at(2)),
        RunQueued(run_id=bad, pipeline=name, occurred_at=at(1)),
        RunStarted(run_id=bad, pipeline=name, version=2, occurred_at=at(1)),
        RunFailed(run_id=bad, error=ErrorInfo(type="E", message="m"), occurred_at=at(5)),
    )
    health = await get(client, f"/pipelines/{name}/health")
    assert health["runs"] == 2
    assert health["by_status"] == {"succeeded": 1, "failed": 1}
    assert health["success_rate"] == 0.5
    assert health["p50_duration_ms"] == 3000
    assert aware(health["last_failure_at"]) == at(5)
    assert (await client.get(f"/pipelines/{unique('nope')}/health")).status_code == 404


async def test_openapi_documents_the_api(client: httpx.AsyncClient) -> None:
    spec = await get(client, "/openapi.json")
    assert {"/runs", "/runs/{run_id}", "/runs/{run_id}/events", "/errors", "/dead-letters",
            "/pipelines", "/healthz"} <= set(spec["paths"])  # fmt: skip
    assert (await client.get("/docs")).status_code == 200
