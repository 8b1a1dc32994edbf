"""Pipeline semantics in the pure state machine: fan-out, failure policies, deadlines,
cancel and retry-from-step."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.contracts import ErrorInfo, PipelineSpec, load_pipeline
from conveyor.scheduler import domain
from conveyor.scheduler.domain import (
    CancelAttempt,
    CompleteRun,
    CompleteStep,
    DispatchStep,
    FailRun,
    RetryStep,
    RunState,
)


def _new(spec: PipelineSpec, run_input: dict | None = None) -> RunState:
    return RunState.new(spec, run_id="r", version=1, run_input=run_input or {})


def _err(retryable: bool = False) -> ErrorInfo:
    return ErrorInfo(type="Boom", message="boom", retryable=retryable)


FAN = """
name: fan
input: {items: {type: array}}
steps:
  - id: each
    type: http
    for_each: "{{ input.items }}"
    max_parallel: 2
    on_item_failure: %s
    with: {url: "http://x/{{ item }}"}
  - id: after
    type: transform
    with: {template: "{{ steps.each.output | length }}"}
"""


def _dispatched(commands: list) -> list[tuple[int | None, object]]:
    return [(c.item_index, c.item) for c in commands if isinstance(c, DispatchStep)]


def test_fan_out_keeps_at_most_max_parallel_in_flight_and_joins_in_input_order() -> None:
    spec = load_pipeline(FAN % "fail_fast")
    state = _new(spec, {"items": ["a", "b", "c", "d", "e"]})
    assert _dispatched(domain.start_run(spec, state)) == [(0, "a"), (1, "b")]
    # item 1 finishes first: exactly one more starts
    more = domain.on_step_completed(
        spec, state, step_id="each", attempt=1, output="B", item_index=1
    )
    assert _dispatched(more) == [(2, "c")]
    assert len(domain.in_flight(state)) == 2
    for index in (0, 2, 3):
        follow = domain.on_step_completed(
            spec, state, step_id="each", attempt=1, output=f"out{index}", item_index=index
        )
        assert len(domain.in_flight(state)) <= 2
    last = domain.on_step_completed(
        spec, state, step_id="each", attempt=1, output="E", item_index=4
    )
    assert CompleteStep("each", 1, ["out0", "B", "out2", "out3", "E"]) in last
    assert DispatchStep("after", 1) in last
    assert follow is not None


def test_fail_fast_cancels_the_items_in_flight_and_fails_the_run() -> None:
    spec = load_pipeline(FAN % "fail_fast")
    state = _new(spec, {"items": [1, 2, 3]})
    domain.start_run(spec, state)
    commands = domain.on_step_failed(
        spec, state, step_id="each", attempt=1, error=_err(), item_index=0
    )
    assert CancelAttempt("each", 1, 1, "item 0 failed first") in commands
    assert isinstance(commands[-1], FailRun)
    assert commands[-1].error.details == {"item_index": 0}
    assert state.status == "failed"
    # the cancelled item's late result changes nothing
    late = domain.on_step_completed(spec, state, step_id="each", attempt=1, output=2, item_index=1)
    assert late == []


def test_collect_runs_every_item_and_puts_null_where_one_failed() -> None:
    spec = load_pipeline(FAN % "collect")
    state = _new(spec, {"items": [1, 2, 3]})
    domain.start_run(spec, state)
    domain.on_step_failed(spec, state, step_id="each", attempt=1, error=_err(), item_index=0)
    domain.on_step_completed(spec, state, step_id="each", attempt=1, output="two", item_index=1)
    done = domain.on_step_completed(
        spec, state, step_id="each", attempt=1, output="three", item_index=2
    )
    assert CompleteStep("each", 1, [None, "two", "three"]) in done
    assert state.steps["each"].status == "succeeded"


def test_an_empty_fan_out_succeeds_with_an_empty_list() -> None:
    spec = load_pipeline(FAN % "fail_fast")
    state = _new(spec, {"items": []})
    commands = domain.start_run(spec, state)
    assert commands[0] == CompleteStep("each", 1, [])
    assert DispatchStep("after", 1) in commands


def test_for_each_that_is_not_a_list_fails_the_run_clearly() -> None:
    spec = load_pipeline(FAN % "fail_fast")
    state = _new(spec, {"items": "nope"})
    commands = domain.start_run(spec, state)
    assert isinstance(commands[-1], FailRun)
    assert "for_each must render to a list, got str" in commands[-1].error.message


def test_items_retry_one_by_one() -> None:
    spec = load_pipeline((FAN % "fail_fast").replace("max_parallel: 2", "retry: {max_attempts: 2}"))
    state = _new(spec, {"items": ["a", "b"]})
    domain.start_run(spec, state)
    [retry] = domain.on_step_failed(
        spec, state, step_id="each", attempt=1, error=_err(True), item_index=1
    )
    assert isinstance(retry, RetryStep)
    assert retry.item_index == 1
    assert domain.on_retry_due(spec, state, step_id="each", attempt=2, item_index=1) == [
        DispatchStep("each", 2, 1, "b")
    ]


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=30),
    limit=st.integers(min_value=1, max_value=6),
    order=st.randoms(use_true_random=False),
)
def test_fan_out_never_exceeds_max_parallel_and_runs_each_item_once(
    size: int, limit: int, order
) -> None:  # type: ignore[no-untyped-def]
    spec = load_pipeline((FAN % "fail_fast").replace("max_parallel: 2", f"max_parallel: {limit}"))
    state = _new(spec, {"items": list(range(size))})
    flying = [
        c
        for c in domain.start_run(spec, state)
        if isinstance(c, DispatchStep) and c.step_id == "each"
    ]
    started = [c.item_index for c in flying]
    while flying:
        assert len(flying) <= limit
        done = flying.pop(order.randrange(len(flying)))
        for c in domain.on_step_completed(
            spec,
            state,
            step_id="each",
            attempt=1,
            output=done.item * 10,
            item_index=done.item_index,
        ):
            if isinstance(c, DispatchStep) and c.step_id == "each":
                flying.append(c)
                started.append(c.item_index)
    assert sorted(started) == list(range(size))
    assert state.steps["each"].output == [i * 10 for i in range(size)]


POLICY = """
name: policy
steps:
  - {id: a, type: http, on_failure: %s, with: {url: "http://x"}}
  - {id: b, type: transform, with: {template: "b"}}
