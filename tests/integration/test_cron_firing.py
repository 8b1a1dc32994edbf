"""Cron schedules against a real PostgreSQL: the schedules table follows registrations, two
schedulers racing over one due schedule fire each tick once, pause and unpause."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select

from conveyor.contracts import PipelineSpec, Topics, load_pipeline
from conveyor.runtime import DatabaseSettings, create_db_engine, upgrade_schema
from conveyor.scheduler import tables
from conveyor.scheduler.cron import CronRunner, set_paused, sync_schedule
from conveyor.scheduler.main import MIGRATIONS
from conveyor.scheduler.registry import register_pipeline
from conveyor.scheduler.scheduling import Scheduler

S = timedelta(seconds=1)
T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def _spec(name: str, *, cron: str | None = "* * * * * *", catch_up: str = "skip") -> PipelineSpec:
    schedule = (
        f"schedule: {{cron: '{cron}', catch_up: {catch_up}, input: {{who: cron}}}}\n"
        if cron
        else ""
    )
    return load_pipeline(
        f"name: {name}\n{schedule}steps:\n"
        "  - id: hello\n    type: transform\n    with: {template: 'hi {{ input.who }}'}\n"
    )


@pytest.fixture(scope="module")
def migrated(database_url: str) -> str:
    upgrade_schema(database_url, migrations=Path(MIGRATIONS), schema="scheduler")
    return database_url


@pytest.fixture
async def schedulers(migrated: str) -> AsyncIterator[tuple[Scheduler, Scheduler]]:
    """Two schedulers on one database, each with its own engine, as two replicas are."""
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    engines = [create_db_engine(DatabaseSettings(url=migrated)) for _ in range(2)]
    pair = tuple(Scheduler(engine=e, topics=topics, relay=None) for e in engines)
    yield pair  # type: ignore[misc]
    for engine in engines:
        await engine.dispose()


async def _sync(scheduler: Scheduler, spec: PipelineSpec, *, now: datetime) -> None:
    async with scheduler.unit_of_work() as uow:
        await sync_schedule(uow.conn, spec, now=now)
        await uow.commit()


async def _register(scheduler: Scheduler, spec: PipelineSpec, *, now: datetime) -> None:
    """Register a new pipeline as if at ``now``: the registration syncs the schedule at the
    wall clock, so the row is made again at the test's clock."""
    await register_pipeline(scheduler, spec, source_file=None)
    async with scheduler.unit_of_work() as uow:
        s = tables.schedules
        await uow.conn.execute(delete(s).where(s.c.pipeline == spec.name))
        await sync_schedule(uow.conn, spec, now=now)
        await uow.commit()


async def _row(scheduler: Scheduler, name: str) -> Any:
    s = tables.schedules
    async with scheduler.engine.connect() as conn:
        return (await conn.execute(select(s).where(s.c.pipeline == name))).first()


async def _staged(scheduler: Scheduler, event_type: str, name: str) -> list[dict[str, Any]]:
    """Events of ``event_type`` about pipeline ``name`` staged in the outbox, in order."""
    o = tables.outbox
    async with scheduler.engine.connect() as conn:
        rows = (await conn.execute(select(o.c.key, o.c.payload).order_by(o.c.id))).all()
    found = []
    for row in rows:
        body = json.loads(row.payload)
        if body["type"] == event_type and name in (body.get("pipeline"), body.get("name")):
            assert row.key == name
            found.append(body)
    return found


async def _fired_ticks(scheduler: Scheduler, name: str) -> list[str]:
    requests = await _staged(scheduler, "RunRequested", name)
    assert all(r["requested_by"] == "cron" for r in requests)
    assert all(r["input"] == {"who": "cron"} for r in requests)
    return [r["idempotency_key"].removeprefix(f"cron:{name}:") for r in requests]


# --- the schedules table follows the registrations -------------------------------------------


