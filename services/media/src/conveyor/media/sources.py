"""Where a media step's ``source`` points, made into a local file the step may read.

``resolve_source`` takes a path relative to the media root, an absolute path inside it, or
a ``file://`` uri inside it. It is resolved (symlinks followed) before it is checked, so
neither ``..`` nor a symlink can reach outside the root.

``SourceResolver`` takes those and also an artifact: the ``ArtifactRef`` an earlier step's
packet carries (``{"uri": "artifact://sha256/...", ...}``) or its bare uri, read from the
artifact store; and an http(s) URL, downloaded into the step's working directory within a
size limit (see ``_download``). Anything else fails as ``InvalidMediaSource`` naming it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from conveyor.contracts import ARTIFACT_SCHEME, parse_artifact_uri
from conveyor.media._download import Downloader, display_url
from conveyor.media.artifacts import ArtifactStore
from conveyor.media.errors import InvalidMediaSource, MediaNotFound, PathOutsideRoot

__all__ = ["SourceResolver", "resolve_source"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_ACCEPTED = (
    "an artifact reference or artifact:// uri, a path under the media root, a file:// uri "
    "under it, or an http(s) URL"
)


class SourceResolver:
    """Every kind of source a media step accepts, as a local file."""

    def __init__(
        self,
        *,
        root: Path,
        store: ArtifactStore,
        max_download_bytes: int,
        http_timeout_s: float,
        allow_private_urls: bool = False,
    ) -> None:
        self.root = root.resolve()
        self.store = store
        self.downloader = Downloader(
            max_bytes=max_download_bytes,
            timeout_s=http_timeout_s,
            allow_private=allow_private_urls,
        )

    async def resolve(self, source: str | Mapping[str, Any], *, workdir: Path) -> Path:
        """The local file ``source`` names; a download is written into ``workdir``."""
        claimed: Any = None
        if isinstance(source, Mapping):
            uri = source.get("uri")
            if not isinstance(uri, str):
                raise InvalidMediaSource(
                    f"media source {_shorten(source)} is an object without a string "
                    '"uri": an artifact reference {"uri": "artifact://sha256/...", ...} '
                    "was expected"
                )
            text, claimed = uri, source.get("sha256")
        elif isinstance(source, str):
            text = source
        else:
            raise InvalidMediaSource(
                f"media source must be text or an artifact reference, not "
                f"{type(source).__name__}: {_shorten(source)}"
            )
        scheme = _scheme_of(text)
        if scheme == ARTIFACT_SCHEME:
            try:
                sha256 = parse_artifact_uri(text)
            except ValueError as exc:
                raise InvalidMediaSource(f"media source: {exc}") from None
            if claimed is not None and claimed != sha256:
                raise InvalidMediaSource(
                    f"media source {text!r} says sha256 {claimed!r}, but its uri names {sha256}"
                )
            return await self.store.local_path(sha256)
        if scheme in ("http", "https"):
            return await self.downloader.fetch(text, workdir=workdir)
        if scheme not in (None, "file"):
            raise InvalidMediaSource(
                f"media source {display_url(text) if '://' in text else repr(text)}: "
                f"{scheme}:// is not supported; a source is {_ACCEPTED}"
            )
        return await asyncio.to_thread(resolve_source, text, root=self.root)


def _scheme_of(text: str) -> str | None:
    match = _SCHEME.match(text)
    if match is not None:
        return match[1].lower()
    head = text.split(":", 1)[0].lower()
    return head if head in (ARTIFACT_SCHEME, "file") and ":" in text else None


def _shorten(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def resolve_source(source: str, *, root: Path) -> Path:
    """The file ``source`` names, resolved; ``root`` must be absolute and resolved."""
    if source.startswith("-"):
        raise InvalidMediaSource(f"media source {source!r} must not start with '-'")
    if source.startswith("file:"):
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise InvalidMediaSource(
                f"media source {source!r} names host {parts.netloc!r}; "
                "a file:// uri must name a file on this host (file:///path)"
            )
        text = unquote(parts.path)
    elif "://" in source:
        raise InvalidMediaSource(
            f"media source {source!r}: only paths under the media root and file:// uris "
            "are supported"
        )
    else:
        text = source
    if "\x00" in text:
        raise InvalidMediaSource(f"media source {source!r} contains a NUL byte")
    candidate = Path(text)
    if not candidate.is_absolute():
        candidate = root / candidate
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, say
        raise InvalidMediaSource(f"media source {source!r} cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(root):
        raise PathOutsideRoot(
            f"media source {source!r} resolves to {resolved}, outside the media root {root}",
            details={"source": source, "root": str(root)},
        )
    if not resolved.exists():
        raise MediaNotFound(
            f"media source {source!r}: no such file under the media root {root}",
            details={"source": source, "root": str(root)},
        )
    if not resolved.is_file():
        raise MediaNotFound(f"media source {source!r} is not a regular file")
    return resolved
