"""Cron schedules: one run per tick, however many schedulers race for it.

The pure part decides what a due schedule fires (``next_tick``, ``latest_tick``,
``grace_for``, ``plan_firing``). The rest keeps ``scheduler.schedules`` in step with the
pipelines (``sync_schedule``, in the registration transaction) and fires the due rows
(``CronRunner``).

Exactly once per tick: a firing loop claims the due rows with ``FOR UPDATE SKIP LOCKED``
and moves ``next_fire_at`` past the tick in the same transaction that stages the
``RunRequested`` in the outbox, so a peer either skips the locked row or, once it is
committed, no longer sees it as due. The request's idempotency key
``cron:<pipeline>:<tick>`` is a second guard: two requests for one tick name one run.

Catch-up after downtime (the scheduler was down, or the schedule's tick went by unfired):

- ``skip``: fire only the current tick, the latest one at or before now, and only when it
  is late by at most ``grace_for(tick)`` = one period of the schedule, capped at 5 s. A
  scheduler that restarts within that window still fires the tick it was about to fire;
  every older tick is dropped.
- ``once``: fire a single run for every missed tick together, as the latest of them.

Either way the next fire is the first tick after now: missed ticks never become a burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter
from sqlalchemy import case, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.contracts import PipelineSpec, RunRequested, Schedule, ScheduleUpdated
from conveyor.scheduler import tables
from conveyor.scheduler.scheduling import Scheduler

__all__ = [
    "GRACE_CAP",
    "CronRunner",
    "Firing",
    "grace_for",
    "idempotency_key",
    "latest_tick",
    "list_schedules",
    "next_tick",
    "plan_firing",
    "set_paused",
    "sync_schedule",
]

log = logging.getLogger("conveyor.scheduler.cron")

GRACE_CAP = timedelta(seconds=5)
"""How late the current tick may be and still fire under ``catch_up: skip`` (at most)."""

_RETRY_BROKEN = timedelta(minutes=1)
_ONE_MICROSECOND = timedelta(microseconds=1)


# --- pure tick logic ----------------------------------------------------------------------


def next_tick(schedule: Schedule, after: datetime) -> datetime:
    """The first tick strictly after ``after`` (aware), in UTC."""
    start = after.astimezone(ZoneInfo(schedule.timezone))
    tick: datetime = croniter(schedule.cron, start).get_next(datetime)
    return tick.astimezone(UTC)


def latest_tick(schedule: Schedule, now: datetime) -> datetime:
    """The last tick at or before ``now`` (aware), in UTC."""
    # croniter's get_prev is strictly before its start: nudge the start past ``now``.
    start = (now + _ONE_MICROSECOND).astimezone(ZoneInfo(schedule.timezone))
    tick: datetime = croniter(schedule.cron, start).get_prev(datetime)
    return tick.astimezone(UTC)


def grace_for(schedule: Schedule, tick: datetime) -> timedelta:
    """How late ``tick`` may fire and still count as current: one period, at most 5 s."""
    return min(GRACE_CAP, next_tick(schedule, tick) - tick)


def idempotency_key(pipeline: str, tick: datetime) -> str:
    """``cron:<pipeline>:<tick in UTC, ISO 8601>``: the same for every replica."""
    return f"cron:{pipeline}:{tick.astimezone(UTC).isoformat()}"


@dataclass(frozen=True)
class Firing:
    """What a due schedule does now: fire a run for ``tick`` (or nothing), then wait for
    ``next_fire_at``."""

    tick: datetime | None
    next_fire_at: datetime
    late_by: timedelta = timedelta(0)


def plan_firing(schedule: Schedule, *, due_at: datetime, now: datetime) -> Firing:
    """Decide for a schedule whose earliest unfired tick is ``due_at``, at ``now``."""
    if now < due_at:
        return Firing(tick=None, next_fire_at=due_at)
    # ``due_at`` is a tick, so the latest tick is at or after it; ``max`` keeps an
    # off-grid ``due_at`` (a row written by hand) from firing a tick before it.
    tick = max(latest_tick(schedule, now), due_at)
    late_by = now - tick
    following = next_tick(schedule, now)
    if schedule.catch_up == "once" or late_by <= grace_for(schedule, tick):
        return Firing(tick=tick, next_fire_at=following, late_by=late_by)
    return Firing(tick=None, next_fire_at=following, late_by=late_by)


# --- the schedules table --------------------------------------------------------------------


def _schedule_of(row: Any) -> Schedule:
    return Schedule(cron=row.cron, timezone=row.timezone, catch_up=row.catch_up, input=row.input)


async def sync_schedule(conn: AsyncConnection, spec: PipelineSpec, *, now: datetime) -> None:
    """Make the pipeline's row match its newest version (call in the registration
    transaction): upsert it when the version has a ``schedule``, delete it when not.

    ``paused`` survives a new version; so does ``next_fire_at`` while cron and time zone
    are unchanged, so that a due tick is not lost to a re-registration.
    """
    s = tables.schedules
    schedule = spec.schedule
    if schedule is None:
        await conn.execute(delete(s).where(s.c.pipeline == spec.name))
        return
    insert = pg_insert(s).values(
        pipeline=spec.name,
        cron=schedule.cron,
        timezone=schedule.timezone,
        catch_up=schedule.catch_up,
        input=schedule.input,
        paused=False,
        next_fire_at=next_tick(schedule, now),
        updated_at=now,
    )
    same_ticks = (s.c.cron == insert.excluded.cron) & (s.c.timezone == insert.excluded.timezone)
    await conn.execute(
        insert.on_conflict_do_update(
            index_elements=[s.c.pipeline],
            set_={
                "cron": insert.excluded.cron,
                "timezone": insert.excluded.timezone,
                "catch_up": insert.excluded.catch_up,
                "input": insert.excluded.input,
                "next_fire_at": case(
                    (same_ticks, s.c.next_fire_at), else_=insert.excluded.next_fire_at
                ),
                "updated_at": insert.excluded.updated_at,
            },
        )
    )


def _item(row: Any) -> dict[str, Any]:
    """A row as the API shows it, times in UTC whatever the database session's zone."""
    return {
        "pipeline": row.pipeline,
        "cron": row.cron,
        "timezone": row.timezone,
        "catch_up": row.catch_up,
        "paused": row.paused,
        "next_fire_at": row.next_fire_at.astimezone(UTC),
        "last_fired_at": row.last_fired_at.astimezone(UTC) if row.last_fired_at else None,
    }


