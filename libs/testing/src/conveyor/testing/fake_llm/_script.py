"""What a test scripts (replies) and what the fake saw (recorded requests).

Replies are queued per model and consumed in order; a reply queued for ``None`` answers
any model once the model's own queue is empty. Everything here is guarded by one lock,
because tests script from their own thread while the server answers from its thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Provider = Literal["openai", "anthropic"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


@dataclass(frozen=True)
class ToolCall:
    """A tool call the fake model makes: ``ToolCall("get_weather", {"city": "Paris"})``.

    ``arguments`` may be a mapping (serialised as JSON) or a string sent verbatim, which
    is how a test sends arguments that are not valid JSON.
    """

    name: str
    arguments: Mapping[str, Any] | str = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True, kw_only=True)
class Reply:
    """One scripted answer.

    - ``text``: the assistant's text; ``json``: a value returned as JSON content, or as
      the arguments of the tool the fake calls (a forced tool; or, when the request asks
      for no JSON response format, the tool it would call by default).
    - ``tool_calls``: tool calls instead of (or next to) text.
    - ``status``: an HTTP error status answered with the provider's error body; with
      ``retry_after`` (seconds, sent as ``retry-after``), ``code`` (OpenAI's
      ``error.code``, e.g. ``"context_length_exceeded"``) and ``message``.
    - ``finish_reason``: forces ``"length"`` or ``"content_filter"`` (Anthropic:
      ``max_tokens`` / ``refusal``); ``refusal`` sends a model refusal text.
    - ``delay``: seconds to wait before answering; ``malformed``: invalid JSON where JSON
      was asked for; ``raw_body``: send these bytes as the body, whatever they are.
    - ``usage``: ``(prompt_tokens, completion_tokens)`` instead of the word count;
      ``headers``: extra response headers.
    """

    text: str | None = None
    json: Any = None
    tool_calls: Sequence[ToolCall] = ()
    status: int = 200
    retry_after: float | None = None
    code: str | None = None
    message: str | None = None
    finish_reason: FinishReason | None = None
    refusal: str | None = None
    delay: float = 0.0
    malformed: bool = False
    raw_body: str | bytes | None = None
    usage: tuple[int, int] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received, for assertions."""

    provider: Provider
    method: str
    path: str
    model: str | None
    body: Mapping[str, Any]
    headers: Mapping[str, str]

    @property
    def stream(self) -> bool:
        """Whether the client asked for a streamed answer."""
        return bool(self.body.get("stream"))


class Script:
    """Thread-safe reply queues and request log shared by the server's endpoints."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str | None, deque[Reply]] = {}
        self._requests: list[RecordedRequest] = []
        self._counter = 0

    def add(self, model: str | None, replies: Sequence[Reply | str]) -> None:
        """Queue replies for ``model`` (``None``: any model); a string is ``Reply(text=...)``."""
        queued = [Reply(text=reply) if isinstance(reply, str) else reply for reply in replies]
        with self._lock:
            self._queues.setdefault(model, deque()).extend(queued)

    def next_reply(self, model: str | None) -> Reply | None:
        """The next reply for ``model``, falling back to the any-model queue."""
        with self._lock:
            for key in (model, None):
                queue = self._queues.get(key)
                if queue:
                    return queue.popleft()
        return None

    def pending(self, model: str | None = None) -> int:
        """How many scripted replies for ``model`` (``None``: the any-model queue) remain."""
        with self._lock:
            return len(self._queues.get(model, ()))

    def record(self, request: RecordedRequest) -> int:
        """Log a request; returns how many requests were served so far (for rate headers)."""
        with self._lock:
            self._requests.append(request)
            self._counter += 1
            return self._counter

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._queues.clear()
            self._requests.clear()
            self._counter = 0
