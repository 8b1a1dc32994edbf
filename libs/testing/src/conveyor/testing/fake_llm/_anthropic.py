"""The Anthropic Messages wire format (``POST /v1/messages``)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from conveyor.testing.fake_llm._dialect import (
    REQUESTS_LIMIT,
    TOKENS_LIMIT,
    InvalidRequest,
    json_pieces,
    pieces,
    retry_after_headers,
    sse,
    text_of,
)
from conveyor.testing.fake_llm._model import Answer, Prompt, Tool
from conveyor.testing.fake_llm._script import Provider, Reply

_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
    "refusal": "refusal",
}
_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_MESSAGES = {
    "invalid_request_error": "Invalid request.",
    "authentication_error": "invalid x-api-key",
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "The requested resource could not be found.",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": "This request would exceed your organization's rate limit.",
    "api_error": "Internal server error",
    "overloaded_error": "Overloaded",
    "context_length_exceeded": "prompt is too long: 210000 tokens > 200000 maximum",
}


class AnthropicDialect:
    provider: Provider = "anthropic"

    def prompt(self, body: Mapping[str, Any]) -> Prompt:
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model: Field required")
        if not isinstance(body.get("max_tokens"), int):
            raise InvalidRequest("max_tokens: Field required")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages: at least one message is required")
        if not all(
            isinstance(m, Mapping) and m.get("role") in ("user", "assistant") for m in messages
        ):
            raise InvalidRequest("messages: each message needs a role of user or assistant")
        user_texts = [_plain_text(m.get("content")) for m in messages if m["role"] == "user"]
        asked = [text for text in user_texts if text] or [text_of(messages[-1].get("content"))]
        last = messages[-1]
        tool_results = [
            text_of(block.get("content"))
            for block in last.get("content") or []
            if last["role"] == "user"
            and isinstance(block, Mapping)
            and block.get("type") == "tool_result"
        ]
        tools = [
            Tool(
                name=str(t["name"]),
                description=str(t.get("description") or ""),
                parameters=t.get("input_schema") or {},
            )
            for t in body.get("tools") or []
            if isinstance(t, Mapping) and "name" in t and "input_schema" in t
        ]
        system = body.get("system")
        return Prompt(
            model=model,
            last_user_text=asked[-1],
            transcript=" ".join([text_of(system), *(text_of(m.get("content")) for m in messages)]),
            json_schema=_output_schema(body),
            tools=tools,
            tool_choice=_tool_choice(body.get("tool_choice"), has_tools=bool(tools)),
            tool_results=tool_results,
            max_tokens=body["max_tokens"],
            stop=list(body.get("stop_sequences") or []),
            tool_id_prefix="toolu_",
        )

    def message(self, answer: Answer, *, body: Mapping[str, Any]) -> dict[str, Any]:
        return {
            **_envelope(body),
            "content": _blocks(answer),
            "stop_reason": _stop_reason(answer),
            "stop_sequence": answer.stop_sequence,
            "usage": _usage(answer.prompt_tokens, answer.completion_tokens),
        }

    def events(self, answer: Answer, *, body: Mapping[str, Any]) -> Iterator[str]:
        start = {
            **_envelope(body),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": _usage(answer.prompt_tokens, 1),
        }
        yield sse({"type": "message_start", "message": start}, event="message_start")
        for index, block in enumerate(_blocks(answer)):
            if block["type"] == "text":
                opening: dict[str, Any] = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": p} for p in pieces(block["text"])]
            else:
                opening = {**block, "input": {}}
                arguments = answer.tool_uses[index - _text_blocks(answer)].arguments
                deltas = [
                    {"type": "input_json_delta", "partial_json": p} for p in json_pieces(arguments)
                ]
            yield sse(
                {"type": "content_block_start", "index": index, "content_block": opening},
                event="content_block_start",
            )
            if index == 0:
                yield sse({"type": "ping"}, event="ping")
            for delta in deltas:
                yield sse(
                    {"type": "content_block_delta", "index": index, "delta": delta},
                    event="content_block_delta",
                )
            yield sse({"type": "content_block_stop", "index": index}, event="content_block_stop")
        yield sse(
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": _stop_reason(answer),
                    "stop_sequence": answer.stop_sequence,
                },
                "usage": {"output_tokens": answer.completion_tokens},
            },
            event="message_delta",
        )
        yield sse({"type": "message_stop"}, event="message_stop")

    def error(
        self, status: int, *, message: str | None, code: str | None, param: str | None = None
    ) -> dict[str, Any]:
        kind = _ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
        text = message or _MESSAGES.get(code or "") or _MESSAGES[kind]
        return {
            "type": "error",
            "error": {"type": kind, "message": text},
            "request_id": f"req_{uuid.uuid4().hex[:24]}",
        }

    def headers(
        self, *, served: int, status: int, tokens: int, reply: Reply | None
    ) -> dict[str, str]:
        limited = status == 429
        wait = reply.retry_after if reply is not None and reply.retry_after is not None else 1.0
        reset = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=wait)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        remaining_tokens = str(0 if limited else max(0, TOKENS_LIMIT - tokens))
        headers = {
            "request-id": f"req_{uuid.uuid4().hex[:24]}",
            "anthropic-ratelimit-requests-limit": str(REQUESTS_LIMIT),
            "anthropic-ratelimit-requests-remaining": str(
                0 if limited else max(0, REQUESTS_LIMIT - served)
            ),
            "anthropic-ratelimit-requests-reset": reset,
        }
        for kind in ("tokens", "input-tokens", "output-tokens"):
            headers[f"anthropic-ratelimit-{kind}-limit"] = str(TOKENS_LIMIT)
            headers[f"anthropic-ratelimit-{kind}-remaining"] = remaining_tokens
            headers[f"anthropic-ratelimit-{kind}-reset"] = reset
        return {**headers, **retry_after_headers(reply)}


def models_body(models: list[str]) -> dict[str, Any]:
    """``GET /v1/models`` in Anthropic's shape."""
    data = [
        {"type": "model", "id": model, "display_name": model, "created_at": "2025-01-01T00:00:00Z"}
        for model in models
    ]
    return {
        "data": data,
        "has_more": False,
        "first_id": models[0] if models else None,
        "last_id": models[-1] if models else None,
    }


def _envelope(body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": f"msg_01{uuid.uuid4().hex[:22]}",
        "type": "message",
        "role": "assistant",
        "model": str(body.get("model")),
    }


def _blocks(answer: Answer) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    text = answer.text if answer.text is not None else answer.refusal
    if text:
        blocks.append({"type": "text", "text": text})
    blocks.extend(
        {"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}
        for use in answer.tool_uses
    )
    return blocks


def _text_blocks(answer: Answer) -> int:
    return sum(1 for block in _blocks(answer) if block["type"] == "text")


def _stop_reason(answer: Answer) -> str:
    if answer.stop_sequence is not None:
        return "stop_sequence"
    return _STOP[answer.finish]


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "service_tier": "standard",
    }


def _plain_text(content: Any) -> str:
    """The text a user typed, leaving out tool results."""
    if isinstance(content, list):
        content = [
            b for b in content if not (isinstance(b, Mapping) and b.get("type") == "tool_result")
        ]
    return text_of(content)


def _output_schema(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, Mapping) else body.get("output_format")
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        return schema if isinstance(schema, Mapping) else {}
    return None


def _tool_choice(choice: Any, *, has_tools: bool) -> str:
    if not isinstance(choice, Mapping):
        return "auto" if has_tools else "none"
    kind = choice.get("type")
    if kind == "tool":
        return str(choice.get("name"))
    return "required" if kind == "any" else str(kind or "auto")
