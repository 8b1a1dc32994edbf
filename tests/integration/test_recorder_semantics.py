"""The recorder's projection of cancel, retry-from-step, fan-out, queued runs and paused
schedules, against a real PostgreSQL, and their JSON through the HTTP API.

Retry is the one event that moves a run backwards; these tests check that it does so in
order and in any delivery order, up to every point of a run's history.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contracts import (
    ErrorInfo,
    Event,
    PipelineRegistered,
    RunCancelled,
    RunCompleted,
    RunFailed,
    RunParked,
    RunQueued,
    RunResumed,
    RunRetried,
    RunStarted,
    ScheduleUpdated,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepMetrics,
    StepScheduled,
    StepStarted,
)
from conveyor.run_recorder import MIGRATIONS, create_api, record_event
from conveyor.run_recorder.tables import event_log
from conveyor.runtime import DatabaseSettings, create_db_engine, upgrade_schema
from tests.integration.test_recorder_projection import Origin, at, snapshot

RUNS_EVENTS = Origin("conveyor.runs.events")
STEPS_COMPLETED = Origin("conveyor.steps.completed")
BOOM = ErrorInfo(type="Boom", message="draft failed")


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


def _origin(event: Event) -> Origin:
    # A fan-out summary (item_index null) comes from the scheduler on runs.events.
    if isinstance(event, StepStarted | StepCompleted | StepFailed) and (
        getattr(event, "worker", None) is not None
    ):
        return STEPS_COMPLETED
    return RUNS_EVENTS


async def project(engine: AsyncEngine, *events: Event) -> None:
    for event in events:
        assert await record_event(engine, event, _origin(event))


async def get(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _attempts(got: dict[str, Any]) -> dict[tuple[str, int, int], dict[str, Any]]:
    return {(a["step_id"], a["attempt"], a["item_index"]): a for a in got["attempts"]}


# --- cancel ------------------------------------------------------------------------------


async def test_cancel_marks_attempts_in_flight_and_keeps_results(engine: AsyncEngine) -> None:
    run_id = uuid.uuid4()
    items = [
        ev
        for i in range(3)
        for ev in (
            StepScheduled(
                run_id=run_id, step_id="each", attempt=1, kind="http", item_index=i,
                occurred_at=at(2),
            ),
            StepStarted(run_id=run_id, step_id="each", attempt=1, item_index=i, worker="w",
                        occurred_at=at(3)),
        )
    ]  # fmt: skip
    done = StepCompleted(
        run_id=run_id, step_id="each", attempt=1, item_index=0, output="A", worker="w",
        occurred_at=at(4),
    )  # fmt: skip
    await project(
        engine,
        RunQueued(run_id=run_id, pipeline="fan", occurred_at=at(0)),
        RunStarted(run_id=run_id, pipeline="fan", version=1, occurred_at=at(1)),
        *items,
        done,
        # the scheduler's view: items 0 (whose result it had not read yet), 1 and 2 in flight
        *(
            StepCancelled(
                run_id=run_id, step_id="each", attempt=1, item_index=i, reason="user said so",
                occurred_at=at(5),
            )
            for i in range(3)
        ),
        RunCancelled(run_id=run_id, reason="user said so", occurred_at=at(5)),
        # the runner stops item 1 and says so: a failure of type Cancelled
        StepFailed(
            run_id=run_id, step_id="each", attempt=1, item_index=1, worker="w",
            error=ErrorInfo(type="Cancelled", message="the run was cancelled: user said so"),
            metrics=StepMetrics(tokens_in=7), occurred_at=at(5.5),
        ),
        # a runner answers for item 2 anyway; a stray StepStarted comes late
        StepCompleted(
            run_id=run_id, step_id="each", attempt=1, item_index=2, output="C", worker="w",
            occurred_at=at(6),
        ),
        StepStarted(run_id=run_id, step_id="each", attempt=1, item_index=1, worker="w2",
                    occurred_at=at(7)),
    )  # fmt: skip
    got = await snapshot(engine, run_id)
    rows = _attempts(got)
    assert rows["each", 1, 0]["status"] == "succeeded"  # cancelled after: no overwrite
    assert rows["each", 1, 0]["finished_at"] == at(4)
    cancelled = rows["each", 1, 1]
    assert (cancelled["status"], cancelled["reason"]) == ("cancelled", "user said so")
    assert cancelled["started_at"] == at(3)
    # the runner's word, later, has the last say on the details; still cancelled
    assert cancelled["finished_at"] == at(5.5)
    assert cancelled["error"]["type"] == "Cancelled"
    assert got["errors"] == []  # a cancellation is not an error to list
    assert (rows["each", 1, 2]["status"], rows["each", 1, 2]["output"]) == ("succeeded", "C")
    run = got["run"]
    assert (run["status"], run["finished_at"], run["tokens"]) == ("cancelled", at(5), 7)
    assert run["error"] == {"type": "Cancelled", "message": "user said so", "retryable": False}


@pytest.mark.parametrize("seed", range(4))
async def test_cancel_in_any_order_gives_the_same_rows(engine: AsyncEngine, seed: int) -> None:
    def events(run_id: uuid.UUID) -> list[Event]:
        return [
            RunQueued(run_id=run_id, pipeline="p", occurred_at=at(0)),
            RunStarted(run_id=run_id, pipeline="p", version=1, occurred_at=at(1)),
            StepScheduled(run_id=run_id, step_id="a", attempt=1, kind="llm", occurred_at=at(2)),
            StepStarted(run_id=run_id, step_id="a", attempt=1, worker="w", occurred_at=at(3)),
            StepCancelled(run_id=run_id, step_id="a", attempt=1, reason="r", occurred_at=at(4)),
            RunCancelled(run_id=run_id, reason="r", occurred_at=at(4)),
            StepCompleted(
                run_id=run_id, step_id="a", attempt=1, output=1, worker="w", occurred_at=at(6)
            ),
        ]

    in_order, shuffled = uuid.uuid4(), uuid.uuid4()
    await project(engine, *events(in_order))
    later = events(shuffled)
    random.Random(seed).shuffle(later)
    await project(engine, *later)
    assert await snapshot(engine, shuffled) == await snapshot(engine, in_order)
    assert _attempts(await snapshot(engine, in_order))["a", 1, -1]["status"] == "succeeded"


# --- retry from a step -------------------------------------------------------------------


def retried_history(run_id: uuid.UUID) -> list[Event]:
    """Fails, is retried with an edited input, parks and resumes, fails again, is retried
    again, succeeds. Upstream ``fetch`` runs once; ``draft`` runs three times."""
    usage = StepMetrics(tokens_in=10, tokens_out=5, cost=0.1)

    def attempt(n: int, start: float, *, ok: bool) -> list[Event]:
        end = (
            StepCompleted(
                run_id=run_id, step_id="draft", attempt=n, output=f"draft {n}", metrics=usage,
                worker="w", occurred_at=at(start + 2),
            )
            if ok
            else StepFailed(
                run_id=run_id, step_id="draft", attempt=n, error=BOOM, metrics=usage,
                worker="w", occurred_at=at(start + 2),
            )
        )  # fmt: skip
        return [
            StepScheduled(
                run_id=run_id, step_id="draft", attempt=n, kind="llm", occurred_at=at(start)
            ),
            StepStarted(
                run_id=run_id, step_id="draft", attempt=n, worker="w", occurred_at=at(start + 1)
            ),
            end,
        ]

    return [
        RunQueued(
            run_id=run_id, pipeline="article", version=1, input={"topic": "otters"},
            occurred_at=at(0),
        ),
        RunStarted(run_id=run_id, pipeline="article", version=1, occurred_at=at(1)),
        StepScheduled(run_id=run_id, step_id="fetch", attempt=1, kind="http", occurred_at=at(2)),
        StepCompleted(
            run_id=run_id, step_id="fetch", attempt=1, output="page", worker="w",
            occurred_at=at(3),
        ),
        *attempt(1, 4, ok=False),
        RunFailed(run_id=run_id, error=BOOM, step_id="draft", occurred_at=at(8)),
        RunRetried(
            run_id=run_id, from_step="draft", set={"input.topic": "owls"},
            input={"topic": "owls"}, requested_by="cli", occurred_at=at(10),
        ),
        *attempt(2, 11, ok=False),
        RunParked(run_id=run_id, step_id="draft", occurred_at=at(14)),
        RunResumed(run_id=run_id, step_id="draft", occurred_at=at(15)),
        RunFailed(run_id=run_id, error=BOOM, step_id="draft", occurred_at=at(16)),
        RunRetried(
            run_id=run_id, from_step="draft", set={"input.topic": "bats"},
            input={"topic": "bats"}, occurred_at=at(20),
        ),
        *attempt(3, 21, ok=True),
        RunCompleted(run_id=run_id, output={"text": "draft 3"}, occurred_at=at(25)),
    ]  # fmt: skip


async def test_a_retry_reopens_the_run_then_the_rerun_ends_it(engine: AsyncEngine) -> None:
    run_id = uuid.uuid4()
    events = retried_history(run_id)
    first_retry = next(i for i, e in enumerate(events) if isinstance(e, RunRetried))
    await project(engine, *events[:first_retry])
    failed = (await snapshot(engine, run_id))["run"]
    assert (failed["status"], failed["finished_at"], failed["retries"]) == ("failed", at(8), 0)
    assert failed["error"]["message"] == "draft failed"

    await project(engine, events[first_retry])
    reopened = (await snapshot(engine, run_id))["run"]
    assert reopened["status"] == "running"
    assert (reopened["status_at"], reopened["retried_at"], reopened["retries"]) == (
        at(10),
        at(10),
        1,
    )
    assert (reopened["finished_at"], reopened["error"], reopened["output"]) == (None, None, None)
    assert reopened["input"] == {"topic": "owls"}
    assert reopened["started_at"] == at(1)  # the run started once

    await project(engine, *events[first_retry + 1 :])
    got = await snapshot(engine, run_id)
    run = got["run"]
    assert (run["status"], run["finished_at"], run["output"]) == ("succeeded", at(25), {
        "text": "draft 3"
    })  # fmt: skip
    assert run["error"] is None  # the first runs' errors do not stick to the success
    assert (run["retries"], run["retried_at"], run["input"]) == (2, at(20), {"topic": "bats"})
    assert run["tokens"] == 45  # every attempt of every run was billed
    rows = _attempts(got)
    assert [rows["draft", n, -1]["status"] for n in (1, 2, 3)] == ["failed", "failed", "succeeded"]
    assert rows["fetch", 1, -1]["status"] == "succeeded"
    assert len(rows) == 4  # fetch was reused, not run again
    assert [e[0] for e in got["errors"]].count("run") == 2  # both failures stay in the log


async def _prefix_projection(
    engine: AsyncEngine, events: list[Event], *, seed: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same events projected in order and shuffled, into two fresh runs."""
    in_order, shuffled = uuid.uuid4(), uuid.uuid4()

    def renamed(run_id: uuid.UUID) -> list[Event]:
        return [e.model_copy(update={"run_id": run_id, "event_id": uuid.uuid4()}) for e in events]

    await project(engine, *renamed(in_order))
    mixed = renamed(shuffled)
    random.Random(seed).shuffle(mixed)
    await project(engine, *mixed)
    return await snapshot(engine, in_order), await snapshot(engine, shuffled)


