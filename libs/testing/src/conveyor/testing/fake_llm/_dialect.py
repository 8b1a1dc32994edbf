"""What every provider dialect does, and the helpers they share."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from conveyor.testing.fake_llm._model import Answer, Prompt
from conveyor.testing.fake_llm._script import Provider, Reply

REQUESTS_LIMIT = 10_000
TOKENS_LIMIT = 2_000_000


class InvalidRequest(Exception):
    """The request is not one the provider would accept: answered with a 400."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class Dialect(Protocol):
    """One provider's wire format, around the provider-neutral fake model."""

    provider: Provider

    def prompt(self, body: Mapping[str, Any]) -> Prompt:
        """The prompt of a request body; raises `InvalidRequest` when the body is invalid."""
        ...

    def message(self, answer: Answer, *, body: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON body of a non-streamed answer."""
        ...

    def events(self, answer: Answer, *, body: Mapping[str, Any]) -> Iterator[str]:
        """The server-sent events of a streamed answer."""
        ...

    def error(
        self, status: int, *, message: str | None, code: str | None, param: str | None = None
    ) -> dict[str, Any]:
        """The provider's error body for an HTTP status."""
        ...

    def headers(
        self, *, served: int, status: int, tokens: int, reply: Reply | None
    ) -> dict[str, str]:
        """Rate-limit and request-id headers, sent on every response."""
        ...


def sse(data: Mapping[str, Any] | str, *, event: str | None = None) -> str:
    """One server-sent event frame."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def pieces(text: str) -> list[str]:
    """Text cut into word-sized stream deltas that join back into the same text."""
    return re.findall(r"\s*\S+\s*", text) or ([text] if text else [])


def json_pieces(text: str, size: int = 12) -> list[str]:
    """JSON text cut into fixed-size fragments, as providers stream tool arguments."""
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def text_of(content: Any) -> str:
    """The text of a message content: a string, or a list of typed parts/blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping):
                if isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "tool_result":
                    texts.append(text_of(part.get("content")))
                elif part.get("type") == "tool_use":
                    texts.append(json.dumps(part.get("input", {})))
        return " ".join(texts)
    return ""


def retry_after_headers(reply: Reply | None) -> dict[str, str]:
    if reply is None or reply.retry_after is None:
        return {}
    seconds = reply.retry_after
    whole = str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
    return {"retry-after": whole, "retry-after-ms": str(int(seconds * 1000))}
