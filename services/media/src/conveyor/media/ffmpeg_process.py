"""Running ffmpeg (or ffprobe) as a child process that can always be stopped.

The tool runs from an argument list (no shell), in a process group of its own; whatever
ends it early (its timeout, the step's, a cancelled run, shutdown) kills the whole group,
children included, so nothing is left behind. With ``-progress pipe:1`` ffmpeg writes
``key=value`` blocks on stdout; ``ProgressParser`` turns them into fractions of the
expected output duration. A failure is reported in ffmpeg's own words: the last line it
wrote to stderr, with scratch paths replaced by the names the pipeline used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from conveyor.media.errors import MediaError, MediaTimeout, MediaToolError

__all__ = ["ProgressParser", "ToolResult", "media_error", "run_tool"]

_MESSAGE_CHARS = 2000
_STDERR_KEEP = 64 * 1024


@dataclass(frozen=True, slots=True)
class ToolResult:
    returncode: int
    stdout: bytes
    stderr: bytes


class ProgressParser:
    """Reads ffmpeg's ``-progress`` output line by line; ``feed`` returns the fraction done
    (0..1) at the end of each block that says how far the output is."""

    def __init__(self, duration_s: float | None) -> None:
        self.duration_us = duration_s * 1e6 if duration_s and duration_s > 0 else None
        self._out_us: float | None = None

    def feed(self, line: str) -> float | None:
        key, sep, value = line.strip().partition("=")
        if not sep:
            return None
        if key in ("out_time_us", "out_time_ms"):  # both are microseconds
            with contextlib.suppress(ValueError):
                self._out_us = float(value)
            return None
        if key != "progress":
            return None
        if value == "end":
            return 1.0
        if self._out_us is None or self.duration_us is None:
            return None
        return min(max(self._out_us / self.duration_us, 0.0), 1.0)


async def run_tool(
    args: list[str],
    *,
    timeout_s: float,
    what: str,
    on_stdout_line: Callable[[str], None] | None = None,
) -> ToolResult:
    """Run ``args`` to the end, or kill its process group; ``what`` names the work in a
    timeout's message. With ``on_stdout_line``, stdout is handed over line by line (and
    not kept); otherwise it is returned whole."""
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
    assert process.stdout is not None
    assert process.stderr is not None
    stdout, stderr = process.stdout, process.stderr
    kept = bytearray()

    async def read_stderr() -> bytes:
        tail = bytearray()
        while chunk := await stderr.read(65536):
            tail += chunk
            del tail[:-_STDERR_KEEP]
        return bytes(tail)

    async def read_stdout() -> None:
        if on_stdout_line is None:
            kept.extend(await stdout.read())
            return
        while raw := await stdout.readline():
            on_stdout_line(raw.decode(errors="replace"))

    finished = False
    try:
        async with asyncio.timeout(timeout_s):
            _, err = await asyncio.gather(read_stdout(), read_stderr())
            code = await process.wait()
        finished = True
    except TimeoutError:
        raise MediaTimeout(
            f"{what} took longer than {timeout_s:g}s; ffmpeg was stopped",
            details={"timeout_s": timeout_s},
        ) from None
    finally:
        # Also on cancellation (the step's timeout, a cancelled run, shutdown), and when
        # the tool itself has exited but a child of it still holds the pipes: never leave
        # a process behind.
        if not finished:
            kill_group(process)
            await process.wait()
    return ToolResult(code, bytes(kept), err)


def kill_group(process: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()


def media_error(stderr: bytes, *, names: Mapping[str, str], subject: str) -> MediaError:
    """ffmpeg's own last words about ``subject`` (what the step read, as the pipeline named
    it), without its context prefixes and with each local path in ``names`` replaced by
    the name the pipeline gave it."""
    lines = []
    for raw in stderr.decode(errors="replace").splitlines():
        line = raw.strip()
        if line.startswith("[") and "] " in line:
            line = line.split("] ", 1)[1]
        for path, name in sorted(names.items(), key=lambda item: -len(item[0])):
            line = line.replace(f"file:{path}", name).replace(path, name)
        if line:
            lines.append(line)
    reason = lines[-1] if lines else "ffmpeg failed and said nothing"
    if not reason.startswith(subject):
        reason = f"{subject}: {reason}"
    return MediaError(reason[:_MESSAGE_CHARS], details={"stderr": "\n".join(lines)[-4000:]})
