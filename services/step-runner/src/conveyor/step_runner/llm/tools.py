"""Tools an llm step offers its model: ``type: http`` runs the http step executor.

The tool's ``with`` is an http step config. It was rendered by the harness against the
run's data already; what is left to render here is ``{{ args.x }}`` (written in the
pipeline inside ``{% raw %}...{% endraw %}``), against the model's arguments. A tool
whose ``with`` names no ``args`` gets the arguments as its JSON body (query params for
GET). Whatever the http call answers, errors included, goes back to the model as the
tool's result: the model decides what to do with a 404, the step does not fail on it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from conveyor.contracts import StepReady
from conveyor.contracts.kinds import HttpConfig
from conveyor.contracts.kinds_llm import LlmTool
from conveyor.contracts.templates import TemplateError, render_value, template_strings
from conveyor.runtime.runner import StepError
from conveyor.step_runner.http_step import HttpStep
from conveyor.step_runner.llm.providers import ToolSpec

__all__ = ["MAX_RESULT_CHARS", "ToolBox", "result_text"]

MAX_RESULT_CHARS = 16_000
"""A tool result is cut to this many characters before it goes back to the model."""


class ToolBox:
    """The tools of one step, run through the process's http executor."""

    def __init__(self, tools: list[LlmTool], *, http: HttpStep | None) -> None:
        self._tools = {tool.name: tool for tool in tools}
        self._http = http

    def specs(self) -> list[ToolSpec]:
        return [
            ToolSpec(
                name=t.name,
                description=t.description,
                parameters=t.parameters or {"type": "object", "properties": {}},
            )
            for t in self._tools.values()
        ]

    async def call(self, name: str, arguments: dict[str, Any], step: StepReady) -> Any:
        """The result the model sees: the http answer's JSON or text, or an error."""
        tool = self._tools.get(name)
        if tool is None:
            return {"error": f"no tool named {name!r}; tools: {', '.join(self._tools)}"}
        if self._http is None:
            return {"error": "http tools are not available in this runner"}
        try:
            config = HttpConfig.model_validate(_request(tool, arguments))
        except (TemplateError, ValidationError) as exc:
            return {"error": f"the tool {name!r} is misconfigured: {exc}"}
        try:
            packet = await self._http(config, step)
        except StepError as exc:
            return {"error": exc.message, "status": (exc.details or {}).get("status")}
        body = packet["json"] if packet["json"] is not None else packet["text"]
        return {"status": packet["status"], "body": body}


def _request(tool: LlmTool, arguments: dict[str, Any]) -> dict[str, Any]:
    config = dict(tool.with_)
    if any("args" in source for _, source in template_strings(config)):
        return dict(render_value(config, {"args": arguments}))
    if config.get("json") is None and config.get("body") is None:
        if str(config.get("method", "GET")).upper() == "GET":
            config["params"] = {**config.get("params", {}), **arguments}
        else:
            config["json"] = arguments
    return config


def result_text(result: Any) -> str:
    """A tool result as the text a provider takes."""
    text = result if isinstance(result, str) else json.dumps(result, default=str)
    return text[:MAX_RESULT_CHARS]
