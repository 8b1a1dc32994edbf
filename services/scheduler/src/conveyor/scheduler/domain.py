"""The run state machine: pure, no I/O. Given a pipeline spec, a run's state and what just
happened, it updates the state and says what must happen next (commands).

Rules:
- A step is *ready* when every step it needs is done. It runs when at least one need
  succeeded (or failed with ``continue_on_error``), or it has no needs; a step whose needs
  were all skipped is skipped too, so a skipped branch skips what hangs off it alone.
- ``when`` is evaluated at that moment against the run's data; false skips the step.
- A failed attempt is retried while the error is retryable under the step's policy and
  attempts remain; then the step fails, which fails the run unless the step says
  ``continue_on_error``.
- The run ends when every step is done: its output is the output of its sink steps (the
  one sink's output, or ``{sink: output}`` when there are several).
- Results for an attempt other than the current one, or for a finished run, change
  nothing: a redelivered or late result is harmless.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from conveyor.contracts import ErrorInfo, PipelineSpec, RetryPolicy
from conveyor.contracts.templates import TemplateError, is_truthy, render_value

__all__ = [
    "TERMINAL_RUN",
    "Command",
    "CompleteRun",
    "DispatchStep",
    "FailRun",
    "RetryStep",
    "RunState",
    "SkipStep",
    "StepState",
    "on_retry_due",
    "on_step_completed",
    "on_step_failed",
    "retry_delay",
    "start_run",
    "step_context",
]

TERMINAL_RUN = frozenset({"succeeded", "failed", "cancelled", "skipped"})
_ACTIVE_STEP = frozenset({"pending", "scheduled", "running", "retrying"})


@dataclass
class StepState:
    status: str = "pending"
    attempt: int = 0
    output: Any = None
    error: dict[str, Any] | None = None


@dataclass
class RunState:
    run_id: str
    pipeline: str
    version: int
    input: dict[str, Any]
    status: str = "queued"
    steps: dict[str, StepState] = field(default_factory=dict)
    output: Any = None
    error: dict[str, Any] | None = None

    @classmethod
    def new(
        cls, spec: PipelineSpec, *, run_id: str, version: int, run_input: dict[str, Any]
    ) -> RunState:
        return cls(
            run_id=run_id,
            pipeline=spec.name,
            version=version,
            input=run_input,
            steps={step.id: StepState() for step in spec.steps},
        )


@dataclass(frozen=True)
class DispatchStep:
    step_id: str
    attempt: int


@dataclass(frozen=True)
class SkipStep:
    step_id: str
    reason: str


@dataclass(frozen=True)
class RetryStep:
    step_id: str
    attempt: int
    next_attempt: int
    delay_s: float
    error: ErrorInfo


@dataclass(frozen=True)
class CompleteRun:
    output: Any
    status: str = "succeeded"


@dataclass(frozen=True)
class FailRun:
    error: ErrorInfo
    step_id: str | None = None


Command = DispatchStep | SkipStep | RetryStep | CompleteRun | FailRun


def step_context(spec: PipelineSpec, state: RunState, step_id: str) -> dict[str, Any]:
    """What a step's templates may read: the run input and its upstream steps' outputs."""
    upstream = spec.upstream_of(step_id)
    return {
        "input": state.input,
        "steps": {
            sid: {"output": st.output, "status": st.status}
            for sid, st in state.steps.items()
            if sid in upstream
        },
        "run": {"id": state.run_id, "pipeline": state.pipeline, "version": state.version},
    }


def start_run(spec: PipelineSpec, state: RunState) -> list[Command]:
    state.status = "running"
    return _advance(spec, state)


def on_step_completed(
    spec: PipelineSpec, state: RunState, *, step_id: str, attempt: int, output: Any
) -> list[Command]:
    step = state.steps.get(step_id)
    if state.status in TERMINAL_RUN or step is None or step.attempt != attempt:
        return []
    if step.status not in ("scheduled", "running"):
        return []
    step.status = "succeeded"
    step.output = output
    step.error = None
    return _advance(spec, state)


def on_step_failed(
    spec: PipelineSpec,
    state: RunState,
    *,
    step_id: str,
    attempt: int,
    error: ErrorInfo,
    rng: random.Random | None = None,
) -> list[Command]:
    step = state.steps.get(step_id)
    if state.status in TERMINAL_RUN or step is None or step.attempt != attempt:
        return []
    if step.status not in ("scheduled", "running"):
        return []
    policy = spec.retry_policy(step_id)
    if _should_retry(policy, error, attempt):
        step.status = "retrying"
        step.error = error.model_dump(mode="json")
        delay = retry_delay(policy, attempt, retry_after_s=error.retry_after_s, rng=rng)
        return [RetryStep(step_id, attempt, attempt + 1, delay, error)]
    step.status = "failed"
    step.error = error.model_dump(mode="json")
    if spec.step(step_id).continue_on_error:
        return _advance(spec, state)
    return _fail(state, error, step_id)


def on_retry_due(
    spec: PipelineSpec, state: RunState, *, step_id: str, attempt: int
) -> list[Command]:
    """A retry timer fired: dispatch ``attempt`` unless the run moved on meanwhile."""
    step = state.steps.get(step_id)
    if state.status in TERMINAL_RUN or step is None or step.status != "retrying":
        return []
    if step.attempt + 1 != attempt:
        return []
    step.status = "scheduled"
    step.attempt = attempt
    return [DispatchStep(step_id, attempt)]


def _should_retry(policy: RetryPolicy, error: ErrorInfo, attempt: int) -> bool:
    if attempt >= policy.max_attempts or error.type in policy.non_retryable:
        return False
    if policy.retry_on is not None:
        return error.type in policy.retry_on
    return error.retryable


def retry_delay(
    policy: RetryPolicy,
    attempt: int,
    *,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Delay before attempt ``attempt + 1``: exponential (or fixed) with full jitter, capped
    at ``policy.max``; a provider's Retry-After wins when it asks for more."""
    base = policy.initial if policy.backoff == "fixed" else policy.initial * 2 ** (attempt - 1)
    ceiling = min(base, policy.max)
    delay = (rng or random).uniform(0, ceiling) if policy.jitter else ceiling
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


