"""Topic names and the decoding rule of each topic.

Every name hangs off one prefix (``conveyor`` by default) so that several stacks, or
several tests, share a broker without seeing each other's messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from conveyor.contracts.events import (
    CONTROL_ADAPTER,
    PIPELINE_ADAPTER,
    RUN_EVENT_ADAPTER,
    STEP_RESULT_ADAPTER,
    DeadLetter,
    Event,
    RunRequested,
    StepReady,
)

__all__ = ["EventDecodeError", "Topics", "decode_event"]

_READY_INFIX = ".steps.ready."


@dataclass(frozen=True)
class Topics:
    prefix: str = "conveyor"

    @property
    def runs_requested(self) -> str:
        return f"{self.prefix}.runs.requested"

    @property
    def steps_completed(self) -> str:
        return f"{self.prefix}.steps.completed"

    @property
    def runs_events(self) -> str:
        return f"{self.prefix}.runs.events"

    @property
    def runs_control(self) -> str:
        return f"{self.prefix}.runs.control"

    @property
    def pipelines(self) -> str:
        return f"{self.prefix}.pipelines"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq"

    def ready(self, kind: str) -> str:
        """``conveyor.steps.ready.<kind>``: one topic, one runner consumer group, per kind."""
        return f"{self.prefix}{_READY_INFIX}{kind}"

    def kind_of(self, topic: str) -> str | None:
        head = f"{self.prefix}{_READY_INFIX}"
        return topic[len(head) :] if topic.startswith(head) else None

    def core(self) -> list[str]:
        return [
            self.runs_requested,
            self.steps_completed,
            self.runs_events,
            self.runs_control,
            self.pipelines,
            self.dlq,
        ]

    def adapter_for(self, topic: str) -> TypeAdapter[Any]:
        adapter = _ADAPTERS.get(topic[len(self.prefix) + 1 :])
        if adapter is not None:
            return adapter
        if self.kind_of(topic) is not None:
            return _STEP_READY
        raise EventDecodeError(f"no event type is carried on topic {topic!r}")


class EventDecodeError(ValueError):
    """A message that is not a valid event for its topic; the reason is the message."""


_STEP_READY: TypeAdapter[Any] = TypeAdapter(StepReady)
_ADAPTERS: dict[str, TypeAdapter[Any]] = {
    "runs.requested": TypeAdapter(RunRequested),
    "steps.completed": STEP_RESULT_ADAPTER,
    "runs.events": RUN_EVENT_ADAPTER,
    "runs.control": CONTROL_ADAPTER,
    "pipelines": PIPELINE_ADAPTER,
    "dlq": TypeAdapter(DeadLetter),
}


def decode_event(
    topics: Topics, topic: str, raw: bytes | None, *, fallback_event_id: UUID
) -> Event:
    """Decode one message of ``topic``.

    A producer may leave out ``event_id`` (a plain trigger is just ``{"pipeline": ...}``);
    the caller then supplies one derived from the record's coordinates, so that a
    redelivery of the same record decodes to the same id and is deduplicated.
    """
    if not raw:
        raise EventDecodeError("empty message body")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EventDecodeError(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EventDecodeError(f"body is JSON {type(data).__name__}, expected an object")
    data.setdefault("event_id", str(fallback_event_id))
    try:
        event: Event = topics.adapter_for(topic).validate_python(data)
    except ValidationError as exc:
        raise EventDecodeError(_describe(exc)) from None
    return event


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        message = err["msg"]
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):
            message = str(err["ctx"]["error"])  # our validators' own text, no prefix
        parts.append(f"{where}: {message}")
    more = exc.error_count() - len(parts)
    return "invalid event: " + "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
