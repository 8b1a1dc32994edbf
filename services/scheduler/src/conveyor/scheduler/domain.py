"""The run state machine: pure, no I/O. Given a pipeline spec, a run's state and what just
happened, it updates the state and says what must happen next (commands).

Rules:
- A step is *ready* when every step it needs is done. It runs when at least one need
  succeeded (or failed and went on under ``on_failure: continue``), or it has no needs; a
  step whose needs were all skipped is skipped too, so a skipped branch skips what hangs
  off it alone.
- ``when`` is evaluated at that moment against the run's data; false skips the step.
- ``for_each`` renders to a list: one attempt per item, at most ``max_parallel`` in flight;
  the step's output is the items' outputs in input order. ``on_item_failure: fail_fast``
  (default) fails the step at the first failed item; ``collect`` runs every item and puts
  ``null`` where one failed.
- A failed attempt is retried while the error is retryable under the step's policy and
  attempts remain; then ``on_failure`` decides: fail the run (default), go on, or end the
  run gracefully as skipped or succeeded.
- A dispatched attempt with a timeout has a deadline; past it with no result (its runner
  vanished, or the broker lost the message) the same attempt is dispatched again, up to
  ``MAX_REDELIVERIES`` times, then it fails as ``StepLost``.
- The run ends when every step is done: its output is the output of its sink steps (the
  one sink's output, or ``{sink: output}`` when there are several).
- Results for an attempt other than the one in flight, or for a finished run, change
  nothing: a redelivered or late result is harmless.
"""

from __future__ import annotations

import random
from typing import Any

from conveyor.contracts import ErrorInfo, PipelineSpec, StepSpec
from conveyor.contracts.templates import TemplateError, is_truthy, render_value
from conveyor.scheduler._rules import apply_edits, retry_delay, should_retry
from conveyor.scheduler._state import (
    CancelAttempt,
    Command,
    CompleteRun,
    CompleteStep,
    DispatchStep,
    FailRun,
    ItemState,
    ParkRun,
    RetryStep,
    RunState,
    SkipStep,
    StepState,
)

__all__ = [
    "MAX_REDELIVERIES",
    "TERMINAL_RUN",
    "CancelAttempt",
    "Command",
    "CompleteRun",
    "CompleteStep",
    "DispatchStep",
    "FailRun",
    "ItemState",
    "ParkRun",
    "RetryStep",
    "RunState",
    "SkipStep",
    "StepState",
    "apply_edits",
    "cancel_run",
    "in_flight",
    "on_deadline",
    "on_retry_due",
    "on_step_completed",
    "on_step_failed",
    "resume_run",
    "retry_delay",
    "retry_run",
    "start_run",
    "step_context",
]

TERMINAL_RUN = frozenset({"succeeded", "failed", "cancelled", "skipped"})
_ACTIVE = frozenset({"pending", "scheduled", "running", "retrying"})
_IN_FLIGHT = frozenset({"scheduled", "running"})
MAX_REDELIVERIES = 3


# --- queries -----------------------------------------------------------------------------


def step_context(
    spec: PipelineSpec, state: RunState, step_id: str, *, item: Any = None, index: int | None = None
) -> dict[str, Any]:
    """What a step's templates may read: the run input, its upstream steps' outputs and,
    for a fan-out item, ``item`` and ``item_index``."""
    upstream = spec.upstream_of(step_id)
    context: dict[str, Any] = {
        "input": state.input,
        "steps": {
            sid: {"output": st.output, "status": st.status}
            for sid, st in state.steps.items()
            if sid in upstream
        },
        "run": {"id": state.run_id, "pipeline": state.pipeline, "version": state.version},
    }
    if index is not None:
        context["item"] = item
        context["item_index"] = index
    return context


def in_flight(state: RunState) -> list[tuple[str, int, int | None]]:
    """(step, attempt, item) of every attempt dispatched and not yet answered."""
    found: list[tuple[str, int, int | None]] = []
    for step_id, step in state.steps.items():
        if step.items is not None:
            found.extend(
                (step_id, item.attempt, index)
                for index, item in enumerate(step.items)
                if item.status in _IN_FLIGHT
            )
        elif step.status in _IN_FLIGHT:
            found.append((step_id, step.attempt, None))
    return found


# --- transitions -------------------------------------------------------------------------


