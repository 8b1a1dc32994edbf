"""The step kinds a pipeline may use, and the shape of each kind's ``with`` block.

A kind is accepted at registration only when some runner serves it, so a pipeline can
never wait forever on a topic nobody consumes. Config values may be templates; a field
that must be a number or a list is still accepted as a template string and checked again
by the runner once rendered.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from conveyor.contracts.kinds_llm import LlmConfig
from conveyor.contracts.kinds_media import (
    MediaConcatConfig,
    MediaExtractAudioConfig,
    MediaProbeConfig,
    MediaRenderCardConfig,
    MediaSlideshowConfig,
    MediaThumbnailConfig,
    MediaTranscodeConfig,
    MediaTrimConfig,
    MediaWaveformConfig,
)

__all__ = [
    "KIND_CONFIGS",
    "RUNNER_KINDS",
    "HttpConfig",
    "LlmConfig",
    "MediaConcatConfig",
    "MediaExtractAudioConfig",
    "MediaProbeConfig",
    "MediaRenderCardConfig",
    "MediaSlideshowConfig",
    "MediaThumbnailConfig",
    "MediaTranscodeConfig",
    "MediaTrimConfig",
    "MediaWaveformConfig",
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

    @field_validator("method")
    @classmethod
    def _http_method(cls, value: str) -> str:
        if _is_template(value) or value.upper() in _HTTP_METHODS:
            return value
        raise ValueError(f"{value!r} is not an HTTP method ({', '.join(_HTTP_METHODS)})")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        """A template may give the whole URL (``{{ secrets.API }}/x``); text must be one."""
        if _is_template(value):
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value

    @field_validator("expect")
    @classmethod
    def _statuses(cls, value: list[int] | None) -> list[int] | None:
        for status in value or []:
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status (100 to 599)")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float | str | None) -> float | str | None:
        if value is None or _is_template(value):
            return value
        from conveyor.contracts.pipeline import parse_duration  # it needs no kinds

        if parse_duration(value) <= 0:
            raise ValueError("a timeout must be more than 0 (leave it out for the default)")
        return value


_HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")


def _is_template(value: object) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


# kind -> (runner service that serves it, config model)
KIND_CONFIGS: dict[str, type[BaseModel]] = {
    "transform": TransformConfig,
    "http": HttpConfig,
    "media.probe": MediaProbeConfig,
    "media.transcode": MediaTranscodeConfig,
    "media.thumbnail": MediaThumbnailConfig,
    "media.extract_audio": MediaExtractAudioConfig,
    "media.trim": MediaTrimConfig,
    "media.concat": MediaConcatConfig,
    "media.render_card": MediaRenderCardConfig,
    "media.slideshow": MediaSlideshowConfig,
    "media.waveform": MediaWaveformConfig,
}
KIND_CONFIGS["llm"] = LlmConfig

RUNNER_KINDS: dict[str, tuple[str, ...]] = {
    "step-runner": ("transform", "http", "llm"),
    "media": tuple(kind for kind in KIND_CONFIGS if kind.startswith("media.")),
}

StepKind = Literal[
    "transform",
    "http",
    "llm",
    "media.probe",
    "media.transcode",
    "media.thumbnail",
    "media.extract_audio",
    "media.trim",
    "media.concat",
    "media.render_card",
    "media.slideshow",
    "media.waveform",
]