async def test_any_delivery_order_of_any_part_of_a_retried_run_gives_the_same_rows(
    engine: AsyncEngine,
) -> None:
    history = retried_history(uuid.uuid4())
    for end in range(1, len(history) + 1):
        expected, got = await _prefix_projection(engine, history[:end], seed=end)
        assert got == expected, f"the first {end} events, shuffled with seed {end}"


@pytest.mark.parametrize("seed", range(8))
async def test_a_shuffled_retried_run_ends_as_its_rerun_did(engine: AsyncEngine, seed: int) -> None:
    in_order, got = await _prefix_projection(engine, retried_history(uuid.uuid4()), seed=seed)
    assert got == in_order
    run = got["run"]
    assert (run["status"], run["error"], run["finished_at"]) == ("succeeded", None, at(25))
    assert (run["retries"], run["input"]) == (2, {"topic": "bats"})


@pytest.mark.parametrize(
    ("read_first", "status", "status_at"),
    [
        # the re-run parked after the retry: that event lost to the old failure when it was
        # read, and the retry finds it in the event log
        ((RunParked, 14), "parked", 14),
        ((RunResumed, 15), "running", 15),
        ((RunFailed, 16), "failed", 16),
    ],
)
async def test_a_retry_read_late_keeps_what_the_rerun_did_since(
    engine: AsyncEngine, read_first: tuple[type, float], status: str, status_at: float
) -> None:
    run_id = uuid.uuid4()
    events = retried_history(run_id)[:15]  # up to the second RunFailed, not the second retry
    retry = next(e for e in events if isinstance(e, RunRetried))
    kind, when = read_first
    rerun = [e for e in events if isinstance(e, kind) and e.occurred_at == at(when)]
    before = [e for e in events if e.occurred_at < retry.occurred_at]
    await project(engine, *before, *rerun, retry)
    run = (await snapshot(engine, run_id))["run"]
    assert (run["status"], run["status_at"], run["retries"]) == (status, at(status_at), 1)
    assert run["finished_at"] == (at(16) if status == "failed" else None)


