"""Where a media step's ``source`` points: always a regular file inside the media root.

A source is a path relative to the root, an absolute path inside it, or a ``file://`` uri
inside it. It is resolved (symlinks followed) before it is checked, so neither ``..`` nor a
symlink can reach outside the root.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from conveyor.media.errors import InvalidMediaSource, MediaNotFound, PathOutsideRoot

__all__ = ["resolve_source"]


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
