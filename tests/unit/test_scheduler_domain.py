"""The run state machine, pure: no broker, no database."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.contracts import ErrorInfo, PipelineSpec, RetryPolicy, load_pipeline
from conveyor.scheduler import domain
from conveyor.scheduler.domain import (
    CompleteRun,
    DispatchStep,
    FailRun,
    RetryStep,
    RunState,
    SkipStep,
)


def _spec(yaml_text: str) -> PipelineSpec:
    return load_pipeline(yaml_text)


def _new(spec: PipelineSpec, run_input: dict | None = None) -> RunState:
    return RunState.new(spec, run_id="r1", version=1, run_input=run_input or {})


LINEAR = """
name: linear
steps:
  - {id: a, type: transform, with: {template: "a"}}
  - {id: b, type: transform, with: {template: "{{ steps.a.output }}b"}}
  - {id: c, type: transform, with: {template: "{{ steps.b.output }}c"}}
"""


def test_linear_pipeline_dispatches_one_step_at_a_time_and_completes() -> None:
    spec = _spec(LINEAR)
    state = _new(spec)
    assert domain.start_run(spec, state) == [DispatchStep("a", 1)]
    assert domain.on_step_completed(spec, state, step_id="a", attempt=1, output="a") == [
        DispatchStep("b", 1)
    ]
    assert domain.on_step_completed(spec, state, step_id="b", attempt=1, output="ab") == [
        DispatchStep("c", 1)
    ]
    commands = domain.on_step_completed(spec, state, step_id="c", attempt=1, output="abc")
    assert commands == [CompleteRun("abc", "succeeded")]
    assert state.status == "succeeded"


def test_redelivered_and_stale_results_change_nothing() -> None:
    spec = _spec(LINEAR)
    state = _new(spec)
    domain.start_run(spec, state)
    domain.on_step_completed(spec, state, step_id="a", attempt=1, output="a")
    assert domain.on_step_completed(spec, state, step_id="a", attempt=1, output="x") == []
    assert state.steps["a"].output == "a"
    assert domain.on_step_completed(spec, state, step_id="b", attempt=7, output="x") == []
    assert domain.on_step_completed(spec, state, step_id="nope", attempt=1, output="x") == []


def test_step_context_holds_input_and_upstream_outputs_only() -> None:
    spec = _spec(LINEAR)
    state = _new(spec, {"topic": "t"})
    domain.start_run(spec, state)
    domain.on_step_completed(spec, state, step_id="a", attempt=1, output="A")
    context = domain.step_context(spec, state, "b")
    assert context["input"] == {"topic": "t"}
    assert context["steps"] == {"a": {"output": "A", "status": "succeeded"}}
    assert context["run"]["id"] == "r1"


DIAMOND = """
name: diamond
steps:
  - {id: start, type: transform, with: {template: "s"}}
  - {id: left, type: transform, needs: [start], with: {template: "l"}}
  - {id: right, type: transform, needs: [start], with: {template: "r"}}
  - {id: join, type: transform, needs: [left, right], with: {template: "j"}}
"""


def test_diamond_dispatches_branches_together_and_joins_after_both() -> None:
    spec = _spec(DIAMOND)
    state = _new(spec)
    domain.start_run(spec, state)
    both = domain.on_step_completed(spec, state, step_id="start", attempt=1, output=1)
    assert both == [DispatchStep("left", 1), DispatchStep("right", 1)]
    assert domain.on_step_completed(spec, state, step_id="left", attempt=1, output=2) == []
    assert domain.on_step_completed(spec, state, step_id="right", attempt=1, output=3) == [
        DispatchStep("join", 1)
    ]


def test_several_sinks_give_a_mapping_output() -> None:
    spec = _spec(
        """
name: two-sinks
steps:
  - {id: a, type: transform, with: {template: "a"}}
  - {id: b, type: transform, needs: [], with: {template: "b"}}
