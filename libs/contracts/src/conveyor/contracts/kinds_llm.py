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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

__all__ = ["FALLBACK_CLASSES", "LlmConfig", "LlmMessage", "LlmTool", "tool_kinds"]

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
