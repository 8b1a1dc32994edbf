"""``CONVEYOR_MEDIA_*`` (and ``CONVEYOR_FFPROBE``): where media lives, which tools read it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
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
    ffmpeg_timeout_s: float = Field(default=3600.0, gt=0)
    """The longest one ffmpeg run of a step may take, whatever the step's own timeout."""
    work_dir: Path | None = None
    """Scratch directories of running steps; default: ``work`` beside the artifacts (the
    same filesystem, so outputs move into the store by rename)."""

    # --- the artifact store (conveyor.media.artifacts) and sources (conveyor.media.sources)
    artifact_backend: Literal["local", "s3"] = "local"
    """``local``: files under ``artifact_dir``; ``s3``: an S3-compatible bucket (needs
    boto3: ``pip install 'conveyor-media[s3]'``), with ``artifact_dir`` as its local cache."""
    artifact_dir: Path = Path(".conveyor/artifacts")
    """Content-addressed artifacts (a volume in docker-compose); created at start."""
    s3_bucket: str | None = None
    s3_prefix: str = ""
    """Key prefix inside the bucket, e.g. ``conveyor/``."""
    s3_endpoint_url: str | None = None
    """For S3-compatible servers (MinIO, Ceph, R2); unset for AWS S3."""
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    """Unset: boto3's own chain (AWS_* variables, ~/.aws, instance roles)."""
    s3_secret_access_key: SecretStr | None = None
    max_download_bytes: int = Field(default=500 * 1024 * 1024, gt=0)
    """An http(s) source larger than this (500 MiB by default) fails the step."""
    download_timeout_s: float = Field(default=30.0, gt=0)
    """Connect and read timeout of http(s) sources (each read, not the whole download)."""
    allow_private_urls: bool = False
    """Fetch http(s) sources on loopback, private and link-local addresses too (off: a
    pipeline's input cannot make the runner reach internal services)."""