def _fail(state: RunState, error: ErrorInfo, step_id: str | None) -> list[Command]:
    state.status = "failed"
    state.error = error.model_dump(mode="json")
    return [FailRun(error, step_id)]


def _advance(spec: PipelineSpec, state: RunState) -> list[Command]:
    commands: list[Command] = []
    progressed = True
    while progressed and state.status not in TERMINAL_RUN:
        progressed = False
        for step in spec.steps:
            current = state.steps[step.id]
            if current.status != "pending":
                continue
            needs = [state.steps[n] for n in spec.needs_of(step.id)]
            if any(n.status in _ACTIVE_STEP for n in needs):
                continue
            progressed = True
            satisfied = [n for n in needs if n.status in ("succeeded", "failed")]
            if needs and not satisfied:
                current.status = "skipped"
                commands.append(SkipStep(step.id, "every step it needs was skipped"))
                continue
            if step.when is not None:
                try:
                    run_it = is_truthy(render_value(step.when, step_context(spec, state, step.id)))
                except TemplateError as exc:
                    error = ErrorInfo(type="TemplateError", message=f"when: {exc}")
                    current.status = "failed"
                    current.error = error.model_dump(mode="json")
                    commands.extend(_fail(state, error, step.id))
                    return commands
                if not run_it:
                    current.status = "skipped"
                    commands.append(SkipStep(step.id, f"when is false: {step.when}"))
                    continue
            current.status = "scheduled"
            current.attempt += 1
            commands.append(DispatchStep(step.id, current.attempt))
    if state.status not in TERMINAL_RUN and all(
        s.status not in _ACTIVE_STEP for s in state.steps.values()
    ):
        commands.append(_complete(spec, state))
    return commands


def _complete(spec: PipelineSpec, state: RunState) -> CompleteRun:
    sinks = spec.sinks()
    outputs = {sid: state.steps[sid].output for sid in sinks}
    state.output = outputs[sinks[0]] if len(sinks) == 1 else outputs
    everything_skipped = all(s.status == "skipped" for s in state.steps.values())
    state.status = "skipped" if everything_skipped else "succeeded"
    return CompleteRun(state.output, state.status)
