"""The scheduler's batches against a real PostgreSQL: events handled together in one
transaction (deferred writes, runs read once, savepoints only where a use case needs its
own statements) end in exactly the state and the outbox that one-by-one handling gives."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import func, select

from conveyor.contracts import (
    ErrorInfo,
    Event,
    RunRequested,
    StepCompleted,
    StepFailed,
    StepStarted,
    Topics,
    load_pipeline,
)
from conveyor.runtime import DatabaseSettings, Undeliverable, create_db_engine, upgrade_schema
from conveyor.scheduler import tables
from conveyor.scheduler.main import MIGRATIONS
from conveyor.scheduler.registry import register_pipeline
from conveyor.scheduler.scheduling import Scheduler

PIPELINE = """
name: three-steps
steps:
  - id: a
    type: transform
    with: {template: "a"}
  - id: b
    type: transform
    timeout: 30s
    retry: {max_attempts: 2, initial: 10ms, max: 10ms, jitter: false}
    with: {template: "b"}
  - id: c
    type: transform
    with: {template: "c"}
"""

LIMITED = """
name: one-at-a-time
max_concurrent_runs: 1
steps:
  - id: only
    type: transform
    with: {template: "x"}
"""


@pytest.fixture(scope="module")
def migrated(database_url: str) -> str:
    upgrade_schema(database_url, migrations=Path(MIGRATIONS), schema="scheduler")
    return database_url


@pytest.fixture
async def scheduler(migrated: str) -> AsyncIterator[Scheduler]:
    engine = create_db_engine(DatabaseSettings(url=migrated))
    scheduler = Scheduler(engine=engine, topics=Topics(f"t{uuid.uuid4().hex[:8]}"), relay=None)
    await register_pipeline(scheduler, load_pipeline(PIPELINE), source_file="p.yaml")
    await register_pipeline(scheduler, load_pipeline(LIMITED), source_file="l.yaml")
    yield scheduler
    await engine.dispose()


async def _batch(scheduler: Scheduler, events: list[Event]) -> list[Event]:
    """What ``ConsumerGuard.handle_batch`` does with one poll; the events refused."""
    refused: list[Event] = []
    async with scheduler.batch():
        await scheduler.prepare(events)
        for event in events:
            try:
                await scheduler.handle(event)
            except Undeliverable:
                refused.append(event)
    return refused


async def _one_by_one(scheduler: Scheduler, events: list[Event]) -> None:
    for event in events:
        await scheduler.handle(event)


async def _outbox(scheduler: Scheduler, run_id: uuid.UUID) -> list[tuple[str, str, Any]]:
    """(topic suffix, event type, step) staged for ``run_id``, in order."""
    o = tables.outbox
    async with scheduler.engine.connect() as conn:
        rows = (await conn.execute(select(o.c.topic, o.c.payload).order_by(o.c.id))).all()
    found = []
    for row in rows:
        event = json.loads(row.payload)
        if event.get("run_id") == str(run_id):
            found.append((row.topic.split(".", 1)[1], event["type"], event.get("step_id")))
    return found


async def _run(scheduler: Scheduler, run_id: uuid.UUID) -> Any:
    async with scheduler.engine.connect() as conn:
        return (await conn.execute(select(tables.runs).where(tables.runs.c.id == run_id))).one()


async def _timers(scheduler: Scheduler, run_id: uuid.UUID) -> list[tuple[str, str, int]]:
    t = tables.timers
    async with scheduler.engine.connect() as conn:
        rows = await conn.execute(
            select(t.c.kind, t.c.step_id, t.c.attempt).where(t.c.run_id == run_id)
        )
    return sorted(tuple(row) for row in rows)


def _done(run_id: uuid.UUID, step: str, attempt: int = 1) -> StepCompleted:
    return StepCompleted(run_id=run_id, step_id=step, attempt=attempt, output=step.upper())


def _comparable(row: Any) -> tuple[Any, ...]:
    return (row.status, row.steps, row.output, row.error, row.started_at is not None)


async def test_batches_end_where_one_by_one_ends(scheduler: Scheduler) -> None:
    """Three runs through the same events, batched across runs against one at a time."""
    solo = RunRequested(pipeline="three-steps")
    requests = [RunRequested(pipeline="three-steps") for _ in range(2)]
    ids = [r.resolved_run_id() for r in requests]
    retry = ErrorInfo(type="Boom", message="once", retryable=True)

    def script(run_id: uuid.UUID) -> list[list[Event]]:
        return [
            [_done(run_id, "a")],
            [StepFailed(run_id=run_id, step_id="b", attempt=1, error=retry)],
        ]

    await _one_by_one(scheduler, [solo])
    assert await _batch(scheduler, list(requests)) == []
    for phase in range(2):
        await _one_by_one(scheduler, script(solo.resolved_run_id())[phase])
        # both runs' events in one batch, interleaved
        assert await _batch(scheduler, [e for i in ids for e in script(i)[phase]]) == []
    # the retry timers fire outside any batch; the second attempt and step c in batches
    await asyncio.sleep(0.05)  # the retry waits 10 ms
    await scheduler.fire_due_timers()
    for run_id in [solo.resolved_run_id(), *ids]:
        assert (await _run(scheduler, run_id)).steps["b"]["status"] == "scheduled"
    for step, attempt in (("b", 2), ("c", 1)):
        await _one_by_one(scheduler, [_done(solo.resolved_run_id(), step, attempt)])
        assert await _batch(scheduler, [_done(i, step, attempt) for i in ids]) == []

    expected = await _run(scheduler, solo.resolved_run_id())
    assert expected.status == "succeeded"
    for run_id in ids:
        assert _comparable(await _run(scheduler, run_id)) == _comparable(expected)
        assert await _outbox(scheduler, run_id) == await _outbox(scheduler, solo.resolved_run_id())
        assert await _timers(scheduler, run_id) == []


async def test_a_whole_run_in_one_batch_reads_its_row_once(scheduler: Scheduler) -> None:
    """The request and every result of a run in one transaction: later events see what
    earlier ones deferred, and a deadline added and cleared in the batch never lands."""
    request = RunRequested(pipeline="three-steps")
    run_id = request.resolved_run_id()
    events: list[Event] = [request, _done(run_id, "a"), _done(run_id, "b"), _done(run_id, "c")]
    assert await _batch(scheduler, events) == []
    row = await _run(scheduler, run_id)
    assert row.status == "succeeded"
    assert row.finished_at is not None
    assert await _timers(scheduler, run_id) == []
    types = [t for _, t, _ in await _outbox(scheduler, run_id)]
    assert types.count("StepReady") == 3
    assert types[-1] == "RunCompleted"


async def test_a_duplicate_inside_a_batch_and_across_batches_counts_once(
    scheduler: Scheduler,
) -> None:
    request = RunRequested(pipeline="three-steps")
    run_id = request.resolved_run_id()
    await _batch(scheduler, [request, request])
    done = _done(run_id, "a")
    await _batch(scheduler, [done, done])
    await _batch(scheduler, [done])
    staged = await _outbox(scheduler, run_id)
    assert [t for _, t, _ in staged].count("RunQueued") == 1
    assert [s for _, t, s in staged if t == "StepReady"] == ["a", "b"]
    async with scheduler.engine.connect() as conn:
        seen = await conn.scalar(
            select(func.count()).where(
                tables.inbox.c.event_id.in_([request.event_id, done.event_id])
            )
        )
    assert seen == 2


async def test_a_refused_event_leaves_nothing_and_the_others_stay(scheduler: Scheduler) -> None:
    request = RunRequested(pipeline="three-steps")
    run_id = request.resolved_run_id()
    stray = _done(uuid.uuid4(), "a")  # names no run: dead-lettered
    refused = await _batch(scheduler, [request, stray, _done(run_id, "a")])
    assert refused == [stray]
    assert (await _run(scheduler, run_id)).steps["b"]["status"] == "scheduled"
    async with scheduler.engine.connect() as conn:
        stray_seen = await conn.scalar(
            select(func.count()).where(tables.inbox.c.event_id == stray.event_id)
        )
    assert stray_seen == 0  # handled again if it comes back (after the run exists, say)


async def test_a_failing_batch_leaves_nothing(scheduler: Scheduler) -> None:
    request = RunRequested(pipeline="three-steps")

    class Crash(Exception):
        pass

    async def crash_midway() -> None:
        async with scheduler.batch():
            await scheduler.prepare([request])
            await scheduler.handle(request)
            raise Crash

    with pytest.raises(Crash):
        await crash_midway()
    async with scheduler.engine.connect() as conn:
        runs = await conn.scalar(
            select(func.count()).where(tables.runs.c.id == request.resolved_run_id())
        )
        seen = await conn.scalar(
            select(func.count()).where(tables.inbox.c.event_id == request.event_id)
        )
    assert (runs, seen, await _outbox(scheduler, request.resolved_run_id())) == (0, 0, [])


async def test_savepoint_users_mix_with_deferred_writes(scheduler: Scheduler) -> None:
    """Idempotency keys and the run queue need statements of their own (a savepoint):
    they see what earlier events of the batch deferred."""
    first = RunRequested(pipeline="one-at-a-time")
    second = RunRequested(pipeline="one-at-a-time", idempotency_key=uuid.uuid4().hex)
    repeat = RunRequested(pipeline="one-at-a-time", idempotency_key=second.idempotency_key)
    assert await _batch(scheduler, [first, second, repeat]) == []
    assert (await _run(scheduler, first.resolved_run_id())).status == "running"
    assert (await _run(scheduler, second.resolved_run_id())).status == "queued"
    async with scheduler.engine.connect() as conn:
        repeated = await conn.scalar(
            select(func.count()).where(tables.runs.c.id == repeat.resolved_run_id())
        )
    assert repeated == 0
    # the first run ends and the queued one starts, in the same batch as a later result
    assert await _batch(scheduler, [_done(first.resolved_run_id(), "only")]) == []
    assert (await _run(scheduler, first.resolved_run_id())).status == "succeeded"
    assert (await _run(scheduler, second.resolved_run_id())).status == "running"
    await _batch(scheduler, [_done(second.resolved_run_id(), "only")])
    assert (await _run(scheduler, second.resolved_run_id())).status == "succeeded"


async def test_a_batch_of_events_for_the_recorder_touches_no_database(
    scheduler: Scheduler,
) -> None:
    """``StepStarted`` reaches the scheduler's topic too; a batch of only those opens no
    transaction (it used to cost a connection, BEGIN, an inbox lookup and a COMMIT)."""
    started = [StepStarted(run_id=uuid.uuid4(), step_id="a", attempt=1) for _ in range(3)]
    pool = scheduler.engine.pool
    async with scheduler.batch():
        await scheduler.prepare(list(started))
        for event in started:
            await scheduler.handle(event)
        assert pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_batch_commits_in_the_round_trip_of_its_writes(scheduler: Scheduler) -> None:
    """The deferred writes and the COMMIT go in one pipeline: once ``write(commit=True)``
    returns, another connection sees them, and ``end`` has nothing left to commit. A write
    that fails takes the COMMIT with it: nothing of the batch is kept."""
    from conveyor.scheduler.unit_of_work import _Batch

    async def seen(event_id: uuid.UUID) -> int:
        async with scheduler.engine.connect() as other:
            count = await other.scalar(
                select(func.count()).where(tables.inbox.c.event_id == event_id)
            )
        return int(count or 0)

    kept, lost = uuid.uuid4(), uuid.uuid4()
    batch = _Batch(engine=scheduler.engine)
    batch.writes.inbox.append(kept)
    await batch.write(commit=True)
    assert await seen(kept) == 1  # committed before end()
    await batch.end(commit=True)
    assert await seen(kept) == 1

    batch = _Batch(engine=scheduler.engine)
    batch.writes.inbox.append(lost)
    # a timer without a step: the server refuses it after the inbox row went in
    batch.writes.timers.append(
        {
            "kind": "retry",
            "run_id": uuid.uuid4(),
            "step_id": None,
            "attempt": 1,
            "item_index": None,
            "due_at": dt.datetime.now(dt.UTC),
        }
    )
    with pytest.raises(psycopg.errors.NotNullViolation):
        await batch.write(commit=True)
    await batch.end(commit=False)
    assert await seen(lost) == 0
