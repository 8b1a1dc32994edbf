"""The ``media.probe`` kind: duration, container and streams of a media file.

ffprobe when the machine has it (precise JSON), else the ffmpeg binary that ships in the
``imageio-ffmpeg`` wheel, reading the banner ``ffmpeg -i FILE`` prints. The tool runs as a
child process with an argument list (no shell), the file after ``-i`` and prefixed
``file:`` so that no user string is read as an option or a protocol, under a timeout that
kills it: corrupt input fails the step with ffmpeg's own words, never hangs the runner.
The tool runs in a process group of its own, and whatever ends the probe early (its
timeout, the step's, a cancelled run, shutdown) kills the whole group (``ffmpeg_process``).

The source is anything a ``SourceResolver`` accepts (an artifact, a path or file:// uri
under the media root, an http(s) URL); without one, only paths and file:// uris under the
root. The other media kinds probe their inputs and outputs with the same ``probe``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from conveyor.contracts import StepReady
from conveyor.contracts.kinds import MediaProbeConfig
from conveyor.media._workdir import step_workdir
from conveyor.media.errors import MediaError
from conveyor.media.ffmpeg_process import media_error, run_tool
from conveyor.media.media_info import from_ffmpeg_banner, from_ffprobe_json
from conveyor.media.sources import SourceResolver, resolve_source

__all__ = ["MediaProber", "find_ffmpeg", "find_ffprobe", "source_label"]

_OFF = frozenset({"off", "false", "0", "no", "none"})


def find_ffprobe(setting: str = "auto") -> str | None:
    """``auto``: ffprobe from PATH if any; ``off``: never; else the path given."""
    choice = setting.strip()
    if choice.lower() in _OFF:
        return None
    if choice.lower() == "auto":
        return shutil.which("ffprobe")
    found = shutil.which(choice)
    if found is None:
        raise ValueError(f"CONVEYOR_FFPROBE={setting!r}: no such executable")
    return found


def find_ffmpeg(setting: str | None = None) -> str:
    """The ffmpeg given, else the one ``imageio-ffmpeg`` ships (or IMAGEIO_FFMPEG_EXE)."""
    if setting:
        found = shutil.which(setting)
        if found is None:
            raise ValueError(f"CONVEYOR_MEDIA_FFMPEG={setting!r}: no such executable")
        return found
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def source_label(source: str | Mapping[str, Any]) -> str:
    """How messages name a source: as the pipeline gave it, an artifact by its uri."""
    if isinstance(source, Mapping):
        return str(source.get("uri") or "an artifact reference")
    if "://" in source and source.split("://", 1)[0].lower() in ("http", "https"):
        from conveyor.media._download import display_url

        return display_url(source)
    return source


class MediaProber:
    """Executor of ``media.probe``, and the probe every other media kind uses."""

    def __init__(
        self,
        *,
        root: Path,
        ffprobe: str | None,
        ffmpeg: str,
        timeout_s: float = 30.0,
        resolver: SourceResolver | None = None,
        work_dir: Path | None = None,
    ) -> None:
        self.root = root.resolve()
        self.ffprobe = ffprobe
        self.ffmpeg = ffmpeg
        self.timeout_s = timeout_s
        self.resolver = resolver
        self.work_dir = work_dir or Path(tempfile.gettempdir())

    @property
    def mode(self) -> str:
        return "ffprobe" if self.ffprobe else "ffmpeg"

    async def __call__(self, config: MediaProbeConfig, step: StepReady) -> dict[str, Any]:
        label = source_label(config.source)
        if self.resolver is None:
            if not isinstance(config.source, str):
                raise MediaError(f"{label}: this runner has no artifact store")
            path, size = await asyncio.to_thread(self.locate, config.source)
            return await self.probe(path, size=size, source=label)
        async with step_workdir(self.work_dir) as workdir:
            path = await self.resolver.resolve(config.source, workdir=workdir)
            size = (await asyncio.to_thread(path.stat)).st_size
            return await self.probe(path, size=size, source=label)

    def locate(self, source: str) -> tuple[Path, int]:
        """The file ``source`` names inside the root, and its size."""
        path = resolve_source(source, root=self.root)
        return path, path.stat().st_size

    async def probe(self, path: Path, *, size: int, source: str) -> dict[str, Any]:
        """Probe the local file ``path``; ``source`` names it in messages."""
        target = f"file:{path}"
        names = {str(path): source}
        what = f"probing {source}"
        if self.ffprobe:
            args = [self.ffprobe, "-v", "error", "-print_format", "json"]
            args += ["-show_format", "-show_streams", "-i", target]
            result = await run_tool(args, timeout_s=self.timeout_s, what=what)
            if result.returncode != 0:
                raise media_error(result.stderr, names=names, subject=source)
            try:
                data = json.loads(result.stdout)
            except ValueError:
                raise MediaError(f"{source}: ffprobe printed no JSON") from None
            info = from_ffprobe_json(data, size=size)
        else:
            args = [self.ffmpeg, "-hide_banner", "-nostdin", "-i", target]
            result = await run_tool(args, timeout_s=self.timeout_s, what=what)
            parsed = from_ffmpeg_banner(result.stderr.decode(errors="replace"), size=size)
            if parsed is None:
                raise media_error(result.stderr, names=names, subject=source)
            info = parsed
        if not info["streams"]:
            raise MediaError(f"{source}: no audio, video or other media stream found")
        return info
