"""Tools an llm step offers its model: each runs one step of another kind of this runner.

A tool's ``type`` is a kind this process serves other than ``llm`` (``transform``,
``http``; ``LlmTool`` rejects the rest at registration), and it runs through the same
executor the runner uses for that kind. Its ``with`` is a config of that kind, already
rendered by the harness against the run's data; what is left to render here is
``{{ args.x }}`` (written in the pipeline inside ``{% raw %}...{% endraw %}``), against
the model's arguments, after which the config is validated with the kind's model. An http
tool whose ``with`` names no ``args`` gets the arguments as its JSON body (query params
for GET).

What the tool answers goes back to the model as the tool's result; so does a failure (an
http 404, arguments that do not render or do not fit the kind), as ``{"error": {...}}``:
the model decides what to do with it, the step does not fail on it. A configuration error
(a kind this runner lacks, a template that does not parse) fails the step, before the
model is called. Each call is recorded as ``{"name", "kind", "arguments", "result"}``, or
``"error"`` in place of ``"result"``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from conveyor.contracts import StepReady
from conveyor.contracts.kinds import KIND_CONFIGS
from conveyor.contracts.kinds_llm import LlmTool
from conveyor.contracts.templates import (
    TemplateError,
    referenced_steps,
    render_value,
    template_strings,
)
from conveyor.runtime.runner import Executor, InvalidStepConfig, StepError, StepOutput
from conveyor.step_runner.llm.providers import ToolSpec

__all__ = ["MAX_RESULT_CHARS", "ToolBox", "result_text", "tool_reply", "tool_specs"]

MAX_RESULT_CHARS = 16_000
"""A tool result is cut to this many characters before it goes back to the model."""


def tool_specs(tools: Sequence[LlmTool]) -> list[ToolSpec]:
    """What the model is told about the tools."""
    return [
        ToolSpec(
            name=t.name,
            description=t.description,
            parameters=t.parameters or {"type": "object", "properties": {}},
        )
        for t in tools
    ]


class ToolBox:
    """The tools of one step, run through the process's executors of their kinds.

    Raises ``InvalidStepConfig`` when a tool cannot run here at all: its kind has no
    executor in this process, or a template of its ``with`` does not parse."""

    def __init__(self, tools: Sequence[LlmTool], *, executors: Mapping[str, Executor]) -> None:
        self._tools = {tool.name: tool for tool in tools}
        self._executors = executors
        for tool in tools:
            _check(tool, executors)

    def specs(self) -> list[ToolSpec]:
        return tool_specs(list(self._tools.values()))

    async def call(self, name: str, arguments: dict[str, Any], step: StepReady) -> dict[str, Any]:
        """Run one tool call; its record: ``result`` or ``error``, never an exception for
        a failure of the tool (a ``StepError``)."""
        tool = self._tools.get(name)
        record: dict[str, Any] = {
            "name": name,
            "kind": tool.type if tool is not None else None,
            "arguments": arguments,
        }
        if tool is None:
            record["error"] = {
                "type": "UnknownTool",
                "message": f"no tool named {name!r}; tools: {', '.join(self._tools)}",
            }
            return record
        try:
            config = _config(tool, arguments)
            output = await self._executors[tool.type](
                config, step.model_copy(update={"kind": tool.type})
            )
        except StepError as exc:
            record["error"] = _error(exc)
            return record
        if isinstance(output, StepOutput):
            output = output.output
        record["result"] = _shape(tool.type, output)
        return record


def tool_reply(record: dict[str, Any]) -> Any:
    """What the model is given for a call: the result, or ``{"error": {...}}``."""
    return {"error": record["error"]} if "error" in record else record["result"]


def result_text(result: Any) -> str:
    """A tool result as the text a provider takes."""
    text = result if isinstance(result, str) else json.dumps(result, default=str)
    return text[:MAX_RESULT_CHARS]


def _check(tool: LlmTool, executors: Mapping[str, Executor]) -> None:
    where = f"tools[{tool.name}]"
    if tool.type not in executors or tool.type == "llm":
        served = ", ".join(k for k in executors if k != "llm") or "none"
        raise InvalidStepConfig(
            f"{where}: this runner cannot run {tool.type!r} tools (it runs: {served})",
            details={"tool": tool.name, "kind": tool.type},
        )
    for path, source in template_strings(tool.with_):
        try:
            referenced_steps(source)  # parses it
        except TemplateError as exc:
            raise InvalidStepConfig(
                f"{where}.with.{path}: {exc}", details={"tool": tool.name, "field": path}
            ) from None


def _config(tool: LlmTool, arguments: dict[str, Any]) -> BaseModel:
    """The tool's config for these arguments, validated with its kind's model."""
    config = dict(tool.with_)
    try:
        if any("args" in source for _, source in template_strings(config)):
            config = render_value(config, {"args": arguments})
        elif tool.type == "http" and config.get("json") is None and config.get("body") is None:
            if str(config.get("method", "GET")).upper() == "GET":
                config["params"] = {**config.get("params", {}), **arguments}
            else:
                config["json"] = arguments
        return KIND_CONFIGS[tool.type].model_validate(config)
    except TemplateError as exc:
        raise StepError(
            f"the arguments do not fit the tool: {exc}", type="InvalidArguments"
        ) from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors(include_url=False)[:5]
        )
        raise StepError(
            f"with these arguments the {tool.type} config is invalid: {problems}",
            type="InvalidArguments",
        ) from None


def _error(exc: StepError) -> dict[str, Any]:
    error: dict[str, Any] = {"type": exc.type, "message": exc.message}
    details = exc.details or {}
    for key in ("status", "body"):  # an http answer outside ``expect``
        if details.get(key) is not None:
            error[key] = details[key]
    if exc.retryable:
        error["retryable"] = True
    return error


def _shape(kind: str, output: Any) -> Any:
    """An http answer as ``{status, body}`` (the model needs no headers); others as is."""
    if kind == "http" and isinstance(output, dict) and "status" in output:
        body = output.get("json") if output.get("json") is not None else output.get("text")
        return {"status": output["status"], "body": body}
    return output