"""


@pytest.mark.parametrize(
    ("policy", "status", "last"),
    [
        ("fail_run", "failed", FailRun),
        ("skip_run", "skipped", CompleteRun),
        ("succeed_run", "succeeded", CompleteRun),
    ],
)
def test_on_failure_decides_how_the_run_ends(policy: str, status: str, last: type) -> None:
    spec = load_pipeline(POLICY % policy)
    state = _new(spec)
    domain.start_run(spec, state)
    commands = domain.on_step_failed(spec, state, step_id="a", attempt=1, error=_err())
    assert isinstance(commands[-1], last)
    assert state.status == status
    assert DispatchStep("b", 1) not in commands


def test_on_failure_continue_lets_the_run_go_on() -> None:
    spec = load_pipeline(POLICY % "continue")
    state = _new(spec)
    domain.start_run(spec, state)
    assert domain.on_step_failed(spec, state, step_id="a", attempt=1, error=_err()) == [
        DispatchStep("b", 1)
    ]


def test_a_lost_attempt_is_dispatched_again_then_fails_as_lost() -> None:
    spec = load_pipeline(POLICY % "fail_run")
    state = _new(spec)
    domain.start_run(spec, state)
    for _ in range(domain.MAX_REDELIVERIES):
        assert domain.on_deadline(spec, state, step_id="a", attempt=1) == [DispatchStep("a", 1)]
    commands = domain.on_deadline(spec, state, step_id="a", attempt=1)
    assert isinstance(commands[-1], FailRun)
    assert commands[-1].error.type == "StepLost"


def test_a_deadline_after_the_result_does_nothing() -> None:
    spec = load_pipeline(POLICY % "fail_run")
    state = _new(spec)
    domain.start_run(spec, state)
    domain.on_step_completed(spec, state, step_id="a", attempt=1, output=1)
    assert domain.on_deadline(spec, state, step_id="a", attempt=1) == []


DIAMOND = """
name: d
input: {x: {type: string}}
steps:
  - {id: a, type: transform, with: {template: "{{ input.x }}"}}
  - {id: b, type: http, with: {url: "http://x/{{ steps.a.output }}"}}
  - {id: c, type: transform, needs: [a], with: {template: "c"}}
  - {id: d, type: transform, needs: [b, c], with: {template: "d"}}
