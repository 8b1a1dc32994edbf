"""Each media step works in a scratch directory of its own, removed whatever happens.

The directories live beside the artifact store by default, on the same filesystem, so a
finished output moves into the store by rename. A process killed mid-step leaves its
directory behind; the next start sweeps those older than an hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

__all__ = ["step_workdir", "sweep_workdirs"]

_PREFIX = "step-"
_STALE_S = 3600.0


def _make(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))


@contextlib.asynccontextmanager
async def step_workdir(parent: Path) -> AsyncIterator[Path]:
    path = await asyncio.to_thread(_make, parent)
    try:
        yield path
    finally:
        # A thread finishes even if this task is cancelled again meanwhile.
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, path, ignore_errors=True))


def sweep_workdirs(parent: Path, *, older_than_s: float = _STALE_S) -> int:
    """Remove what steps cut short by a crash left in ``parent``; how many were removed."""
    cutoff = time.time() - older_than_s
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in parent.iterdir():
            with contextlib.suppress(OSError):
                if entry.name.startswith(_PREFIX) and entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry)
                    removed += 1
    return removed