async def list_schedules(scheduler: Scheduler) -> list[dict[str, Any]]:
    s = tables.schedules
    async with scheduler.engine.connect() as conn:
        rows = (await conn.execute(select(s).order_by(s.c.pipeline))).all()
    return [_item(row) for row in rows]


async def set_paused(
    scheduler: Scheduler,
    name: str,
    *,
    paused: bool,
    by: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any] | None:
    """Pause or unpause; ``None`` when the pipeline has no schedule.

    Unpausing starts from the first tick after now: the paused period is not caught up.
    A change emits ``ScheduleUpdated``; asking for the state it is in already changes
    nothing and emits nothing.
    """
    s = tables.schedules
    now = now or scheduler.now()
    async with scheduler.unit_of_work() as uow:
        row = (
            await uow.conn.execute(select(s).where(s.c.pipeline == name).with_for_update())
        ).first()
        if row is None:
            return None
        if row.paused != paused:
            values: dict[str, Any] = {"paused": paused, "updated_at": now}
            if not paused:
                values["next_fire_at"] = next_tick(_schedule_of(row), now)
            row = (
                await uow.conn.execute(
                    update(s).where(s.c.pipeline == name).values(**values).returning(s)
                )
            ).one()
            uow.emit(
                scheduler.topics.pipelines,
                ScheduleUpdated(name=name, paused=paused, updated_by=by),
                key=name,
            )
        await uow.commit()
    return _item(row)


# --- the firing loop ------------------------------------------------------------------------


class CronRunner:
    """Fires due schedules through the scheduler's outbox; safe to run in every replica.

    The clock is the scheduler's unless one is given.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        clock: Callable[[], datetime] | None = None,
        batch: int = 100,
        max_sleep: float = 1.0,
    ) -> None:
        self.scheduler = scheduler
        self._clock = clock or scheduler.now
        self._batch = batch
        self._max_sleep = max_sleep
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="cron-schedules")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        """Look again now (a schedule was added or unpaused) instead of after the nap."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                wait = await self.fire_due()
            except Exception:
                log.exception("cron schedules failed; trying again")
                wait = self._max_sleep
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def fire_due(self, now: datetime | None = None) -> float:
        """Fire every due schedule; return the seconds until the next is due (at most
        ``max_sleep``, which also bounds how long a new or unpaused schedule goes unseen)."""
        supplied = now
        now = now or self._clock()
        s = tables.schedules
        topics = self.scheduler.topics
        async with self.scheduler.unit_of_work() as uow:
            due = (
                await uow.conn.execute(
                    select(s)
                    .where(~s.c.paused, s.c.next_fire_at <= now)
                    .order_by(s.c.next_fire_at)
                    .limit(self._batch)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for row in due:
                values: dict[str, Any] = {"updated_at": now}
                try:
                    schedule = _schedule_of(row)
                    firing = plan_firing(schedule, due_at=row.next_fire_at, now=now)
                except Exception:  # a time zone gone from tzdata, say: retry, do not block
                    log.exception("schedule of %r cannot be evaluated", row.pipeline)
                    values["next_fire_at"] = now + _RETRY_BROKEN
                else:
                    values["next_fire_at"] = firing.next_fire_at
                    if firing.tick is not None:
                        request = RunRequested(
                            pipeline=row.pipeline,
                            input=schedule.input,
                            idempotency_key=idempotency_key(row.pipeline, firing.tick),
                            requested_by="cron",
                        )
                        uow.emit(topics.runs_requested, request, key=row.pipeline)
                        values |= {"last_fired_at": now, "last_tick": firing.tick}
                        log.info(
                            "cron fired %s for tick %s (late by %.3fs)",
                            row.pipeline,
                            firing.tick.isoformat(),
                            firing.late_by.total_seconds(),
                        )
                    else:
                        log.info(
                            "cron skipped %s: tick missed by %.1fs (catch_up: skip)",
                            row.pipeline,
                            firing.late_by.total_seconds(),
                        )
                await uow.conn.execute(
                    update(s).where(s.c.pipeline == row.pipeline).values(**values)
                )
            next_due: datetime | None = await uow.conn.scalar(
                select(func.min(s.c.next_fire_at)).where(~s.c.paused)
            )
            await uow.commit()
        if len(due) == self._batch:
            return 0.0
        if next_due is None:
            return self._max_sleep
        # A row still due here is held by a peer: look again shortly, do not spin.
        until = next_due - (supplied or self._clock())
        return min(self._max_sleep, max(0.01, until.total_seconds()))
