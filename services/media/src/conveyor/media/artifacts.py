"""The artifact store: content-addressed files that media steps make and read.

A file is named by the sha256 of its bytes, so the same content put twice (by two steps,
two attempts, two runs) is stored once. Each put also records that the run references the
file; deleting a run (``RunDeleted``) drops its references and deletes the files no other
run references.

``LocalArtifactStore`` (the default) keeps everything under one directory::

    <dir>/sha256/<2 hex>/<sha256>     the files, read-only, moved in whole by rename
    <dir>/runs/<run id>/<sha256>      empty markers: the files a run references
    <dir>/refs/<2 hex>/<sha256>/<run id>   the same pairs, indexed by file
    <dir>/tmp/                        files being put (same filesystem: rename is atomic)
    <dir>/.lock                       flock held while references and files change

The lock makes "add a reference, then the file" and "drop a reference, then the file if
unreferenced" exclusive, so several media processes may share the directory (a volume)
without a put of some content losing it to the deletion of another run that had it. It
needs a filesystem with working ``flock`` (local disks and Docker volumes; not every NFS).

``S3ArtifactStore`` (``conveyor.media._artifacts_s3``) keeps the same layout in a bucket and
uses the directory as a local cache.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from uuid import UUID

from conveyor.contracts import ArtifactRef, artifact_uri
from conveyor.media.errors import ArtifactStoreError, InvalidMediaSource, MediaNotFound
from conveyor.media.settings import MediaSettings

__all__ = ["ArtifactStore", "LocalArtifactStore", "create_store"]

log = logging.getLogger("conveyor.media.artifacts")

_CHUNK = 1024 * 1024
_STALE_STAGING_S = 3600.0
_HEX = frozenset("0123456789abcdef")


def check_sha256(sha256: str) -> str:
    """``sha256`` if it is 64 lowercase hex digits (it becomes a file name: nothing else)."""
    if len(sha256) != 64 or not _HEX.issuperset(sha256):
        raise InvalidMediaSource(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
    return sha256


class ArtifactStore(abc.ABC):
    """Where media steps keep the files they make; see the module's docstring."""

    async def put_file(
        self,
        path: Path,
        *,
        mime: str,
        run_id: UUID,
        duration: float | None = None,
        width: int | None = None,
        height: int | None = None,
        codecs: Sequence[str] = (),
    ) -> ArtifactRef:
        """Store the file at ``path`` (consumed: moved in, or deleted once copied) as
        referenced by ``run_id``; the reference a packet carries."""
        sha256, size = await self._store(Path(path), run_id=run_id, mime=mime)
        return ArtifactRef(
            uri=artifact_uri(sha256),
            sha256=sha256,
            size=size,
            mime=mime,
            duration=duration,
            width=width,
            height=height,
            codecs=list(codecs),
        )

    @abc.abstractmethod
    async def _store(self, path: Path, *, run_id: UUID, mime: str) -> tuple[str, int]:
        """Move the file in and reference it from ``run_id``: its sha256 and size."""

    @abc.abstractmethod
    async def local_path(self, sha256: str) -> Path:
        """A readable local file with the artifact's content; ``MediaNotFound`` if absent."""

    @abc.abstractmethod
    async def delete_run(self, run_id: UUID) -> int:
        """Drop the run's references and delete the files nobody references any more;
        how many files were deleted. Deleting a run twice deletes nothing the second time."""

    @abc.abstractmethod
    async def run_ids(self) -> list[UUID]:
        """Every run that references some artifact (for ``conveyor artifacts gc``)."""

    async def prepare(self) -> None:  # noqa: B027 (a hook with nothing to do by default)
        """Create what the store needs, at the service's start; fails with a hint."""


