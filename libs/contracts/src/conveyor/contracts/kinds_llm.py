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
the runner checks them again once rendered. A tool's ``with`` is rendered by the harness
like any other config, so a value taken from the model's arguments is written inside
``{% raw %}...{% endraw %}`` (``url: "https://x/{% raw %}{{ args.city }}{% endraw %}"``);
without templates the arguments are sent as the JSON body (or the query of a GET).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["FALLBACK_CLASSES", "LlmConfig", "LlmMessage", "LlmTool"]

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


class LlmTool(_LlmModel):
    """A tool the model may call; ``type: http`` runs an http step with its ``with``."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str = ""
    type: Literal["http"] = "http"
    with_: dict[str, Any] = Field(alias="with")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON Schema of the arguments the model passes",
    )


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