def start_run(spec: PipelineSpec, state: RunState) -> list[Command]:
    state.status = "running"
    return _advance(spec, state)


def _target(state: RunState, step_id: str, attempt: int, item_index: int | None) -> Any:
    """The step or item a result is for, when it is the attempt in flight; else None."""
    step = state.steps.get(step_id)
    if state.status in TERMINAL_RUN or step is None:
        return None
    if item_index is None:
        target: Any = step if step.items is None else None
    elif step.items is not None and 0 <= item_index < len(step.items):
        target = step.items[item_index]
    else:
        target = None
    if target is None or target.attempt != attempt or target.status not in _IN_FLIGHT:
        return None
    return target


def on_step_completed(
    spec: PipelineSpec,
    state: RunState,
    *,
    step_id: str,
    attempt: int,
    output: Any,
    item_index: int | None = None,
    cost: float = 0.0,
) -> list[Command]:
    target = _target(state, step_id, attempt, item_index)
    if target is None:
        return []
    target.status, target.output, target.error = "succeeded", output, None
    over_budget = _charge(spec, state, cost=cost, step_id=step_id)
    if over_budget:
        return over_budget
    if item_index is not None:
        return _after_item(spec, state, step_id)
    return _advance(spec, state)


def on_step_failed(
    spec: PipelineSpec,
    state: RunState,
    *,
    step_id: str,
    attempt: int,
    error: ErrorInfo,
    item_index: int | None = None,
    rng: random.Random | None = None,
    cost: float = 0.0,
) -> list[Command]:
    target = _target(state, step_id, attempt, item_index)
    if target is None:
        return []
    policy = spec.retry_policy(step_id)
    target.error = error.model_dump(mode="json")
    retrying = should_retry(policy, error, attempt)
    target.status = "retrying" if retrying else "failed"
    over_budget = _charge(spec, state, cost=cost, step_id=step_id)
    if over_budget:
        return over_budget
    if retrying:
        delay = retry_delay(policy, attempt, retry_after_s=error.retry_after_s, rng=rng)
        return [RetryStep(step_id, attempt, attempt + 1, delay, error, item_index)]
    if item_index is not None:
        return _after_item(spec, state, step_id)
    return _step_failed(spec, state, step_id, error)


def on_retry_due(
    spec: PipelineSpec,
    state: RunState,
    *,
    step_id: str,
    attempt: int,
    item_index: int | None = None,
) -> list[Command]:
    """A retry timer fired: dispatch ``attempt`` unless the run moved on meanwhile."""
    step = state.steps.get(step_id)
    if state.status in TERMINAL_RUN or step is None:
        return []
    if item_index is None:
        target: Any = step
    elif step.items is not None and 0 <= item_index < len(step.items):
        target = step.items[item_index]
    else:
        return []
    if target.status != "retrying" or target.attempt + 1 != attempt:
        return []
    target.status, target.attempt, target.redeliveries = "scheduled", attempt, 0
    item = step.values[item_index] if item_index is not None and step.values else None
    return [DispatchStep(step_id, attempt, item_index, item)]


def on_deadline(
    spec: PipelineSpec,
    state: RunState,
    *,
    step_id: str,
    attempt: int,
    item_index: int | None = None,
) -> list[Command]:
    """No result by the attempt's deadline: dispatch it again, or give up as StepLost."""
    target = _target(state, step_id, attempt, item_index)
    if target is None:
        return []
    if target.redeliveries < MAX_REDELIVERIES:
        target.redeliveries += 1
        step = state.steps[step_id]
        item = step.values[item_index] if item_index is not None and step.values else None
        return [DispatchStep(step_id, attempt, item_index, item)]
    error = ErrorInfo(
        type="StepLost",
        message=f"no result after {MAX_REDELIVERIES + 1} deliveries past the step's deadline",
        retryable=True,
    )
    return on_step_failed(
        spec, state, step_id=step_id, attempt=attempt, error=error, item_index=item_index
    )


