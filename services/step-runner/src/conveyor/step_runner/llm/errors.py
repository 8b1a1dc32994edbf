"""How an llm step fails, as data the scheduler can act on.

Each provider failure is first classified (``FailureClass``): the class decides whether
the next model of the fallback chain is tried, and, once every model failed, which
``StepError`` the step ends with::

    StepError
    └── LlmError
        ├── ProviderNotConfigured   no key and no base URL for the provider (never retried)
        ├── RateLimited             429 from every model tried (retryable, Retry-After)
        ├── ProviderServerError     5xx / overloaded, or the circuit is open (retryable)
        ├── ProviderTimeout         the provider call timed out (retryable)
        ├── ContextLengthExceeded   the prompt does not fit the model
        ├── ContentFiltered         the provider refused or filtered the answer
        ├── InvalidOutput           not valid JSON for ``output_schema``, even after repair
        ├── ProviderError           any other provider answer (4xx): not retried
        └── ToolRoundsExceeded      the model kept calling tools past ``max_tool_rounds``
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from conveyor.contracts import StepMetrics
from conveyor.runtime.runner import StepError

__all__ = [
    "RETRYABLE_CLASSES",
    "ContentFiltered",
    "ContextLengthExceeded",
    "Failure",
    "FailureClass",
    "InvalidOutput",
    "LlmError",
    "ProviderError",
    "ProviderNotConfigured",
    "ProviderServerError",
    "ProviderTimeout",
    "RateLimited",
    "ToolRoundsExceeded",
    "step_error",
]

FailureClass = Literal[
    "rate_limit",
    "server_error",
    "timeout",
    "context_length",
    "content_filter",
    "invalid_output",
    "other",
]
RETRYABLE_CLASSES = frozenset({"rate_limit", "server_error", "timeout"})


class LlmError(StepError):
    pass


class ProviderNotConfigured(LlmError):
    pass


class RateLimited(LlmError):
    retryable = True


class ProviderServerError(LlmError):
    retryable = True


class ProviderTimeout(LlmError):
    retryable = True


class ContextLengthExceeded(LlmError):
    pass


class ContentFiltered(LlmError):
    pass


class InvalidOutput(LlmError):
    pass


class ProviderError(LlmError):
    pass


class ToolRoundsExceeded(LlmError):
    pass


_ERRORS: dict[str, type[LlmError]] = {
    "rate_limit": RateLimited,
    "server_error": ProviderServerError,
    "timeout": ProviderTimeout,
    "context_length": ContextLengthExceeded,
    "content_filter": ContentFiltered,
    "invalid_output": InvalidOutput,
    "other": ProviderError,
}


@dataclass(eq=False)
class Failure(Exception):
    """One failed provider call, classified; raised inside the llm step, never out of it."""

    cls: FailureClass
    message: str
    retry_after_s: float | None = None
    status: int | None = None
    billed: tuple[int, int] = (0, 0)
    """Tokens in/out the provider charged for the failed call (an answer it gave)."""
    raw: str | None = None
    """The answer text, for an invalid output or a refusal."""
    headers: Mapping[str, str] | None = None
    """The provider's response headers, for the rate limiter."""

    def __str__(self) -> str:
        return f"{self.cls}: {self.message}"

    def as_record(self) -> dict[str, Any]:
        return {"type": self.cls, "message": self.message}


def step_error(failure: Failure, *, details: dict[str, Any]) -> LlmError:
    """The step's error once no model answered: the last failure decides its type."""
    error_type = _ERRORS[failure.cls]
    details = {**details, "class": failure.cls}
    if failure.status is not None:
        details["status"] = failure.status
    if failure.raw is not None:
        details["raw"] = failure.raw
    usage = details.get("usage") or {}
    return error_type(
        failure.message,
        retry_after_s=failure.retry_after_s,
        details=details,
        # Failed calls the provider billed still count against the run's budget.
        metrics=StepMetrics(
            tokens_in=int(usage.get("tokens_in", 0)),
            tokens_out=int(usage.get("tokens_out", 0)),
            cost=float(usage.get("cost", 0.0)),
        ),
    )
