"""The provider adapters: one neutral request in, one neutral completion out, through the
real ``openai`` / ``anthropic`` SDKs (``max_retries=0``: retries and fallback are ours).

A conversation is kept in a neutral form (``role`` system/user/assistant/tool; assistant
turns may carry ``tool_calls``; tool turns a ``tool_call_id``) and each adapter writes it
in its provider's dialect. Every SDK failure becomes a classified ``Failure``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import anthropic
import openai

from conveyor.step_runner.llm.errors import Failure, FailureClass
from conveyor.step_runner.llm.ratelimit import parse_retry_after
from conveyor.step_runner.llm.schema import OutputSchema

__all__ = [
    "AnthropicProvider",
    "Completion",
    "LlmRequest",
    "OpenAIProvider",
    "Provider",
    "ToolCallOut",
    "ToolSpec",
    "classify",
]

ANTHROPIC_DEFAULT_MAX_TOKENS = 4096
"""Anthropic requires ``max_tokens``; this is sent when the step sets none."""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class LlmRequest:
    model: str
    messages: list[dict[str, Any]]
    temperature: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = None
    schema: OutputSchema | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    timeout: float = 120.0


@dataclass(frozen=True)
class ToolCallOut:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Completion:
    text: str | None
    tool_calls: list[ToolCallOut]
    finish_reason: str  # stop | length | tool_calls
    tokens_in: int
    tokens_out: int
    headers: Mapping[str, str]


class Provider(Protocol):
    name: str
    ignores_temperature: bool

    async def complete(self, request: LlmRequest) -> Completion: ...

    async def aclose(self) -> None: ...


async def _parsed(raw: Any) -> Any:
    parsed = raw.parse()  # openai's raw response parses synchronously, anthropic's not
    return await parsed if inspect.isawaitable(parsed) else parsed


def _arguments(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {"_raw": text}
    return value if isinstance(value, dict) else {"value": value}


class OpenAIProvider:
    """OpenAI, or any endpoint speaking its Chat Completions protocol (Ollama, vLLM)."""

    ignores_temperature = False

    def __init__(self, name: str, *, api_key: str, base_url: str | None) -> None:
        self.name = name
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0)

    async def complete(self, request: LlmRequest) -> Completion:
        kwargs: dict[str, Any] = {"model": request.model, "messages": self._messages(request)}
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.max_tokens is not None:
            # OpenAI's reasoning models refuse max_tokens; compatible servers know only it.
            key = "max_completion_tokens" if self.name == "openai" else "max_tokens"
            kwargs[key] = request.max_tokens
        if request.stop:
            kwargs["stop"] = request.stop
        if request.schema is not None:
            spec: dict[str, Any] = {"name": "answer", "schema": request.schema.schema}
            if request.schema.strict:
                spec["strict"] = True
            kwargs["response_format"] = {"type": "json_schema", "json_schema": spec}
        if request.tools:
            kwargs["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                    },
                }
                for t in request.tools
            ]
        try:
            raw = await self._client.chat.completions.with_raw_response.create(
                **kwargs, timeout=request.timeout
            )
            completion = await _parsed(raw)
        except (openai.APIError, anthropic.APIError) as exc:
            raise classify(exc, provider=self.name) from exc
        headers = dict(raw.headers)
        usage = completion.usage
        tokens = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        choice = completion.choices[0]
        message = choice.message
        if message.refusal or choice.finish_reason == "content_filter":
            raise Failure(
                "content_filter",
                f"{self.name} refused: {message.refusal or 'content filter'}",
                billed=tokens,
                raw=message.refusal or message.content,
                headers=headers,
            )
        calls = [
            ToolCallOut(c.id, c.function.name, _arguments(c.function.arguments))
            for c in message.tool_calls or []
            if getattr(c, "function", None) is not None
        ]
        return Completion(
            text=message.content,
            tool_calls=calls,
            finish_reason="tool_calls" if calls else str(choice.finish_reason or "stop"),
            tokens_in=tokens[0],
            tokens_out=tokens[1],
            headers=headers,
        )

    @staticmethod
    def _messages(request: LlmRequest) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in request.messages:
            if m["role"] == "tool":
                out.append(
                    {"role": "tool", "tool_call_id": m["tool_call_id"], "content": m["content"]}
                )
            elif m.get("tool_calls"):
                calls = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])},
                    }
                    for c in m["tool_calls"]
                ]
                out.append({"role": "assistant", "content": m.get("content"), "tool_calls": calls})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        return out

    async def aclose(self) -> None:
        await self._client.close()


_ANTHROPIC_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",
}


class AnthropicProvider:
    """Anthropic's Messages API; structured output through ``output_config.format``."""

    ignores_temperature = True

    def __init__(self, name: str, *, api_key: str, base_url: str | None) -> None:
        self.name = name
        self._client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0)

    async def complete(self, request: LlmRequest) -> Completion:
        system = "\n\n".join(m["content"] for m in request.messages if m["role"] == "system")
        kwargs: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens or ANTHROPIC_DEFAULT_MAX_TOKENS,
            "messages": self._messages(request),
        }
        if system:
            kwargs["system"] = system
        # No temperature: API version 2026-10-21 (anthropic SDK 2.x) refuses sampling
        # parameters with a 400, so the step notes that it was left out instead.
        if request.stop:
            kwargs["stop_sequences"] = request.stop
        if request.schema is not None:
            kwargs["output_config"] = {
                "format": {"type": "json_schema", "schema": request.schema.schema}
            }
        if request.tools:
            kwargs["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.parameters}
                for t in request.tools
            ]
        try:
            raw = await self._client.messages.with_raw_response.create(
                **kwargs, timeout=request.timeout
            )
            message = await _parsed(raw)
        except (openai.APIError, anthropic.APIError) as exc:
            raise classify(exc, provider=self.name) from exc
        headers = dict(raw.headers)
        tokens = (message.usage.input_tokens, message.usage.output_tokens)
        texts = [b.text for b in message.content if b.type == "text"]
        text = "".join(texts) if texts else None
        if message.stop_reason == "refusal":
            raise Failure(
                "content_filter",
                f"{self.name} refused to answer",
                billed=tokens,
                raw=text,
                headers=headers,
            )
        calls = [
            ToolCallOut(b.id, b.name, dict(b.input) if isinstance(b.input, dict) else {})
            for b in message.content
            if b.type == "tool_use"
        ]
        return Completion(
            text=text,
            tool_calls=calls,
            finish_reason=_ANTHROPIC_FINISH.get(str(message.stop_reason), "stop"),
            tokens_in=tokens[0],
            tokens_out=tokens[1],
            headers=headers,
        )

    @staticmethod
    def _messages(request: LlmRequest) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in request.messages:
            if m["role"] == "system":
                continue
            if m["role"] == "tool":
                block = {
                    "type": "tool_result",
                    "tool_use_id": m["tool_call_id"],
                    "content": m["content"],
                }
                if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                    out[-1]["content"].append(block)
                else:
                    out.append({"role": "user", "content": [block]})
            elif m.get("tool_calls"):
                blocks: list[dict[str, Any]] = []
                if m.get("content"):
                    blocks.append({"type": "text", "text": m["content"]})
                blocks.extend(
                    {"type": "tool_use", "id": c["id"], "name": c["name"], "input": c["arguments"]}
                    for c in m["tool_calls"]
                )
                out.append({"role": "assistant", "content": blocks})
            else:
                out.append({"role": m["role"], "content": m["content"]})
        return out

    async def aclose(self) -> None:
        await self._client.close()


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(getattr(exc, "message", None) or exc)