def _charge(spec: PipelineSpec, state: RunState, *, cost: float, step_id: str) -> list[Command]:
    """Add a result's cost to the run (the result is applied already); past the budget,
    fail or park the run."""
    if cost <= 0:
        return []
    state.cost += cost
    budget = spec.budget
    if budget is None or state.status != "running":
        return []
    allowed = budget.max_cost * state.budget_grants
    if state.cost <= allowed:
        return []
    reason = f"spent {state.cost:.4f}, over the run's budget of {allowed:.4f}"
    if budget.on_exceed == "park":
        state.status = "parked"
        return [ParkRun(reason, step_id)]
    error = ErrorInfo(type="BudgetExceeded", message=reason)
    commands = _cancel_in_flight(state, "the run went over its budget")
    state.status = "failed"
    state.error = error.model_dump(mode="json")
    return [*commands, FailRun(error, step_id)]


def resume_run(spec: PipelineSpec, state: RunState) -> list[Command]:
    """Go on with a parked run; a run parked by its budget gets another ``max_cost``."""
    if state.status != "parked":
        raise ValueError(f"run {state.run_id} is {state.status}, not parked")
    state.budget_grants += 1
    state.status = "running"
    return _advance(spec, state)


def cancel_run(state: RunState, *, reason: str) -> list[Command]:
    """Stop the run: nothing new starts; attempts in flight are reported cancelled."""
    if state.status in TERMINAL_RUN:
        return []
    commands = _cancel_in_flight(state, reason)
    state.status = "cancelled"
    return commands


def retry_run(
    spec: PipelineSpec,
    state: RunState,
    *,
    from_step: str | None,
    edits: dict[str, Any],
) -> tuple[str, list[Command]]:
    """Reopen a finished run from ``from_step`` (default: the first step that did not
    succeed). That step, everything downstream of it and every step that did not finish
    run again as new attempts; upstream outputs are reused. Raises ValueError when the
    request cannot apply."""
    if state.status not in TERMINAL_RUN:
        raise ValueError(f"run {state.run_id} is still {state.status}; cancel it or wait")
    if from_step is None:
        from_step = next(
            (s.id for s in spec.steps if state.steps[s.id].status in ("failed", "cancelled")),
            None,
        )
        if from_step is None:
            raise ValueError("nothing failed in this run; name the step to retry from with --from")
    if from_step not in state.steps:
        raise ValueError(f"pipeline {spec.name} has no step {from_step!r}")
    apply_edits(spec, state, edits)
    downstream = {s.id for s in spec.steps if from_step in spec.upstream_of(s.id)}
    for step_id, step in state.steps.items():
        rerun = step_id == from_step or step_id in downstream
        if rerun or step.status not in ("succeeded", "skipped"):
            step.status, step.output, step.error, step.redeliveries = "pending", None, None, 0
            step.item_base = max((i.attempt for i in step.items or []), default=step.item_base)
            step.items = step.values = None
    state.status, state.output, state.error = "running", None, None
    return from_step, _advance(spec, state)


# --- internals ---------------------------------------------------------------------------


def _cancel_in_flight(state: RunState, reason: str) -> list[Command]:
    commands: list[Command] = []
    for step_id, attempt, index in in_flight(state):
        step = state.steps[step_id]
        target = step if index is None or step.items is None else step.items[index]
        target.status = "cancelled"
        commands.append(CancelAttempt(step_id, attempt, index, reason))
    for step in state.steps.values():
        if step.status in _ACTIVE:
            step.status = "cancelled" if step.status != "pending" else step.status
        for item in step.items or []:
            if item.status == "retrying":
                item.status = "cancelled"
    return commands


def _step_failed(
    spec: PipelineSpec, state: RunState, step_id: str, error: ErrorInfo
) -> list[Command]:
    step = state.steps[step_id]
    step.status, step.error = "failed", error.model_dump(mode="json")
    policy = spec.step(step_id).failure_policy
    if policy == "continue":
        return _advance(spec, state)
    commands = _cancel_in_flight(state, f"the run ended after step {step_id!r} failed")
    if policy in ("skip_run", "succeed_run"):
        status = "skipped" if policy == "skip_run" else "succeeded"
        state.status = status
        state.output = _sink_output(spec, state)
        return [*commands, CompleteRun(state.output, status)]
    state.status = "failed"
    state.error = error.model_dump(mode="json")
    return [*commands, FailRun(error, step_id)]


