"""``CONVEYOR_STEP_RUNNER_*``: how the step-runner talks to the outside world."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["StepRunnerSettings"]


class StepRunnerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVEYOR_STEP_RUNNER_", extra="ignore")

    http_timeout_s: float = Field(default=30.0, gt=0)
    """Default timeout of an http step whose config sets none."""
    http_max_connections: int = Field(default=100, ge=1)
    http_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """A response body is read up to this size; the rest is dropped."""