_CONTEXT_MARKERS = ("context_length", "prompt is too long", "maximum context", "too many tokens")


def classify(exc: Exception, *, provider: str) -> Failure:
    """The class of an SDK exception, which decides fallback and retry."""
    if isinstance(exc, openai.APITimeoutError | anthropic.APITimeoutError):
        return Failure("timeout", f"{provider}: the request timed out")
    if isinstance(exc, openai.APIConnectionError | anthropic.APIConnectionError):
        return Failure("server_error", f"{provider}: cannot connect: {exc}")
    if not isinstance(exc, openai.APIStatusError | anthropic.APIStatusError):
        return Failure("other", f"{provider}: {type(exc).__name__}: {exc}")
    status = exc.status_code
    headers = {k.lower(): v for k, v in exc.response.headers.items()}
    message = f"{provider} {status}: {_error_message(exc)}"
    code = str(getattr(exc, "code", None) or "")
    body = json.dumps(getattr(exc, "body", None), default=str).lower()
    retry_after = _retry_after(headers)
    cls: FailureClass
    if status == 429:
        cls = "rate_limit"
    elif status >= 500 or "overloaded" in body:
        cls = "server_error"
    elif status == 408:
        cls = "timeout"
    elif (
        status == 413
        or code == "context_length_exceeded"
        or any(marker in body for marker in _CONTEXT_MARKERS)
    ):
        cls = "context_length"
    elif code in ("content_filter", "content_policy_violation") or "content_filter" in body:
        cls = "content_filter"
    else:
        cls = "other"
    return Failure(cls, message, retry_after_s=retry_after, status=status, headers=headers)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    if "retry-after-ms" in headers:
        try:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    return parse_retry_after(value, now=datetime.now(UTC)) if value else None
