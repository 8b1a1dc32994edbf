"""How the CLI arranges a run's attempt rows: grouped by step, fan-outs folded, re-runs
after a retry counted on their own."""

from __future__ import annotations

from typing import Any

from conveyor.cli._steps import FanOut, arrange_steps
from tests.unit.test_cli_control import _at, attempt


def _names(arranged: list[dict[str, Any] | FanOut]) -> list[tuple[str, Any]]:
    return [
        (e.step_id, "fan-out") if isinstance(e, FanOut) else (e["step_id"], e["attempt"])
        for e in arranged
    ]


def test_attempts_are_grouped_by_step_in_the_order_steps_appeared() -> None:
    steps = [attempt("b", 1, at=1), attempt("a", 1, at=2), attempt("b", 2, at=3)]
    assert _names(arrange_steps(steps)) == [("b", 1), ("b", 2), ("a", 1)]


def test_a_fan_out_counts_each_items_latest_attempt() -> None:
    steps = [
        attempt("each", 1, "failed", item=0),
        attempt("each", 2, "succeeded", item=0),  # the item's retry
        attempt("each", 1, "running", item=1),
        attempt("each", 1, "cancelled", item=2),
    ]
    [fan] = arrange_steps(steps)
    assert isinstance(fan, FanOut)
    assert fan.progress() == "1/3 items done, 1 cancelled, 1 running"
    assert fan.status == "running"
    assert fan.failed_items() == []


def test_the_steps_own_row_decides_its_status_and_total() -> None:
    steps = [
        *(attempt("each", item=i, at=1) for i in range(3)),
        attempt("each", 1, "failed", error={"type": "E", "message": "m"}, at=4),
    ]
    [fan] = arrange_steps(steps)
    assert isinstance(fan, FanOut)
    assert (fan.status, fan.attempt, fan.total) == ("failed", 1, 3)
    done = attempt("each", 1, "succeeded", output=[1, 2, 3, 4], at=4)
    [fan] = arrange_steps([attempt("each", item=0, at=1), done])
    assert isinstance(fan, FanOut)
    assert fan.progress() == "1/4 items done"  # the output says how many items there were
    assert fan.duration_ms == 3500


def test_all_items_done_without_the_steps_row_is_still_running() -> None:
    [fan] = arrange_steps([attempt("each", item=0), attempt("each", item=1)])
    assert isinstance(fan, FanOut)
    assert fan.status == "running"
    assert fan.duration_ms is None


def test_after_a_retry_a_rerun_fan_out_counts_only_its_new_items() -> None:
    before = [
        *(attempt("each", 1, "succeeded", item=i, at=1) for i in range(2)),
        attempt("each", 1, "failed", item=2, at=1),
        attempt("each", 1, "failed", at=3),
    ]
    rerun = [attempt("each", 2, "running", item=0, at=11)]
    arranged = arrange_steps([*before, *rerun], retried_at=_at(10))
    assert _names(arranged) == [("each", 1), ("each", "fan-out")]
    fan = arranged[-1]
    assert isinstance(fan, FanOut)
    assert fan.progress() == "0/1 items done, 1 running"
    assert len(fan.earlier_items) == 3

    # a fan-out upstream of the retried step was reused, not run again: all of it counts
    reused = arrange_steps(before[:2], retried_at=_at(10))
    assert isinstance(reused[0], FanOut)
    assert reused[0].progress() == "2/2 items done"