def _after_item(spec: PipelineSpec, state: RunState, step_id: str) -> list[Command]:
    step = state.steps[step_id]
    assert step.items is not None
    if step.status != "running":  # finished already (an item failed fast): late results
        return []
    failed = [i for i, item in enumerate(step.items) if item.status == "failed"]
    if failed and spec.step(step_id).on_item_failure == "fail_fast":
        first = step.items[failed[0]]
        error = ErrorInfo(
            type=(first.error or {}).get("type", "StepFailed"),
            message=f"item {failed[0]} failed: {(first.error or {}).get('message', '')}",
            details={"item_index": failed[0]},
        )
        commands: list[Command] = []
        for index, item in enumerate(step.items):
            if item.status in (*_IN_FLIGHT, "retrying"):
                if item.status != "retrying":
                    reason = f"item {failed[0]} failed first"
                    commands.append(CancelAttempt(step_id, item.attempt, index, reason))
                item.status = "cancelled"
        commands.append(CompleteStep(step_id, step.attempt, None, error))
        return [*commands, *_step_failed(spec, state, step_id, error)]
    commands = _dispatch_items(spec, state, step_id)
    if all(item.status in ("succeeded", "failed") for item in step.items):
        step.status = "succeeded"
        step.output = [item.output for item in step.items]
        commands.append(CompleteStep(step_id, step.attempt, step.output))
        commands.extend(_advance(spec, state))
    return commands


def _dispatch_items(spec: PipelineSpec, state: RunState, step_id: str) -> list[Command]:
    step = state.steps[step_id]
    assert step.items is not None
    assert step.values is not None
    if state.status != "running":  # parked: items in flight finish, no new ones start
        return []
    limit = spec.step(step_id).max_parallel or len(step.items)
    busy = sum(1 for item in step.items if item.status in (*_IN_FLIGHT, "retrying"))
    commands: list[Command] = []
    for index, item in enumerate(step.items):
        if busy >= limit:
            break
        if item.status == "pending":
            item.status, item.attempt = "scheduled", item.attempt + 1
            commands.append(DispatchStep(step_id, item.attempt, index, step.values[index]))
            busy += 1
    return commands


def _start_step(spec: PipelineSpec, state: RunState, step: StepSpec) -> list[Command]:
    current = state.steps[step.id]
    current.attempt += 1
    if step.for_each is None:
        current.status = "scheduled"
        return [DispatchStep(step.id, current.attempt)]
    values = render_value(step.for_each, step_context(spec, state, step.id))
    if not isinstance(values, list):
        raise TemplateError(
            f"for_each must render to a list, got {type(values).__name__}: {step.for_each}"
        )
    current.status, current.values = "running", values
    current.items = [ItemState(attempt=current.item_base) for _ in values]
    if not values:
        current.status, current.output = "succeeded", []
        return [CompleteStep(step.id, current.attempt, [])]
    return _dispatch_items(spec, state, step.id)


def _advance(spec: PipelineSpec, state: RunState) -> list[Command]:
    commands: list[Command] = []
    progressed = True
    while progressed and state.status == "running":
        progressed = False
        for step in spec.steps:
            current = state.steps[step.id]
            if current.status != "pending":
                continue
            needs = [state.steps[n] for n in spec.needs_of(step.id)]
            if any(n.status in _ACTIVE for n in needs):
                continue
            progressed = True
            satisfied = [n for n in needs if n.status in ("succeeded", "failed")]
            if needs and not satisfied:
                current.status = "skipped"
                commands.append(SkipStep(step.id, "every step it needs was skipped"))
                continue
            try:
                if step.when is not None and not is_truthy(
                    render_value(step.when, step_context(spec, state, step.id))
                ):
                    current.status = "skipped"
                    commands.append(SkipStep(step.id, f"when is false: {step.when}"))
                    continue
                commands.extend(_start_step(spec, state, step))
            except TemplateError as exc:
                error = ErrorInfo(type="TemplateError", message=str(exc))
                commands.extend(_step_failed(spec, state, step.id, error))
                return commands
    if state.status == "running" and all(s.status not in _ACTIVE for s in state.steps.values()):
        everything_skipped = all(s.status == "skipped" for s in state.steps.values())
        state.status = "skipped" if everything_skipped else "succeeded"
        state.output = _sink_output(spec, state)
        commands.append(CompleteRun(state.output, state.status))
    return commands


def _sink_output(spec: PipelineSpec, state: RunState) -> Any:
    sinks = spec.sinks()
    outputs = {sid: state.steps[sid].output for sid in sinks}
    return outputs[sinks[0]] if len(sinks) == 1 else outputs