# --- fan-out, queued runs, schedules, through the API --------------------------------------


async def test_fan_out_rows_and_retries_through_the_api(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    run_id = uuid.uuid4()
    await project(
        engine,
        RunQueued(run_id=run_id, pipeline="fan", input={"xs": [1, 2, 3]}, occurred_at=at(0)),
        RunStarted(run_id=run_id, pipeline="fan", version=1, occurred_at=at(1)),
        *(
            ev
            for i in range(3)
            for ev in (
                StepScheduled(run_id=run_id, step_id="each", attempt=1, kind="http",
                              item_index=i, occurred_at=at(2 + i)),
                StepCompleted(run_id=run_id, step_id="each", attempt=1, item_index=i,
                              output=i * 10, worker="w", occurred_at=at(6 + i)),
            )
        ),
        # the step as a whole, from the scheduler: the items' outputs in input order
        StepCompleted(run_id=run_id, step_id="each", attempt=1, output=[0, 10, 20],
                      occurred_at=at(9)),
        RunCompleted(run_id=run_id, output=[0, 10, 20], occurred_at=at(10)),
        RunRetried(run_id=run_id, from_step="each", input={"xs": [4]}, occurred_at=at(11)),
        StepScheduled(run_id=run_id, step_id="each", attempt=2, kind="http", item_index=0,
                      occurred_at=at(12)),
    )  # fmt: skip
    run = await get(client, f"/runs/{run_id}")
    assert (run["status"], run["retries"], run["input"]) == ("running", 1, {"xs": [4]})
    assert run["retried_at"] is not None
    assert (run["finished_at"], run["output"], run["error"]) == (None, None, None)
    rows = [(s["step_id"], s["attempt"], s["item_index"], s["status"]) for s in run["steps"]]
    assert rows == [
        ("each", 1, 0, "succeeded"),
        ("each", 1, 1, "succeeded"),
        ("each", 1, 2, "succeeded"),
        ("each", 1, None, "succeeded"),
        ("each", 2, 0, "scheduled"),
    ]
    summary = run["steps"][3]
    assert summary["output"] == [0, 10, 20]
    listed = await get(client, "/runs", pipeline="fan", status="running", limit=500)
    assert {item["id"]: item["retries"] for item in listed["items"]}[str(run_id)] == 1


async def test_a_run_waiting_for_a_slot_is_queued(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    pipeline = f"capped-{uuid.uuid4().hex[:6]}"
    waiting, started = uuid.uuid4(), uuid.uuid4()
    await project(
        engine,
        RunQueued(run_id=started, pipeline=pipeline, occurred_at=at(0)),
        RunStarted(run_id=started, pipeline=pipeline, version=1, occurred_at=at(1)),
        RunQueued(run_id=waiting, pipeline=pipeline, occurred_at=at(2)),
    )
    page = await get(client, "/runs", pipeline=pipeline, status="queued")
    assert [(item["id"], item["status"]) for item in page["items"]] == [(str(waiting), "queued")]
    assert (await get(client, f"/runs/{waiting}"))["started_at"] is None
    # a slot frees: the run starts
    await project(engine, RunStarted(run_id=waiting, pipeline=pipeline, version=1,
                                     occurred_at=at(9)))  # fmt: skip
    assert (await get(client, "/runs", pipeline=pipeline, status="queued"))["items"] == []


async def test_cancelled_run_through_the_api(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    run_id = uuid.uuid4()
    await project(
        engine,
        RunQueued(run_id=run_id, pipeline="p", occurred_at=at(0)),
        RunStarted(run_id=run_id, pipeline="p", version=1, occurred_at=at(1)),
        StepScheduled(run_id=run_id, step_id="a", attempt=1, kind="llm", occurred_at=at(2)),
        StepCancelled(run_id=run_id, step_id="a", attempt=1, reason="stop", occurred_at=at(3)),
        RunCancelled(run_id=run_id, reason="stop", occurred_at=at(3)),
    )
    run = await get(client, f"/runs/{run_id}")
    assert (run["status"], run["error"]["type"], run["error"]["message"]) == (
        "cancelled",
        "Cancelled",
        "stop",
    )
    [step] = run["steps"]
    assert (step["status"], step["reason"]) == ("cancelled", "stop")
    assert step["finished_at"] is not None


async def test_schedule_updates_are_logged_and_show_as_paused(
    engine: AsyncEngine, client: httpx.AsyncClient
) -> None:
    cron, plain = f"cron-{uuid.uuid4().hex[:6]}", f"plain-{uuid.uuid4().hex[:6]}"
    schedule = {"cron": "*/5 * * * *", "timezone": "UTC", "catch_up": "skip", "input": {}}
    paused = ScheduleUpdated(name=cron, paused=True, updated_by="ops", occurred_at=at(5))
    await project(
        engine,
        PipelineRegistered(name=cron, version=1, digest="a", spec={"schedule": None}),
        PipelineRegistered(name=cron, version=2, digest="b", spec={"schedule": schedule}),
        PipelineRegistered(name=plain, version=1, digest="c", spec={"steps": []}),
    )

    def flags(items: list[dict[str, Any]]) -> dict[tuple[str, int], Any]:
        return {(p["name"], p["version"]): p["paused"] for p in items if p["name"] in (cron, plain)}

    before = flags((await get(client, "/pipelines"))["items"])
    assert before == {(cron, 1): None, (cron, 2): False, (plain, 1): None}

    # unpaused at 9, then the older pause is read: the latest change stands
    await project(engine, ScheduleUpdated(name=cron, paused=False, occurred_at=at(9)), paused)
    assert flags((await get(client, "/pipelines"))["items"])[(cron, 2)] is False
    await project(engine, ScheduleUpdated(name=cron, paused=True, occurred_at=at(12)))
    assert flags((await get(client, "/pipelines"))["items"])[(cron, 2)] is True

    async with engine.connect() as conn:
        logged = await conn.scalar(
            select(event_log.c.payload).where(event_log.c.event_id == paused.event_id)
        )
    assert logged["type"] == "ScheduleUpdated"
    assert logged["updated_by"] == "ops"
