"""``CONVEYOR_STEP_RUNNER_*``: how the step-runner talks to the outside world; LLM
providers under their usual names (``OPENAI_API_KEY``...) and ``CONVEYOR_LLM_*``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.contracts import parse_duration

__all__ = ["EndpointSettings", "LlmSettings", "StepRunnerSettings"]


class StepRunnerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_STEP_RUNNER_", extra="ignore")

    http_timeout_s: float = Field(default=30.0, gt=0)
    """Default timeout of an http step whose config sets none."""
    http_max_connections: int = Field(default=100, ge=1)
    http_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """A response body is read up to this size; the rest is dropped."""


class EndpointSettings(BaseModel):
    """An OpenAI-compatible endpoint (Ollama, vLLM): ``{"base_url": ..., "api_key": ...}``."""

    base_url: str
    api_key: str | None = None


class LlmSettings(BaseSettings):
    """Provider keys under their usual names; Conveyor's own LLM knobs as ``CONVEYOR_LLM_*``.

    ``CONVEYOR_LLM_ENDPOINTS``, ``CONVEYOR_LLM_PRICES`` and ``CONVEYOR_LLM_RATE_LIMITS``
    are JSON: ``{"ollama": {"base_url": "http://127.0.0.1:11434/v1"}}``,
    ``{"openai/gpt-4o-mini": {"input": 0.15, "output": 0.6}}`` (USD per 1M tokens) and
    ``{"openai/gpt-4o-mini": {"requests_per_minute": 500, "tokens_per_minute": 200000},
    "default": {...}}``.
    """

    # Empty means unset: compose passes OPENAI_BASE_URL="" when the host has none.
    model_config = SettingsConfigDict(
        env_prefix="", extra="ignore", populate_by_name=True, env_ignore_empty=True
    )

    openai_api_key: str | None = Field(default=None, validation_alias="OPENAI_API_KEY")
    openai_base_url: str | None = Field(default=None, validation_alias="OPENAI_BASE_URL")
    anthropic_api_key: str | None = Field(default=None, validation_alias="ANTHROPIC_API_KEY")
    anthropic_base_url: str | None = Field(default=None, validation_alias="ANTHROPIC_BASE_URL")
    endpoints: dict[str, EndpointSettings] = Field(
        default_factory=dict, validation_alias="CONVEYOR_LLM_ENDPOINTS"
    )
    prices: dict[str, Any] = Field(default_factory=dict, validation_alias="CONVEYOR_LLM_PRICES")
    rate_limits: dict[str, dict[str, float | None]] = Field(
        default_factory=dict, validation_alias="CONVEYOR_LLM_RATE_LIMITS"
    )
    redis_url: str | None = Field(default=None, validation_alias="CONVEYOR_REDIS_URL")
    redis_prefix: str = Field(default="conveyor", validation_alias="CONVEYOR_LLM_REDIS_PREFIX")
    """Keys go under ``<prefix>:ratelimit`` and ``<prefix>:llmcache``."""
    cache_ttl_s: float = Field(
        default=7 * 24 * 3600, gt=0, validation_alias="CONVEYOR_LLM_CACHE_TTL"
    )
    cache_size: int = Field(default=1024, ge=1, validation_alias="CONVEYOR_LLM_CACHE_SIZE")
    """Entries of the in-process cache used without Redis."""
    timeout_s: float = Field(default=120.0, gt=0, validation_alias="CONVEYOR_LLM_TIMEOUT")
    """Per provider call, when the step sets no ``timeout``."""
    breaker_failures: int = Field(default=5, ge=1, validation_alias="CONVEYOR_LLM_BREAKER_FAILURES")
    breaker_cooldown_s: float = Field(
        default=30.0, gt=0, validation_alias="CONVEYOR_LLM_BREAKER_COOLDOWN"
    )

    @field_validator("cache_ttl_s", "timeout_s", "breaker_cooldown_s", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value