async def test_registering_a_version_syncs_its_schedule(
    schedulers: tuple[Scheduler, Scheduler],
) -> None:
    """Passes once ``register_pipeline`` calls ``sync_schedule`` (the lead's wiring)."""
    a, _ = schedulers
    name = f"registered-{uuid.uuid4().hex[:6]}"
    before = datetime.now(UTC)
    await register_pipeline(a, _spec(name, cron="*/5 * * * *"), source_file=None)
    row = await _row(a, name)
    assert row is not None, "register_pipeline did not sync the schedule"
    assert before < row.next_fire_at <= before + timedelta(minutes=5)
    await register_pipeline(a, _spec(name, cron=None), source_file=None)
    assert await _row(a, name) is None


async def test_a_version_with_a_schedule_adds_the_row_and_one_without_removes_it(
    schedulers: tuple[Scheduler, Scheduler],
) -> None:
    a, _ = schedulers
    name = f"sync-{uuid.uuid4().hex[:6]}"
    await _sync(a, _spec(name, cron="*/5 * * * *"), now=T0 + 30 * S)
    row = await _row(a, name)
    assert (row.cron, row.timezone, row.catch_up, row.paused) == (
        "*/5 * * * *",
        "UTC",
        "skip",
        False,
    )
    assert row.input == {"who": "cron"}
    assert row.next_fire_at == T0 + timedelta(minutes=5)

    await set_paused(a, name, paused=True, now=T0 + 40 * S)
    # A new version with the same ticks keeps the due tick and the pause.
    await _sync(a, _spec(name, cron="*/5 * * * *", catch_up="once"), now=T0 + 50 * S)
    row = await _row(a, name)
    assert (row.catch_up, row.paused, row.next_fire_at) == ("once", True, T0 + 5 * 60 * S)
    # Other ticks: the next is computed afresh; still paused.
    await _sync(a, _spec(name, cron="0 * * * *"), now=T0 + 60 * S)
    row = await _row(a, name)
    assert (row.cron, row.paused, row.next_fire_at) == ("0 * * * *", True, T0 + 3600 * S)

    await _sync(a, _spec(name, cron=None), now=T0 + 70 * S)
    assert await _row(a, name) is None


# --- exactly once per tick --------------------------------------------------------------------


async def test_two_racing_schedulers_fire_each_tick_exactly_once(
    schedulers: tuple[Scheduler, Scheduler],
) -> None:
    a, b = schedulers
    name = f"race-{uuid.uuid4().hex[:6]}"
    await _register(a, _spec(name), now=T0)
    runners = [CronRunner(a), CronRunner(b)]
    for second in range(1, 7):
        now = T0 + second * S + timedelta(milliseconds=30)
        # Every runner looks several times at once, on two connection pools.
        await asyncio.gather(*(r.fire_due(now) for r in runners for _ in range(4)))
    ticks = await _fired_ticks(a, name)
    assert ticks == [(T0 + n * S).isoformat() for n in range(1, 7)]
    row = await _row(b, name)
    assert row.next_fire_at == T0 + 7 * S
    assert row.last_tick == T0 + 6 * S


async def test_two_firing_loops_on_the_wall_clock_fire_every_tick_once(
    schedulers: tuple[Scheduler, Scheduler],
) -> None:
    a, b = schedulers
    name = f"loops-{uuid.uuid4().hex[:6]}"
    started = datetime.now(UTC)
    await _register(a, _spec(name), now=started)
    runners = [CronRunner(a), CronRunner(b)]
    for runner in runners:
        await runner.start()
    await asyncio.sleep(3.6)
    for runner in runners:
        await runner.stop()
    stopped = datetime.now(UTC)
    ticks = [datetime.fromisoformat(t) for t in await _fired_ticks(a, name)]
    assert len(ticks) == len(set(ticks))
    assert 3 <= len(ticks) <= 4, ticks
    # No tick went missing between the first and the last.
    assert all(later - earlier == S for earlier, later in itertools.pairwise(ticks))
    assert started < ticks[0] <= started + 2 * S
    assert ticks[-1] <= stopped


