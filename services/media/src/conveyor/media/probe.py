"""The ``media.probe`` kind: duration, container and streams of a file under the media root.

ffprobe when the machine has it (precise JSON), else the ffmpeg binary that ships in the
``imageio-ffmpeg`` wheel, reading the banner ``ffmpeg -i FILE`` prints. The tool runs as a
child process with an argument list (no shell), the file after ``-i`` and prefixed
``file:`` so that no user string is read as an option or a protocol, under a timeout that
kills it: corrupt input fails the step with ffmpeg's own words, never hangs the runner.
The tool runs in a process group of its own, and whatever ends the probe early (its
timeout, the step's, a cancelled run, shutdown) kills the whole group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from conveyor.contracts import StepReady
from conveyor.contracts.kinds import MediaProbeConfig
from conveyor.media.errors import MediaError, MediaTimeout, MediaToolError
from conveyor.media.media_info import from_ffmpeg_banner, from_ffprobe_json
from conveyor.media.sources import resolve_source

__all__ = ["MediaProber", "find_ffmpeg", "find_ffprobe"]

_OFF = frozenset({"off", "false", "0", "no", "none"})
_MESSAGE_CHARS = 2000


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


class MediaProber:
    """Executor of ``media.probe``."""

    def __init__(
        self,
        *,
        root: Path,
        ffprobe: str | None,
        ffmpeg: str,
        timeout_s: float = 30.0,
    ) -> None:
        self.root = root.resolve()
        self.ffprobe = ffprobe
        self.ffmpeg = ffmpeg
        self.timeout_s = timeout_s

    @property
    def mode(self) -> str:
        return "ffprobe" if self.ffprobe else "ffmpeg"

    async def __call__(self, config: MediaProbeConfig, step: StepReady) -> dict[str, Any]:
        path, size = await asyncio.to_thread(self.locate, config.source)
        return await self.probe(path, size=size, source=config.source)

    def locate(self, source: str) -> tuple[Path, int]:
        """The file ``source`` names inside the root, and its size."""
        path = resolve_source(source, root=self.root)
        return path, path.stat().st_size

    async def probe(self, path: Path, *, size: int, source: str) -> dict[str, Any]:
        """Probe ``path``, already resolved inside the root (see ``locate``)."""
        target = f"file:{path}"
        if self.ffprobe:
            args = [self.ffprobe, "-v", "error", "-print_format", "json"]
            args += ["-show_format", "-show_streams", "-i", target]
            code, out, err = await self._run(args, source=source)
            if code != 0:
                raise _media_error(source, err, path=path)
            try:
                data = json.loads(out)
            except ValueError:
                raise MediaError(f"{source}: ffprobe printed no JSON") from None
            info = from_ffprobe_json(data, size=size)
        else:
            args = [self.ffmpeg, "-hide_banner", "-nostdin", "-i", target]
            _, _, err = await self._run(args, source=source)
            parsed = from_ffmpeg_banner(err.decode(errors="replace"), size=size)
            if parsed is None:
                raise _media_error(source, err, path=path)
            info = parsed
        if not info["streams"]:
            raise MediaError(f"{source}: no audio, video or other media stream found")
        return info

    async def _run(self, args: list[str], *, source: str) -> tuple[int, bytes, bytes]:
        try:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # its own process group, children included
            )
        except OSError as exc:
            raise MediaToolError(f"cannot run {args[0]}: {exc}") from None
        try:
            async with asyncio.timeout(self.timeout_s):
                out, err = await process.communicate()
        except TimeoutError:
            raise MediaTimeout(
                f"probing {source} took longer than {self.timeout_s:g}s; the probe was killed",
                details={"timeout_s": self.timeout_s},
            ) from None
        finally:
            # Also on cancellation (the step's timeout, a cancelled run, shutdown): never
            # leave a process behind.
            if process.returncode is None:
                _kill_group(process)
                await process.wait()
        return process.returncode or 0, out, err


def _kill_group(process: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()


def _media_error(source: str, stderr: bytes, *, path: Path) -> MediaError:
    """ffmpeg's own last words, without the noise of its context prefixes."""
    lines = []
    for raw in stderr.decode(errors="replace").splitlines():
        line = raw.strip()
        if line.startswith("[") and "] " in line:
            line = line.split("] ", 1)[1]
        if line:
            lines.append(line.replace(f"file:{path}", source).replace(str(path), source))
    reason = lines[-1] if lines else "the file could not be read as media"
    if not reason.startswith(source):
        reason = f"{source}: {reason}"
    return MediaError(reason[:_MESSAGE_CHARS], details={"stderr": "\n".join(lines)[-4000:]})
