"""Cron tick logic, pure: next and latest ticks, time zones, catch-up after downtime, grace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from conveyor.contracts import Schedule
from conveyor.scheduler.cron import (
    GRACE_CAP,
    grace_for,
    idempotency_key,
    latest_tick,
    next_tick,
    plan_firing,
)


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


S = timedelta(seconds=1)


# --- next and latest tick -------------------------------------------------------------------


def test_next_tick_of_five_fields_is_strictly_after() -> None:
    every_5_min = Schedule(cron="*/5 * * * *")
    assert next_tick(every_5_min, at(2024, 1, 1, 12, 0)) == at(2024, 1, 1, 12, 5)
    assert next_tick(every_5_min, at(2024, 1, 1, 12, 3, 59)) == at(2024, 1, 1, 12, 5)


def test_the_sixth_field_is_seconds() -> None:
    at_30s = Schedule(cron="* * * * * 30")
    assert next_tick(at_30s, at(2024, 1, 1, 12, 0, 0)) == at(2024, 1, 1, 12, 0, 30)
    assert next_tick(at_30s, at(2024, 1, 1, 12, 0, 30)) == at(2024, 1, 1, 12, 1, 30)
    every_second = Schedule(cron="* * * * * *")
    half = at(2024, 1, 1, 12, 0, 0) + timedelta(milliseconds=500)
    assert next_tick(every_second, half) == at(2024, 1, 1, 12, 0, 1)


def test_ticks_follow_the_schedules_time_zone() -> None:
    nine_in_paris = Schedule(cron="0 9 * * *", timezone="Europe/Paris")
    # Winter: UTC+1; summer: UTC+2.
    assert next_tick(nine_in_paris, at(2024, 1, 15, 12)) == at(2024, 1, 16, 8)
    assert next_tick(nine_in_paris, at(2024, 7, 15, 12)) == at(2024, 7, 16, 7)
    tick = next_tick(nine_in_paris, at(2024, 7, 15, 12))
    assert tick.tzinfo is UTC
    assert tick.astimezone(ZoneInfo("Europe/Paris")).hour == 9


def test_a_tick_in_the_skipped_hour_of_a_dst_change_moves_on() -> None:
    half_past = Schedule(cron="30 * * * *", timezone="America/New_York")
    # 2024-03-10 02:30 does not exist in New York: 01:30 EST is followed by 03:30 EDT.
    first = next_tick(half_past, at(2024, 3, 10, 6, 0))  # 01:00 EST
    assert first == at(2024, 3, 10, 6, 30)
    assert next_tick(half_past, first) == at(2024, 3, 10, 7, 30)  # 03:30 EDT, an hour later


def test_latest_tick_is_at_or_before_now() -> None:
    every_5_min = Schedule(cron="*/5 * * * *")
    assert latest_tick(every_5_min, at(2024, 1, 1, 12, 0)) == at(2024, 1, 1, 12, 0)
    assert latest_tick(every_5_min, at(2024, 1, 1, 12, 4, 59)) == at(2024, 1, 1, 12, 0)
    every_second = Schedule(cron="* * * * * *")
    now = at(2024, 1, 1, 12, 0, 7) + timedelta(milliseconds=999)
    assert latest_tick(every_second, now) == at(2024, 1, 1, 12, 0, 7)


def test_idempotency_key_names_the_tick_in_utc_whatever_the_zone() -> None:
    tick = datetime(2024, 1, 1, 13, 0, tzinfo=ZoneInfo("Europe/Paris"))
    assert idempotency_key("nightly", tick) == "cron:nightly:2024-01-01T12:00:00+00:00"


# --- grace -----------------------------------------------------------------------------------


def test_grace_is_one_period_capped_at_five_seconds() -> None:
    assert grace_for(Schedule(cron="* * * * * *"), at(2024, 1, 1)) == S
    assert grace_for(Schedule(cron="* * * * * */3"), at(2024, 1, 1)) == 3 * S
    assert grace_for(Schedule(cron="0 * * * *"), at(2024, 1, 1)) == GRACE_CAP == 5 * S


# --- what a due schedule fires ---------------------------------------------------------------

HOURLY = "0 * * * *"
TICK = at(2024, 1, 1, 12)


def test_an_on_time_tick_fires_and_the_next_is_one_period_on() -> None:
    for catch_up in ("skip", "once"):
        schedule = Schedule(cron=HOURLY, catch_up=catch_up)
        firing = plan_firing(schedule, due_at=TICK, now=TICK + timedelta(milliseconds=20))
        assert firing.tick == TICK
        assert firing.next_fire_at == at(2024, 1, 1, 13)


def test_nothing_fires_before_the_tick() -> None:
    firing = plan_firing(Schedule(cron=HOURLY), due_at=TICK, now=TICK - S)
    assert firing.tick is None
    assert firing.next_fire_at == TICK


@pytest.mark.parametrize(
    ("late", "fires"),
    [(timedelta(0), True), (5 * S, True), (5 * S + timedelta(microseconds=1), False)],
)
def test_skip_fires_a_late_tick_only_within_the_grace(late: timedelta, fires: bool) -> None:
    firing = plan_firing(Schedule(cron=HOURLY, catch_up="skip"), due_at=TICK, now=TICK + late)
    assert (firing.tick == TICK) is fires
    assert firing.next_fire_at == at(2024, 1, 1, 13)


def test_the_grace_of_a_per_second_schedule_is_one_second() -> None:
    every_second = Schedule(cron="* * * * * *", catch_up="skip")
    on_edge = plan_firing(every_second, due_at=TICK, now=TICK + timedelta(milliseconds=999))
    assert on_edge.tick == TICK
    # 1.5 s after TICK the current tick is TICK+1 s, late by 0.5 s: that one fires.
    later = plan_firing(every_second, due_at=TICK, now=TICK + timedelta(milliseconds=1500))
    assert later.tick == TICK + S
    assert later.next_fire_at == TICK + 2 * S


def test_after_downtime_skip_drops_every_missed_tick() -> None:
    schedule = Schedule(cron=HOURLY, catch_up="skip")
    back = at(2024, 1, 1, 15, 20)  # ticks 12:00 .. 15:00 went by unfired
    firing = plan_firing(schedule, due_at=TICK, now=back)
    assert firing.tick is None
    assert firing.next_fire_at == at(2024, 1, 1, 16)


def test_after_downtime_skip_fires_the_current_tick_when_back_within_its_grace() -> None:
    schedule = Schedule(cron=HOURLY, catch_up="skip")
    back = at(2024, 1, 1, 15, 0, 2)
    firing = plan_firing(schedule, due_at=TICK, now=back)
    assert firing.tick == at(2024, 1, 1, 15)  # only the current one; 12, 13, 14 dropped
    assert firing.next_fire_at == at(2024, 1, 1, 16)


def test_after_downtime_once_fires_one_run_as_the_latest_missed_tick() -> None:
    schedule = Schedule(cron=HOURLY, catch_up="once")
    back = at(2024, 1, 1, 15, 20)
    firing = plan_firing(schedule, due_at=TICK, now=back)
    assert firing.tick == at(2024, 1, 1, 15)
    assert firing.next_fire_at == at(2024, 1, 1, 16)  # no burst: 12, 13, 14 are folded in
    assert firing.late_by == timedelta(minutes=20)


def test_catch_up_of_a_per_second_schedule_after_a_long_outage_is_one_decision() -> None:
    every_second = Schedule(cron="* * * * * *", catch_up="once")
    back = TICK + timedelta(days=2, milliseconds=250)
    firing = plan_firing(every_second, due_at=TICK, now=back)
    assert firing.tick == TICK + timedelta(days=2)
    assert firing.next_fire_at == TICK + timedelta(days=2, seconds=1)