"""


def test_cancel_stops_new_work_and_reports_attempts_in_flight() -> None:
    spec = load_pipeline(DIAMOND)
    state = _new(spec, {"x": "1"})
    domain.start_run(spec, state)
    domain.on_step_completed(spec, state, step_id="a", attempt=1, output="1")
    commands = domain.cancel_run(state, reason="user")
    assert set(commands) == {
        CancelAttempt("b", 1, None, "user"),
        CancelAttempt("c", 1, None, "user"),
    }
    assert state.status == "cancelled"
    assert domain.on_step_completed(spec, state, step_id="b", attempt=1, output="x") == []
    assert domain.cancel_run(state, reason="again") == []


def test_retry_from_a_step_reuses_upstream_outputs_and_numbers_new_attempts() -> None:
    spec = load_pipeline(DIAMOND)
    state = _new(spec, {"x": "1"})
    domain.start_run(spec, state)
    domain.on_step_completed(spec, state, step_id="a", attempt=1, output="1")
    domain.on_step_completed(spec, state, step_id="c", attempt=1, output="C")
    domain.on_step_failed(spec, state, step_id="b", attempt=1, error=_err())
    assert state.status == "failed"
    step, commands = domain.retry_run(
        spec, state, from_step=None, edits={"steps.b.with.url": "http://fixed"}
    )
    assert step == "b"
    assert commands == [DispatchStep("b", 2)]
    assert state.config_of(spec.step("b")) == {"url": "http://fixed"}
    assert state.steps["a"].output == "1"
    assert state.steps["c"].status == "succeeded"
    done = domain.on_step_completed(spec, state, step_id="b", attempt=2, output="B")
    assert done == [DispatchStep("d", 1)]


def test_retry_with_edited_input_reruns_from_the_named_step() -> None:
    spec = load_pipeline(DIAMOND)
    state = _new(spec, {"x": "1"})
    domain.start_run(spec, state)
    for sid in ("a", "b", "c"):
        domain.on_step_completed(spec, state, step_id=sid, attempt=1, output=sid)
    domain.on_step_completed(spec, state, step_id="d", attempt=1, output="d")
    assert state.status == "succeeded"
    _, commands = domain.retry_run(spec, state, from_step="a", edits={"input.x": "2"})
    assert commands == [DispatchStep("a", 2)]
    assert state.input == {"x": "2"}
    assert all(state.steps[s].status == "pending" for s in "bcd")


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"nope": 1}, "paths are input"),
        ({"steps.zz.with.url": 1}, "no step 'zz'"),
    ],
)
def test_bad_retry_edits_are_refused(edits: dict, message: str) -> None:
    spec = load_pipeline(DIAMOND)
    state = _new(spec, {"x": "1"})
    domain.start_run(spec, state)
    domain.cancel_run(state, reason="x")
    with pytest.raises(ValueError, match=message):
        domain.retry_run(spec, state, from_step="a", edits=edits)


def test_a_running_run_cannot_be_retried() -> None:
    spec = load_pipeline(DIAMOND)
    state = _new(spec, {"x": "1"})
    domain.start_run(spec, state)
    with pytest.raises(ValueError, match="still running"):
        domain.retry_run(spec, state, from_step="a", edits={})


def test_state_round_trips_through_json() -> None:
    spec = load_pipeline(FAN % "collect")
    state = _new(spec, {"items": [1, 2]})
    domain.start_run(spec, state)
    step = state.steps["each"]
    assert domain.StepState.from_json(step.to_json()) == step


BUDGET = """
name: budget
budget: {max_cost: 0.10, on_exceed: %s}
steps:
  - {id: a, type: transform, with: {template: "a"}}
  - {id: b, type: transform, with: {template: "b"}}
"""


def test_spending_within_the_budget_changes_nothing() -> None:
    spec = load_pipeline(BUDGET % "fail")
    state = _new(spec)
    domain.start_run(spec, state)
    commands = domain.on_step_completed(spec, state, step_id="a", attempt=1, output=1, cost=0.05)
    assert commands == [DispatchStep("b", 1)]
    assert state.cost == 0.05


def test_going_over_a_fail_budget_fails_the_run_and_keeps_the_result() -> None:
    spec = load_pipeline(BUDGET % "fail")
    state = _new(spec)
    domain.start_run(spec, state)
    [fail] = domain.on_step_completed(spec, state, step_id="a", attempt=1, output=1, cost=0.25)
    assert isinstance(fail, FailRun)
    assert fail.error.type == "BudgetExceeded"
    assert "over the run's budget of 0.1000" in fail.error.message
    assert state.status == "failed"
    assert state.steps["a"].status == "succeeded"


def test_a_failed_attempt_costs_too() -> None:
    spec = load_pipeline(BUDGET % "fail")
    state = _new(spec)
    domain.start_run(spec, state)
    [fail] = domain.on_step_failed(spec, state, step_id="a", attempt=1, error=_err(), cost=1)
    assert fail.error.type == "BudgetExceeded"


def test_going_over_a_park_budget_parks_until_resumed_with_another_grant() -> None:
    spec = load_pipeline(BUDGET % "park")
    state = _new(spec)
    domain.start_run(spec, state)
    [park] = domain.on_step_completed(spec, state, step_id="a", attempt=1, output="A", cost=0.15)
    assert isinstance(park, domain.ParkRun)
    assert state.status == "parked"
    assert state.steps["a"].output == "A"  # the result that went over is kept
    assert domain.resume_run(spec, state) == [DispatchStep("b", 1)]
    assert state.budget_grants == 2
    # 0.15 + 0.10 = 0.25 is over two grants of 0.10: the next result parks it again
    [again] = domain.on_step_completed(spec, state, step_id="b", attempt=1, output="B", cost=0.1)
    assert isinstance(again, domain.ParkRun)


def test_only_a_parked_run_can_be_resumed() -> None:
    spec = load_pipeline(BUDGET % "park")
    state = _new(spec)
    domain.start_run(spec, state)
    with pytest.raises(ValueError, match="not parked"):
        domain.resume_run(spec, state)
