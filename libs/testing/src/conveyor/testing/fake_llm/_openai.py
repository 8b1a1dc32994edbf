"""The OpenAI Chat Completions wire format (``POST /v1/chat/completions``)."""

from __future__ import annotations

import time
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

_FINISH = {"refusal": "stop"}
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("permission_error", None, "You are not allowed to use this model."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached on requests per min (RPM)."),
    500: ("server_error", None, "The server had an error while processing your request."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_MESSAGES = {
    "context_length_exceeded": "This model's maximum context length is 128000 tokens. However, "
    "your messages resulted in 130000 tokens. Please reduce the length of the messages.",
    "content_filter": "The response was filtered due to the prompt triggering content "
    "management policy.",
}


class OpenAIDialect:
    provider: Provider = "openai"

    def prompt(self, body: Mapping[str, Any]) -> Prompt:
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("you must provide a model parameter", param="model")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must contain at least one message", param="messages")
        if not all(isinstance(m, Mapping) and "role" in m for m in messages):
            raise InvalidRequest("each message must be an object with a 'role'", param="messages")
        user = [m for m in messages if m["role"] == "user"]
        last_assistant = max(
            (i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1
        )
        fmt = body.get("response_format")
        fmt = fmt if isinstance(fmt, Mapping) else {}
        schema_spec = fmt.get("json_schema")
        schema_spec = schema_spec if isinstance(schema_spec, Mapping) else {}
        tools = [
            Tool(
                name=str(t["function"].get("name", "tool")),
                description=str(t["function"].get("description") or ""),
                parameters=t["function"].get("parameters") or {},
            )
            for t in body.get("tools") or []
            if isinstance(t, Mapping) and isinstance(t.get("function"), Mapping)
        ]
        stop = body.get("stop")
        return Prompt(
            model=model,
            last_user_text=text_of((user or messages)[-1].get("content")),
            transcript=" ".join(_message_text(m) for m in messages),
            json_schema=schema_spec.get("schema", {}) if fmt.get("type") == "json_schema" else None,
            json_schema_name=str(schema_spec.get("name") or "answer"),
            json_object=fmt.get("type") == "json_object",
            tools=tools,
            tool_choice=_tool_choice(body.get("tool_choice"), has_tools=bool(tools)),
            tool_results=[
                text_of(m.get("content"))
                for m in messages[last_assistant + 1 :]
                if m["role"] == "tool"
            ],
            max_tokens=body.get("max_completion_tokens") or body.get("max_tokens"),
            stop=[stop] if isinstance(stop, str) else list(stop or []),
            tool_id_prefix="call_",
        )

    def message(self, answer: Answer, *, body: Mapping[str, Any]) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": answer.text,
            "refusal": answer.refusal,
            "annotations": [],
        }
        if answer.tool_uses:
            message["tool_calls"] = [
                {
                    "id": use.id,
                    "type": "function",
                    "function": {"name": use.name, "arguments": use.arguments},
                }
                for use in answer.tool_uses
            ]
        return {
            **_envelope(body, obj="chat.completion"),
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": _FINISH.get(answer.finish, answer.finish),
                }
            ],
            "usage": _usage(answer),
            "service_tier": "default",
        }

    def events(self, answer: Answer, *, body: Mapping[str, Any]) -> Iterator[str]:
        envelope = _envelope(body, obj="chat.completion.chunk")
        options = body.get("stream_options") or {}
        with_usage = isinstance(options, Mapping) and bool(options.get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            frame: dict[str, Any] = {
                **envelope,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            if with_usage:
                frame["usage"] = None
            return sse(frame)

        yield chunk({"role": "assistant", "content": "", "refusal": None})
        for piece in pieces(answer.text or ""):
            yield chunk({"content": piece})
        for piece in pieces(answer.refusal or ""):
            yield chunk({"refusal": piece})
        for index, use in enumerate(answer.tool_uses):
            yield chunk(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": use.id,
                            "type": "function",
                            "function": {"name": use.name, "arguments": ""},
                        }
                    ]
                }
            )
            for piece in json_pieces(use.arguments):
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        yield chunk({}, _FINISH.get(answer.finish, answer.finish))
        if with_usage:
            yield sse({**envelope, "choices": [], "usage": _usage(answer)})
        yield sse("[DONE]")

    def error(
        self, status: int, *, message: str | None, code: str | None, param: str | None = None
    ) -> dict[str, Any]:
        kind, default_code, default_message = _ERRORS.get(
            status,
            (
                "server_error" if status >= 500 else "invalid_request_error",
                None,
                f"Error {status}.",
            ),
        )
        code = code or default_code
        if code == "context_length_exceeded":
            param = param or "messages"
        return {
            "error": {
                "message": message or _MESSAGES.get(code or "", default_message),
                "type": kind,
                "param": param,
                "code": code,
            }
        }

    def headers(
        self, *, served: int, status: int, tokens: int, reply: Reply | None
    ) -> dict[str, str]:
        limited = status == 429
        remaining_requests = 0 if limited else max(0, REQUESTS_LIMIT - served)
        return {
            "x-request-id": f"req_{uuid.uuid4().hex}",
            "openai-processing-ms": "1",
            "x-ratelimit-limit-requests": str(REQUESTS_LIMIT),
            "x-ratelimit-remaining-requests": str(remaining_requests),
            "x-ratelimit-reset-requests": _reset(reply, default="6ms"),
            "x-ratelimit-limit-tokens": str(TOKENS_LIMIT),
            "x-ratelimit-remaining-tokens": str(0 if limited else max(0, TOKENS_LIMIT - tokens)),
            "x-ratelimit-reset-tokens": _reset(reply, default="0s"),
            **retry_after_headers(reply),
        }


def models_body(models: list[str]) -> dict[str, Any]:
    """``GET /v1/models`` in OpenAI's shape."""
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "conveyor-fake"}
            for model in models
        ],
    }


def _envelope(body: Mapping[str, Any], *, obj: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:29]}",
        "object": obj,
        "created": int(time.time()),
        "model": str(body.get("model")),
        "system_fingerprint": "fp_conveyor_fake",
    }


def _usage(answer: Answer) -> dict[str, Any]:
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _message_text(message: Mapping[str, Any]) -> str:
    calls = message.get("tool_calls") or []
    arguments = [
        c["function"].get("arguments", "")
        for c in calls
        if isinstance(c, Mapping) and isinstance(c.get("function"), Mapping)
    ]
    return " ".join([text_of(message.get("content")), *map(str, arguments)])


def _tool_choice(choice: Any, *, has_tools: bool) -> str:
    if isinstance(choice, Mapping):
        function = choice.get("function")
        return str(function.get("name")) if isinstance(function, Mapping) else "required"
    if isinstance(choice, str):
        return choice
    return "auto" if has_tools else "none"


def _reset(reply: Reply | None, *, default: str) -> str:
    if reply is not None and reply.retry_after is not None:
        return f"{reply.retry_after:g}s"
    return default
