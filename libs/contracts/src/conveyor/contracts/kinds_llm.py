"""The ``with`` block of an ``llm`` step: a model call with fallbacks, structure and tools.

```yaml
- id: draft
  type: llm
  with:
    model: openai/gpt-4o-mini                 # provider/model
    fallback: [anthropic/claude-haiku-4-5]
    prompt: "Write about {{ input.topic }}"   # or messages: [{role, content}]
    output_schema: {title: string, tags: [string]}
```

Numbers and lists may be templates at registration (``temperature: "{{ input.t }}"``);
the runner checks them again once rendered.

A tool is a step of another kind the model may call: ``type`` is any kind served by the
runner that runs llm steps, except ``llm`` (``tool_kinds()``: ``transform``, ``http``), and
its ``with`` is that kind's config, validated with the kind's model at registration. The
harness renders a tool's ``with`` like any other config, so a value taken from the model's
arguments is written inside ``{% raw %}...{% endraw %}``
(``url: "https://x/{% raw %}{{ args.city }}{% endraw %}"``); an http tool without such
templates gets the arguments as its JSON body (or the query of a GET).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "FALLBACK_CLASSES",
    "LlmConfig",
    "LlmMessage",
    "LlmTool",
    "check_model_name",
    "output_schema_problem",
    "tool_kinds",
]

FallbackClass = Literal[
    "rate_limit", "server_error", "timeout", "context_length", "content_filter", "invalid_output"
]
FALLBACK_CLASSES: tuple[FallbackClass, ...] = (
    "rate_limit",
    "server_error",
    "timeout",
    "context_length",
    "content_filter",
    "invalid_output",
)


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/\S+$")


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def check_model_name(value: str) -> str:
    """``provider/model``, or a template giving one. Whether the provider is configured
    is known only where the calls are made (``CONVEYOR_LLM_ENDPOINTS`` on the runner)."""
    if _is_template(value) or _MODEL_NAME.match(value):
        return value
    raise ValueError(f"{value!r} is not provider/model (e.g. openai/gpt-4o-mini)")


def _check_number(
    value: float | str | None, *, low: float, high: float | None, low_open: bool = False
) -> None:
    """A number within bounds, or a template (checked again once rendered)."""
    if value is None or _is_template(value):
        return
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None
    above = number > low if low_open else number >= low
    if not above or (high is not None and number > high):
        lowest = f"more than {low:g}" if low_open else f"at least {low:g}"
        bounds = lowest if high is None else f"{lowest} and at most {high:g}"
        raise ValueError(f"{value!r} is out of range: it must be {bounds}")


# The shorthand and JSON Schema forms ``output_schema`` takes, as the step-runner reads
# them (conveyor.step_runner.llm.schema): checked here so that a typo fails registration.
_SHORTHAND_TYPES = frozenset(
    {"string", "str", "text", "integer", "int", "number", "float", "boolean", "bool", "any"}
)
_SCHEMA_TYPES = frozenset({"string", "integer", "number", "boolean", "object", "array", "null"})
_SCHEMA_KEYWORDS = frozenset({
    "type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "allOf",
    "$defs", "definitions", "$ref", "$schema", "title", "description", "additionalProperties",
    "format", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
    "pattern", "default", "examples", "nullable",
})  # fmt: skip


def _is_json_schema(value: dict[str, Any]) -> bool:
    if isinstance(value.get("properties"), dict):
        return True
    kind = value.get("type")
    typed = kind in _SCHEMA_TYPES or (isinstance(kind, list) and set(kind) <= _SCHEMA_TYPES)
    return bool(value) and set(value) <= _SCHEMA_KEYWORDS and (typed or "$ref" in value)


def output_schema_problem(value: Any, path: str = "") -> str | None:
    """What is wrong with an ``output_schema`` (a field map, ``[type]``, a type name or a
    JSON Schema), or None. Templates are left for the runner."""
    where = f"output_schema{path}"
    if isinstance(value, str):
        if _is_template(value):
            return None
        if value.lstrip().startswith("{"):
            try:
                return output_schema_problem(json.loads(value), path)
            except ValueError:
                return f"{where}: text starting with '{{' is not valid JSON"
        if value.strip().rstrip("?").strip().lower() not in _SHORTHAND_TYPES:
            known = ", ".join(sorted(_SHORTHAND_TYPES))
            return f"{where}: unknown type {value!r} (one of {known}; [type]; or a map)"
        return None
    if isinstance(value, list):
        if len(value) != 1:
            return f"{where}: a list is written [type], with one element"
        return output_schema_problem(value[0], f"{path}[]")
    if isinstance(value, dict):
        if _is_json_schema(value):
            return _json_schema_problem(value, where)
        for key, sub in value.items():
            found = output_schema_problem(sub, f"{path}.{key}")
            if found:
                return found
        return None
    return f"{where}: expected a type name, [type], a field map or a JSON Schema"


def _json_schema_problem(schema: Any, where: str) -> str | None:
    if not isinstance(schema, dict):
        return f"{where}: a JSON Schema is a mapping such as {{type: string}}"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for name in kinds:
        if name not in _SCHEMA_TYPES:
            known = ", ".join(sorted(_SCHEMA_TYPES))
            return f"{where}: type {name!r} is not a JSON Schema type ({known})"
    props = schema.get("properties")
    if props is not None and not isinstance(props, dict):
        return f"{where}.properties: must map each field name to its schema"
    required = schema.get("required")
    if required is not None:
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            return f"{where}.required: must be a list of field names"
        missing = sorted(set(required) - set(props or {}))
        if props is not None and missing:
            return f"{where}.required: names {missing[0]!r}, which is not in properties"
    subs: list[tuple[str, Any]] = [(f"{where}.{k}", v) for k, v in (props or {}).items()]
    if isinstance(schema.get("items"), dict):
        subs.append((f"{where}.items", schema["items"]))
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            if not isinstance(schema[key], list):
                return f"{where}.{key}: must be a list of schemas"
            subs.extend((f"{where}.{key}[{i}]", s) for i, s in enumerate(schema[key]))
    for key in ("$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            subs.extend((f"{where}.{key}.{k}", s) for k, s in schema[key].items())
    for sub_where, sub in subs:
        found = _json_schema_problem(sub, sub_where)
        if found:
            return found
    return None


class _LlmModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class LlmMessage(_LlmModel):
    role: Literal["system", "user", "assistant"]
    content: str


def tool_kinds() -> tuple[str, ...]:
    """The kinds a tool may be: those of the runner that runs llm steps, except ``llm``.

    A tool runs inside the llm step, through that process's executor of its kind, so a
    kind served by another runner (the media kinds) cannot be one."""
    from conveyor.contracts.kinds import RUNNER_KINDS  # kinds imports this module

    served = next((kinds for kinds in RUNNER_KINDS.values() if "llm" in kinds), ())
    return tuple(kind for kind in served if kind != "llm")


class LlmTool(_LlmModel):
    """A tool the model may call: one step of ``type`` run with ``with`` (see above)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str = ""
    type: str = Field(
        default="http",
        description="the step kind the tool runs: transform or http (not llm, not the "
        "kinds of other runners)",
    )
    with_: dict[str, Any] = Field(alias="with", description="a config of the tool's kind")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON Schema of the arguments the model passes",
    )

    @field_validator("type")
    @classmethod
    def _served_kind(cls, value: str) -> str:
        from conveyor.contracts.kinds import KIND_CONFIGS, RUNNER_KINDS

        allowed = tool_kinds()
        if value in allowed:
            return value
        one_of = ", ".join(allowed)
        if value == "llm":
            reason = "an llm step cannot call llm steps as tools"
        elif value in KIND_CONFIGS:
            where = next((s for s, kinds in RUNNER_KINDS.items() if value in kinds), "?")
            reason = (
                f"{value!r} steps run in the {where} service, not next to llm steps, "
                "so they cannot be tools"
            )
        else:
            reason = f"unknown step type {value!r}"
        raise PydanticCustomError(
            "tool_kind", "{reason}; a tool's type is one of: {one_of}",
            {"reason": reason, "one_of": one_of},
        )  # fmt: skip

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Providers take a tool's arguments as one JSON object."""
        if value.get("type") != "object":
            raise ValueError(
                "a tool's parameters are a JSON Schema of an object: "
                "{type: object, properties: {name: {type: string}}}"
            )
        found = _json_schema_problem(value, "parameters")
        if found:
            raise ValueError(found)
        return value

    @field_validator("with_")
    @classmethod
    def _kind_config(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """``with`` must be a config of the tool's kind (its errors name ``with.<field>``)."""
        from conveyor.contracts.kinds import KIND_CONFIGS

        model = KIND_CONFIGS.get(info.data.get("type", ""))
        if model is not None:
            model.model_validate(value)  # a ValidationError here nests under ``with``
        return value


class LlmConfig(_LlmModel):
    """One model call (plus tool rounds), trying ``fallback`` models on listed failures."""

    model: str = Field(min_length=3, description="provider/model, e.g. openai/gpt-4o-mini")
    fallback: list[str] | str = Field(default_factory=list)
    fallback_on: list[FallbackClass] = Field(default_factory=lambda: list(FALLBACK_CLASSES))
    system: str | None = None
    prompt: str | None = None
    messages: list[LlmMessage] | str | None = None
    temperature: float | str | None = None
    max_tokens: int | str | None = None
    stop: list[str] | str | None = None
    output_schema: dict[str, Any] | str | None = Field(
        default=None,
        description="a compact field map ({title: string, tags: [string]}) or a JSON Schema",
    )
    tools: list[LlmTool] = Field(default_factory=list)
    max_tool_rounds: int | str = 3
    cache: bool | str = False
    timeout: float | str | None = Field(default=None, description="per provider call")

    @field_validator("model")
    @classmethod
    def _provider_model(cls, value: str) -> str:
        return check_model_name(value)

    @field_validator("fallback")
    @classmethod
    def _fallback_models(cls, value: list[str] | str) -> list[str] | str:
        for model in [value] if isinstance(value, str) else value:
            if model:
                check_model_name(model)
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | str | None) -> float | str | None:
        _check_number(value, low=0, high=2)
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | str | None) -> int | str | None:
        _check_number(value, low=1, high=None)
        return value

    @field_validator("max_tool_rounds")
    @classmethod
    def _max_tool_rounds(cls, value: int | str) -> int | str:
        _check_number(value, low=0, high=100)
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, str) and not _is_template(value):
            from conveyor.contracts.pipeline import parse_duration  # it imports this module

            if parse_duration(value) > 0:
                return value
        _check_number(value, low=0, high=None, low_open=True)
        return value

    @field_validator("output_schema")
    @classmethod
    def _output_schema(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        found = None if value is None else output_schema_problem(value)
        if found:
            raise ValueError(found)
        return value

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, value: list[LlmTool]) -> list[LlmTool]:
        names = [tool.name for tool in value]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"two tools are named {twice[0]!r}: the model calls them by name")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> LlmConfig:
        if self.prompt is None and not self.messages:
            raise ValueError("an llm step needs a prompt or messages")
        if self.prompt is not None and self.messages:
            raise ValueError("give either prompt or messages, not both")
        return self

    def models(self) -> list[str]:
        """The model, then each fallback, in the order they are tried."""
        fallback = [self.fallback] if isinstance(self.fallback, str) else self.fallback
        return [self.model, *(m for m in fallback if m)]