"""
    )
    state = _new(spec)
    assert domain.start_run(spec, state) == [DispatchStep("a", 1), DispatchStep("b", 1)]
    domain.on_step_completed(spec, state, step_id="a", attempt=1, output="A")
    commands = domain.on_step_completed(spec, state, step_id="b", attempt=1, output="B")
    assert commands == [CompleteRun({"a": "A", "b": "B"}, "succeeded")]


CONDITIONAL = """
name: conditional
input: {go: {type: boolean}}
steps:
  - {id: check, type: transform, with: {template: "x"}}
  - {id: maybe, type: transform, needs: [check], when: "{{ input.go }}", with: {template: "m"}}
  - {id: after_maybe, type: transform, needs: [maybe], with: {template: "a"}}
  - {id: join, type: transform, needs: [check, maybe], with: {template: "j"}}
"""


def test_false_when_skips_the_step_and_what_hangs_off_it_alone() -> None:
    spec = _spec(CONDITIONAL)
    state = _new(spec, {"go": False})
    domain.start_run(spec, state)
    commands = domain.on_step_completed(spec, state, step_id="check", attempt=1, output="x")
    assert commands[0] == SkipStep("maybe", "when is false: {{ input.go }}")
    assert SkipStep("after_maybe", "every step it needs was skipped") in commands
    # join needs check (succeeded) and maybe (skipped): it still runs.
    assert DispatchStep("join", 1) in commands
    done = domain.on_step_completed(spec, state, step_id="join", attempt=1, output="j")
    assert done == [CompleteRun({"after_maybe": None, "join": "j"}, "succeeded")]


def test_true_when_runs_the_step() -> None:
    spec = _spec(CONDITIONAL)
    state = _new(spec, {"go": True})
    domain.start_run(spec, state)
    commands = domain.on_step_completed(spec, state, step_id="check", attempt=1, output="x")
    assert commands == [DispatchStep("maybe", 1)]


def test_a_run_whose_every_step_is_skipped_ends_skipped() -> None:
    spec = _spec(
        """
name: all-skipped
steps:
  - {id: a, type: transform, when: "{{ 1 > 2 }}", with: {template: "a"}}
  - {id: b, type: transform, with: {template: "b"}}
"""
    )
    state = _new(spec)
    commands = domain.start_run(spec, state)
    assert commands[-1] == CompleteRun(None, "skipped")
    assert state.status == "skipped"


def test_a_when_that_cannot_render_fails_the_run_with_a_clear_error() -> None:
    spec = _spec(
        """
name: bad-when
steps:
  - {id: a, type: transform, when: "{{ input.missing.deeper }}", with: {template: "a"}}
"""
    )
    state = _new(spec)
    commands = domain.start_run(spec, state)
    assert isinstance(commands[-1], FailRun)
    assert commands[-1].error.type == "TemplateError"
    assert state.status == "failed"


RETRYING = """
name: retrying
steps:
  - id: a
    type: http
    retry: {max_attempts: 3, initial: 1s, max: 10s, jitter: false}
    with: {url: "http://example.invalid"}
"""


def _boom(retryable: bool = True, retry_after: float | None = None) -> ErrorInfo:
    return ErrorInfo(
        type="HttpStatusError", message="500", retryable=retryable, retry_after_s=retry_after
    )


def test_retryable_failure_is_retried_with_backoff_until_attempts_run_out() -> None:
    spec = _spec(RETRYING)
    state = _new(spec)
    domain.start_run(spec, state)
    first = domain.on_step_failed(spec, state, step_id="a", attempt=1, error=_boom())
    assert first == [RetryStep("a", 1, 2, 1.0, _boom())]
    assert domain.on_retry_due(spec, state, step_id="a", attempt=2) == [DispatchStep("a", 2)]
    second = domain.on_step_failed(spec, state, step_id="a", attempt=2, error=_boom())
    assert second == [RetryStep("a", 2, 3, 2.0, _boom())]
    domain.on_retry_due(spec, state, step_id="a", attempt=3)
    last = domain.on_step_failed(spec, state, step_id="a", attempt=3, error=_boom())
    assert last == [FailRun(_boom(), "a")]
    assert state.status == "failed"


def test_non_retryable_failure_fails_the_run_at_once() -> None:
    spec = _spec(RETRYING)
    state = _new(spec)
    domain.start_run(spec, state)
    commands = domain.on_step_failed(spec, state, step_id="a", attempt=1, error=_boom(False))
    assert commands == [FailRun(_boom(False), "a")]


def test_retry_after_wins_when_it_asks_for_more() -> None:
    spec = _spec(RETRYING)
    state = _new(spec)
    domain.start_run(spec, state)
    [retry] = domain.on_step_failed(spec, state, step_id="a", attempt=1, error=_boom(True, 30))
    assert isinstance(retry, RetryStep)
    assert retry.delay_s == 30


def test_a_stale_retry_timer_does_nothing() -> None:
    spec = _spec(RETRYING)
    state = _new(spec)
    domain.start_run(spec, state)
    assert domain.on_retry_due(spec, state, step_id="a", attempt=2) == []


def test_continue_on_error_lets_the_run_go_on() -> None:
    spec = _spec(
        """
