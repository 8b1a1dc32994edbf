"""Rules the state machine applies: when a failure is worth another attempt and how long
to wait, and how a retry's ``--set`` edits change a run."""

from __future__ import annotations

import random
from typing import Any

from conveyor.contracts import ErrorInfo, PipelineSpec, RetryPolicy
from conveyor.scheduler._state import RunState, set_path

__all__ = ["apply_edits", "retry_delay", "should_retry"]


def should_retry(policy: RetryPolicy, error: ErrorInfo, attempt: int) -> bool:
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


def apply_edits(spec: PipelineSpec, state: RunState, edits: dict[str, Any]) -> None:
    """``input.<path>`` edits the run input; ``steps.<id>.with.<path>`` a step's config."""
    for path, value in edits.items():
        parts = path.split(".")
        if parts[0] == "input" and len(parts) >= 2:
            set_path(state.input, parts[1:], value)
        elif len(parts) >= 4 and parts[0] == "steps" and parts[2] == "with":
            if parts[1] not in state.steps:
                raise ValueError(f"--set {path}: pipeline {spec.name} has no step {parts[1]!r}")
            set_path(state.overrides.setdefault(parts[1], {}), parts[3:], value)
        else:
            raise ValueError(f"--set {path}: paths are input.<key> or steps.<step>.with.<key>")