async def test_a_loop_sleeps_until_the_next_tick_at_most_a_second(
    schedulers: tuple[Scheduler, Scheduler],
) -> None:
    a, _ = schedulers
    name = f"sleep-{uuid.uuid4().hex[:6]}"
    await _register(a, _spec(name, cron="0 0 1 1 *"), now=T0)  # next: a year on
    runner = CronRunner(a)
    assert await runner.fire_due(T0) == 1.0
    await _register(a, _spec(f"{name}-2"), now=T0)
    # Others' schedules are in this table too: only the time to the soonest is bounded.
    assert 0 < await runner.fire_due(T0 + timedelta(milliseconds=400)) <= 0.6
    async with a.unit_of_work() as uow:
        s = tables.schedules
        await uow.conn.execute(delete(s).where(s.c.pipeline.in_([name, f"{name}-2"])))
        await uow.commit()


# --- catch-up after downtime -------------------------------------------------------------------


async def test_after_downtime_skip_fires_nothing_and_once_fires_one_run(
    schedulers: tuple[Scheduler, Scheduler],
) -> None:
    a, _ = schedulers
    skip, once = f"skip-{uuid.uuid4().hex[:6]}", f"once-{uuid.uuid4().hex[:6]}"
    every_10s = "* * * * * */10"
    await _register(a, _spec(skip, cron=every_10s, catch_up="skip"), now=T0)
    await _register(a, _spec(once, cron=every_10s, catch_up="once"), now=T0)
    # Ticks 10 s .. 40 s went by unfired; the current one (40 s) is 7 s late, past the grace.
    back = T0 + 47 * S
    await CronRunner(a).fire_due(back)
    assert await _fired_ticks(a, skip) == []
    assert await _fired_ticks(a, once) == [(T0 + 40 * S).isoformat()]
    for name in (skip, once):
        assert (await _row(a, name)).next_fire_at == T0 + 50 * S
    # Back within the grace of the current tick, skip fires that one alone.
    await CronRunner(a).fire_due(T0 + 94 * S)
    assert await _fired_ticks(a, skip) == [(T0 + 90 * S).isoformat()]
    assert await _fired_ticks(a, once) == [(T0 + n * S).isoformat() for n in (40, 90)]


# --- pause and unpause -----------------------------------------------------------------------


async def test_a_paused_schedule_does_not_fire_and_unpausing_does_not_burst(
    schedulers: tuple[Scheduler, Scheduler],
) -> None:
    a, b = schedulers
    name = f"pause-{uuid.uuid4().hex[:6]}"
    await _register(a, _spec(name, catch_up="once"), now=T0)
    runners = [CronRunner(a), CronRunner(b)]
    await asyncio.gather(*(r.fire_due(T0 + S) for r in runners))
    assert len(await _fired_ticks(a, name)) == 1

    item = await set_paused(a, name, paused=True, by="ops", now=T0 + 1.5 * S)
    assert item is not None
    assert item["paused"] is True
    for second in range(2, 12):
        await asyncio.gather(*(r.fire_due(T0 + second * S) for r in runners))
    assert len(await _fired_ticks(a, name)) == 1

    # Pausing again changes nothing and says nothing.
    await set_paused(a, name, paused=True, by="ops", now=T0 + 12 * S)
    item = await set_paused(b, name, paused=False, by="ops", now=T0 + 20 * S + 0.2 * S)
    assert item is not None
    assert item["next_fire_at"] == T0 + 21 * S  # not the ten ticks missed while paused
    await asyncio.gather(*(r.fire_due(T0 + 20.5 * S) for r in runners))
    assert len(await _fired_ticks(a, name)) == 1
    await asyncio.gather(*(r.fire_due(T0 + 21 * S) for r in runners))
    assert await _fired_ticks(a, name) == [(T0 + n * S).isoformat() for n in (1, 21)]

    updates = await _staged(a, "ScheduleUpdated", name)
    assert [(u["paused"], u["updated_by"]) for u in updates] == [(True, "ops"), (False, "ops")]


async def test_pausing_a_pipeline_without_a_schedule_answers_none(
    schedulers: tuple[Scheduler, Scheduler],
) -> None:
    a, _ = schedulers
    assert await set_paused(a, "no-such-pipeline", paused=True) is None
