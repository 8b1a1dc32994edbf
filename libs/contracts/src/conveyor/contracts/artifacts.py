"""References to artifacts: large files that never ride in an event.

A step that makes a file (a transcoded video, a thumbnail) puts it in the artifact store
and its packet carries an ``ArtifactRef``: the content's sha256 names it, so the same bytes
made twice are one file, and a reference can be checked against what it points to. A later
step takes the reference (or its bare ``artifact://sha256/<hex>`` uri) as its source.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ARTIFACT_SCHEME", "ArtifactRef", "artifact_uri", "parse_artifact_uri"]

ARTIFACT_SCHEME = "artifact"
_PREFIX = f"{ARTIFACT_SCHEME}://sha256/"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def artifact_uri(sha256: str) -> str:
    """``artifact://sha256/<hex>`` for a sha256 given as 64 lowercase hex digits."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
    return _PREFIX + sha256


def parse_artifact_uri(uri: str) -> str:
    """The sha256 an ``artifact://sha256/<hex>`` uri names; ValueError saying what is wrong."""
    if not isinstance(uri, str):
        raise ValueError(f"an artifact uri is a string, not {type(uri).__name__}")
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() != ARTIFACT_SCHEME:
        raise ValueError(f"{uri!r} is not an artifact uri ({_PREFIX}<64 hex digits>)")
    algorithm, _, digest = rest.partition("/")
    if algorithm != "sha256":
        raise ValueError(f"artifact uri {uri!r}: only sha256 artifacts exist, not {algorithm!r}")
    if not _SHA256.fullmatch(digest):
        raise ValueError(
            f"artifact uri {uri!r}: {digest!r} is not a sha256 (64 lowercase hex digits)"
        )
    return digest


class ArtifactRef(BaseModel):
    """What a packet carries for a file in the artifact store.

    ``duration`` (seconds), ``width``/``height`` (pixels) and ``codecs`` describe media;
    they are absent for other files.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    """``artifact://sha256/<sha256>``"""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    mime: str = Field(min_length=1)
    duration: float | None = None
    width: int | None = None
    height: int | None = None
    codecs: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _uri_names_the_content(self) -> ArtifactRef:
        if parse_artifact_uri(self.uri) != self.sha256:
            raise ValueError(f"uri {self.uri!r} does not name sha256 {self.sha256}")
        return self
