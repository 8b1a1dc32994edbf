"""``CONVEYOR_MEDIA_*`` (and ``CONVEYOR_FFPROBE``): where media lives, which tools read it."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["MediaSettings"]


class MediaSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_MEDIA_", extra="ignore", populate_by_name=True
    )

    root: Path = Path(".conveyor/media")
    """Every media source resolves inside this directory (created at start)."""
    ffprobe: str = Field(
        default="auto",
        validation_alias=AliasChoices("CONVEYOR_FFPROBE", "CONVEYOR_MEDIA_FFPROBE", "ffprobe"),
    )
    """``auto`` (ffprobe from PATH when present), ``off`` (always ffmpeg), or a path."""
    ffmpeg: str | None = None
    """The ffmpeg used without ffprobe; default: the binary shipped in imageio-ffmpeg."""
    probe_timeout_s: float = Field(default=30.0, gt=0)
