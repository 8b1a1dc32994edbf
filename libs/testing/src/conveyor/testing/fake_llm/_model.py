"""The fake model itself, provider-neutral: from a prompt (and maybe a scripted reply) to
an answer. The provider modules translate their wire formats to and from these types.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from conveyor.testing.fake_llm._schema import schema_instance, topic_of
from conveyor.testing.fake_llm._script import Reply

Finish = Literal["stop", "length", "tool_calls", "content_filter", "refusal"]
_MALFORMED_JSON = '{"answer": "this JSON never ends'


def count_tokens(text: str) -> int:
    """Roughly what a tokenizer says: about 1.3 tokens per word."""
    return math.ceil(len(text.split()) * 1.3)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prompt:
    """What the fake model needs from a request, whichever provider sent it."""

    model: str
    last_user_text: str
    transcript: str  # every text the model reads, for the prompt's token count
    json_schema: Mapping[str, Any] | None = None
    json_schema_name: str = "answer"
    json_object: bool = False
    tools: Sequence[Tool] = ()
    tool_choice: str = "auto"  # auto | none | required | the name of a forced tool
    tool_results: Sequence[str] = ()  # tool outputs after the last assistant turn
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    tool_id_prefix: str = "call_"

    @property
    def wants_json(self) -> bool:
        return self.json_schema is not None or self.json_object


@dataclass(frozen=True)
class ToolUse:
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it (not necessarily valid)

    @property
    def input(self) -> Any:
        """The arguments parsed, or ``{}`` when they are not valid JSON."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return {}


@dataclass(frozen=True)
class Answer:
    text: str | None
    tool_uses: Sequence[ToolUse]
    finish: Finish
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None
    refusal: str | None = None


def answer(prompt: Prompt, reply: Reply | None) -> Answer:
    """The fake model's answer: the scripted reply, or a deterministic default."""
    reply = reply or Reply()
    text, tool_uses = _content(prompt, reply)
    finish: Finish = "tool_calls" if tool_uses else "stop"
    stop_sequence = None
    if text is not None and reply.finish_reason is None:
        text, stop_sequence = _cut_at_stop(text, prompt.stop)
        text, truncated = _truncate(text, prompt.max_tokens)
        finish = "length" if truncated else finish
    if reply.finish_reason is not None:
        finish = reply.finish_reason
    if reply.refusal is not None:
        finish = "refusal"
    written = " ".join([text or "", reply.refusal or "", *(use.arguments for use in tool_uses)])
    prompt_tokens, completion_tokens = reply.usage or (
        max(1, count_tokens(prompt.transcript)),
        max(1, count_tokens(written)),
    )
    return Answer(
        text=text,
        tool_uses=tool_uses,
        finish=finish,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        stop_sequence=stop_sequence,
        refusal=reply.refusal,
    )


def _content(prompt: Prompt, reply: Reply) -> tuple[str | None, list[ToolUse]]:
    """The text and tool calls of an answer, before stop sequences and ``max_tokens``."""
    if reply.tool_calls or reply.text is not None or reply.refusal is not None:
        return reply.text, [
            ToolUse(
                id=call.id or _call_id(prompt),
                name=call.name,
                arguments=call.arguments
                if isinstance(call.arguments, str)
                else json.dumps(dict(call.arguments)),
            )
            for call in reply.tool_calls
        ]
    tool = _tool_to_call(prompt)
    forced = prompt.tool_choice not in ("auto", "none")
    payload: str | None = None
    if reply.json is not None:
        payload = json.dumps(reply.json)
        if prompt.wants_json and not forced:
            tool = None  # the scripted JSON answers the requested format
    elif tool is not None:
        arguments = schema_instance(
            tool.parameters or {"type": "object"}, prompt=prompt.last_user_text, name=tool.name
        )
        payload = json.dumps(arguments)
    if reply.malformed:
        payload = _MALFORMED_JSON
    if tool is not None:
        return None, [ToolUse(id=_call_id(prompt), name=tool.name, arguments=payload or "{}")]
    return (payload if payload is not None else _default_content(prompt)), []


def _call_id(prompt: Prompt) -> str:
    return f"{prompt.tool_id_prefix}{uuid.uuid4().hex[:24]}"


def _tool_to_call(prompt: Prompt) -> Tool | None:
    """The tool a model would call now: forced, or the best match while no result is back."""
    if not prompt.tools or prompt.tool_choice == "none":
        return None
    by_name = {tool.name: tool for tool in prompt.tools}
    if prompt.tool_choice in by_name:
        return by_name[prompt.tool_choice]
    if prompt.tool_choice == "auto" and prompt.tool_results:
        return None  # the tool answered: time to answer the user
    words = set(re.findall(r"[a-z0-9]+", prompt.last_user_text.lower()))

    def overlap(tool: Tool) -> int:
        return len(
            words
            & set(
                re.findall(
                    r"[a-z0-9]+", f"{tool.name} {tool.description}".replace("_", " ").lower()
                )
            )
        )

    return max(prompt.tools, key=overlap)  # the first tool wins a tie


def _default_content(prompt: Prompt) -> str:
    if prompt.json_schema is not None:
        return json.dumps(
            schema_instance(
                prompt.json_schema, prompt=prompt.last_user_text, name=prompt.json_schema_name
            )
        )
    summary = topic_of(prompt.last_user_text, words=30)
    if prompt.tool_results:
        summary = "Based on the tool result: " + topic_of(" ".join(prompt.tool_results), words=30)
    if prompt.json_object:
        return json.dumps({"answer": summary})
    return f"[fake {prompt.model}] {summary}"


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    hits = [(text.find(stop), stop) for stop in stops if stop and stop in text]
    if not hits:
        return text, None
    position, stop = min(hits)
    return text[:position], stop


def _truncate(text: str, max_tokens: int | None) -> tuple[str, bool]:
    if max_tokens is None or count_tokens(text) <= max_tokens:
        return text, False
    words = re.findall(r"\S+\s*", text)
    keep = max(0, math.floor(max_tokens / 1.3))
    return "".join(words[:keep]).rstrip(), True