class LocalArtifactStore(ArtifactStore):
    """Artifacts in a local directory (or a volume shared by the media processes)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory.resolve()
        self._files = self.directory / "sha256"
        self._runs = self.directory / "runs"
        self._refs = self.directory / "refs"
        self._staging = self.directory / "tmp"
        self._lock = self.directory / ".lock"

    def __repr__(self) -> str:
        return f"LocalArtifactStore({str(self.directory)!r})"

    async def prepare(self) -> None:
        await asyncio.to_thread(self._prepare)

    async def _store(self, path: Path, *, run_id: UUID, mime: str) -> tuple[str, int]:
        try:
            return await asyncio.to_thread(self._put, path, run_id)
        except OSError as exc:  # a full disk, a read-only volume
            raise ArtifactStoreError(f"cannot store {path} in {self!r}: {exc}") from None

    async def local_path(self, sha256: str) -> Path:
        path = self._file(check_sha256(sha256))
        if not await asyncio.to_thread(path.is_file):
            raise missing_artifact(sha256)
        return path

    async def delete_run(self, run_id: UUID) -> int:
        try:
            return await asyncio.to_thread(self._delete_run, run_id)
        except OSError as exc:
            raise ArtifactStoreError(f"cannot delete run {run_id} in {self!r}: {exc}") from None

    async def run_ids(self) -> list[UUID]:
        return await asyncio.to_thread(_run_dirs, self._runs)

    # --- blocking work, in a thread ---------------------------------------------------

    def _prepare(self) -> None:
        for directory in (self._files, self._runs, self._refs, self._staging):
            directory.mkdir(parents=True, exist_ok=True)
        sweep_staging(self._staging)

    def _file(self, sha256: str) -> Path:
        return self._files / sha256[:2] / sha256

    def _ref_dir(self, sha256: str) -> Path:
        return self._refs / sha256[:2] / sha256

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._lock, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _put(self, path: Path, run_id: UUID) -> tuple[str, int]:
        self._staging.mkdir(parents=True, exist_ok=True)
        staged = stage_file(path, self._staging)
        try:
            sha256, size = hash_file(staged, sync=True)
            staged.chmod(0o444)  # an artifact never changes under its name
            with self._locked():
                # The reference first: a deletion that runs next sees it and keeps the file.
                marker = self._runs / str(run_id) / sha256
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                ref = self._ref_dir(sha256) / str(run_id)
                ref.parent.mkdir(parents=True, exist_ok=True)
                ref.touch()
                target = self._file(sha256)
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staged, target)
        finally:
            staged.unlink(missing_ok=True)  # content that was there already
        return sha256, size

    def _delete_run(self, run_id: UUID) -> int:
        run_dir = self._runs / str(run_id)
        if not run_dir.is_dir():  # checked again under the lock; no lock file needed for 0
            return 0
        deleted = 0
        with self._locked():
            if not run_dir.is_dir():
                return 0
            for marker in run_dir.iterdir():
                sha256 = marker.name
                if len(sha256) == 64 and _HEX.issuperset(sha256):
                    ref_dir = self._ref_dir(sha256)
                    (ref_dir / str(run_id)).unlink(missing_ok=True)
                    if _remove_if_empty(ref_dir):
                        with contextlib.suppress(FileNotFoundError):
                            self._file(sha256).unlink()
                            deleted += 1
                # The run's marker goes last: a deletion cut short is finished by the next.
                marker.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        return deleted


def _remove_if_empty(directory: Path) -> bool:
    """Remove ``directory`` when nothing is in it; True when it is gone (or never was)."""
    try:
        directory.rmdir()
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise
    return True


def _run_dirs(runs: Path) -> list[UUID]:
    found: list[UUID] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in runs.iterdir():
            with contextlib.suppress(ValueError):
                found.append(UUID(entry.name))
    return sorted(found)


def missing_artifact(sha256: str) -> MediaNotFound:
    return MediaNotFound(
        f"artifact {artifact_uri(sha256)} is not in the artifact store "
        "(its runs were deleted, or it was made by another store)",
        details={"sha256": sha256},
    )


# --- shared by both stores --------------------------------------------------------------


def stage_file(source: Path, staging: Path) -> Path:
    """Move ``source`` into ``staging`` (a rename; a copy then a delete across filesystems)."""
    if not source.is_file():
        raise MediaNotFound(f"cannot store {source}: no such regular file")
    staged = staging / f"{uuid.uuid4().hex}.part"
    try:
        if source.is_symlink():  # store what it points to, never the link
            raise OSError(errno.EXDEV, "a symlink")
        os.rename(source, staged)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise ArtifactStoreError(
                f"cannot move {source} into the artifact store: {exc}"
            ) from None
        try:
            shutil.copyfile(source, staged)
        except OSError as copy_exc:
            staged.unlink(missing_ok=True)
            raise ArtifactStoreError(
                f"cannot copy {source} into the artifact store: {copy_exc}"
            ) from None
        source.unlink(missing_ok=True)
    return staged


def hash_file(path: Path, *, sync: bool = False) -> tuple[str, int]:
    """sha256 (hex) and size of ``path``; with ``sync``, its data is on disk after."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest(), size


def sweep_staging(staging: Path, *, older_than_s: float = _STALE_STAGING_S) -> None:
    """Delete what puts cut short by a crash left in ``staging``."""
    cutoff = time.time() - older_than_s
    with contextlib.suppress(FileNotFoundError):
        for entry in staging.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()


def create_store(settings: MediaSettings) -> ArtifactStore:
    """The store ``CONVEYOR_MEDIA_ARTIFACT_BACKEND`` names; nothing is touched until
    ``prepare()``. An S3 store without a bucket, or without boto3, fails here."""
    if settings.artifact_backend == "local":
        return LocalArtifactStore(settings.artifact_dir)
    from conveyor.media._artifacts_s3 import S3ArtifactStore

    return S3ArtifactStore.from_settings(settings)