name: tolerant
steps:
  - {id: a, type: http, continue_on_error: true, with: {url: "http://x"}}
  - {id: b, type: transform, with: {template: "b"}}
"""
    )
    state = _new(spec)
    domain.start_run(spec, state)
    commands = domain.on_step_failed(spec, state, step_id="a", attempt=1, error=_boom(False))
    assert commands == [DispatchStep("b", 1)]


@given(
    attempt=st.integers(min_value=1, max_value=30),
    initial=st.floats(min_value=0.01, max_value=10),
    maximum=st.floats(min_value=0.01, max_value=100),
    seed=st.integers(),
)
def test_retry_delay_is_full_jitter_below_the_capped_exponential(
    attempt: int, initial: float, maximum: float, seed: int
) -> None:
    policy = RetryPolicy(max_attempts=50, initial=initial, max=maximum)
    delay = domain.retry_delay(policy, attempt, rng=random.Random(seed))
    assert 0 <= delay <= min(initial * 2 ** (attempt - 1), maximum)


@st.composite
def _dags(draw: st.DrawFn) -> PipelineSpec:
    size = draw(st.integers(min_value=1, max_value=9))
    steps = []
    for index in range(size):
        needs = (
            draw(st.lists(st.integers(min_value=0, max_value=index - 1), unique=True))
            if index
            else []
        )
        steps.append(
            {
                "id": f"s{index}",
                "type": "transform",
                "needs": [f"s{n}" for n in needs],
                "with": {"template": "x"},
            }
        )
    return PipelineSpec.model_validate({"name": "dag", "steps": steps})


@settings(max_examples=150, deadline=None)
@given(spec=_dags(), seed=st.integers())
def test_any_dag_runs_each_step_once_after_all_its_needs(spec: PipelineSpec, seed: int) -> None:
    rng = random.Random(seed)
    state = _new(spec)
    in_flight = [c for c in domain.start_run(spec, state) if isinstance(c, DispatchStep)]
    done: list[str] = []
    dispatched = [c.step_id for c in in_flight]
    finished = False
    while in_flight:
        command = in_flight.pop(rng.randrange(len(in_flight)))
        assert set(spec.needs_of(command.step_id)) <= set(done)
        done.append(command.step_id)
        for follow in domain.on_step_completed(
            spec, state, step_id=command.step_id, attempt=command.attempt, output=command.step_id
        ):
            if isinstance(follow, DispatchStep):
                in_flight.append(follow)
                dispatched.append(follow.step_id)
            elif isinstance(follow, CompleteRun):
                finished = True
    assert sorted(dispatched) == sorted(s.id for s in spec.steps)
    assert finished
    assert state.status == "succeeded"


@pytest.mark.parametrize("status", ["failed", "cancelled", "succeeded"])
def test_results_for_a_finished_run_are_ignored(status: str) -> None:
    spec = _spec(LINEAR)
    state = _new(spec)
    domain.start_run(spec, state)
    state.status = status
    assert domain.on_step_completed(spec, state, step_id="a", attempt=1, output="a") == []
    assert domain.on_step_failed(spec, state, step_id="a", attempt=1, error=_boom()) == []
