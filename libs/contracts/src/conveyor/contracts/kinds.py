"""The step kinds a pipeline may use, and the shape of each kind's ``with`` block.

A kind is accepted at registration only when some runner serves it, so a pipeline can
never wait forever on a topic nobody consumes. Config values may be templates; a field
that must be a number or a list is still accepted as a template string and checked again
by the runner once rendered.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from conveyor.contracts.kinds_llm import LlmConfig

__all__ = [
    "KIND_CONFIGS",
    "RUNNER_KINDS",
    "HttpConfig",
    "LlmConfig",
    "MediaProbeConfig",
    "TransformConfig",
]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TransformConfig(_Config):
    """Render ``template``: text, or JSON when the text parses as JSON.
    A dict or list template is rendered value by value."""

    template: Any = Field(
        description="text, or a dict/list rendered value by value; a single expression "
        "may render to any JSON value"
    )


class HttpConfig(_Config):
    method: str = "GET"
    url: str = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")
    body: str | None = None
    timeout: float | str | None = None
    expect: list[int] | None = None
    """Statuses counted as success; default: any 2xx or 3xx."""
    follow_redirects: bool = True


class MediaProbeConfig(_Config):
    """Probe a media file: a path under the media root, a file:// uri or an artifact uri."""

    source: str = Field(min_length=1)


# kind -> (runner service that serves it, config model)
KIND_CONFIGS: dict[str, type[BaseModel]] = {
    "transform": TransformConfig,
    "http": HttpConfig,
    "media.probe": MediaProbeConfig,
}
KIND_CONFIGS["llm"] = LlmConfig

RUNNER_KINDS: dict[str, tuple[str, ...]] = {
    "step-runner": ("transform", "http", "llm"),
    "media": ("media.probe",),
}

StepKind = Literal["transform", "http", "llm", "media.probe"]
