"""The artifact store in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2 ...).

The bucket holds the layout of the local store, under ``CONVEYOR_MEDIA_S3_PREFIX``::

    <prefix>sha256/<sha256>            the files
    <prefix>runs/<run id>/<sha256>     empty objects: the files a run references
    <prefix>refs/<sha256>/<run id>     the same pairs, listed by file

ffmpeg reads local files, so the artifact directory is a cache: a file put is kept there,
one read is downloaded there once (and checked against its sha256). A cached file is only
handed out after the bucket confirmed it still exists, so a run's deletion by another
media process is seen everywhere.

S3 has no lock: a put of some content that races the deletion of the only other run
referencing it, within the few milliseconds between that deletion's listing and its
delete, can lose the file. The put would have to be of the same bytes, by a run started
while the other was being deleted; the local store has no such window.

boto3 is imported lazily (``pip install 'conveyor-media[s3]'``); its calls run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from conveyor.contracts import artifact_uri
from conveyor.media.artifacts import (
    ArtifactStore,
    check_sha256,
    hash_file,
    missing_artifact,
    stage_file,
    sweep_staging,
)
from conveyor.media.errors import ArtifactStoreError, MediaError
from conveyor.media.settings import MediaSettings

__all__ = ["S3ArtifactStore"]

T = TypeVar("T")
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})


class S3ArtifactStore(ArtifactStore):
    def __init__(self, *, client: Any, bucket: str, prefix: str, cache_dir: Path) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.cache_dir = cache_dir.resolve()
        self._staging = self.cache_dir / "tmp"

    @classmethod
    def from_settings(cls, settings: MediaSettings) -> S3ArtifactStore:
        if not settings.s3_bucket:
            raise ValueError(
                "CONVEYOR_MEDIA_ARTIFACT_BACKEND=s3 needs CONVEYOR_MEDIA_S3_BUCKET "
                "(and CONVEYOR_MEDIA_S3_ENDPOINT_URL for a server other than AWS S3)"
            )
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise RuntimeError(
                "CONVEYOR_MEDIA_ARTIFACT_BACKEND=s3 needs boto3: "
                "pip install 'conveyor-media[s3]' (or boto3)"
            ) from None
        secret = settings.s3_secret_access_key
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            config=Config(
                # Path-style addressing: what S3-compatible servers answer without DNS setup.
                s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
                connect_timeout=10,
                read_timeout=60,
                retries={"max_attempts": 3, "mode": "standard"},
            ),
        )
        return cls(
            client=client,
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            cache_dir=settings.artifact_dir,
        )

    def __repr__(self) -> str:
        return f"S3ArtifactStore(bucket={self.bucket!r}, prefix={self.prefix!r})"

    # --- the store --------------------------------------------------------------------

    async def prepare(self) -> None:
        await asyncio.to_thread(self._prepare)

    async def _store(self, path: Path, *, run_id: UUID, mime: str) -> tuple[str, int]:
        return await self._in_thread(self._put, path, run_id, mime)

    async def local_path(self, sha256: str) -> Path:
        return await self._in_thread(self._local_path, check_sha256(sha256))

    async def delete_run(self, run_id: UUID) -> int:
        return await self._in_thread(self._delete_run, run_id)

    async def run_ids(self) -> list[UUID]:
        return await self._in_thread(self._run_ids)

    # --- blocking work, in a thread ---------------------------------------------------

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(fn, *args)
        except (BotoCoreError, ClientError) as exc:
            raise ArtifactStoreError(
                f"the artifact bucket {self.bucket!r} failed: {exc}",
                details={"bucket": self.bucket},
            ) from None
        except OSError as exc:  # the local cache: a full disk, a read-only volume
            raise ArtifactStoreError(f"the artifact cache {self.cache_dir} failed: {exc}") from None

    def _prepare(self) -> None:
        self._staging.mkdir(parents=True, exist_ok=True)
        sweep_staging(self._staging)
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            endpoint = self.client.meta.endpoint_url
            raise RuntimeError(
                f"artifact bucket {self.bucket!r} at {endpoint} cannot be used: {exc} "
                "(check CONVEYOR_MEDIA_S3_BUCKET, CONVEYOR_MEDIA_S3_ENDPOINT_URL and the keys)"
            ) from None

    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def _cached(self, sha256: str) -> Path:
        return self.cache_dir / "sha256" / sha256[:2] / sha256

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return False
            raise
        return True

    def _keep(self, staged: Path, sha256: str) -> None:
        """Move a file whose content is checked into the cache (or drop it: cached)."""
        target = self._cached(sha256)
        if target.is_file():
            return
        staged.chmod(0o444)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)

    def _put(self, path: Path, run_id: UUID, mime: str) -> tuple[str, int]:
        self._staging.mkdir(parents=True, exist_ok=True)
        staged = stage_file(path, self._staging)
        try:
            sha256, size = hash_file(staged)
            run = str(run_id)
            # The references first: a deletion that lists them next keeps the file.
            self.client.put_object(Bucket=self.bucket, Key=self._key("runs", run, sha256))
            self.client.put_object(Bucket=self.bucket, Key=self._key("refs", sha256, run))
            key = self._key("sha256", sha256)
            if not self._exists(key):
                self.client.upload_file(
                    str(staged), self.bucket, key, ExtraArgs={"ContentType": mime}
                )
            self._keep(staged, sha256)
        finally:
            staged.unlink(missing_ok=True)
        return sha256, size

    def _local_path(self, sha256: str) -> Path:
        from botocore.exceptions import ClientError

        key = self._key("sha256", sha256)
        cached = self._cached(sha256)
        if cached.is_file():
            if self._exists(key):
                return cached
            cached.unlink(missing_ok=True)  # deleted with its runs, by another process
            raise missing_artifact(sha256)
        self._staging.mkdir(parents=True, exist_ok=True)
        staged = self._staging / f"{sha256}.{os.getpid()}.{id(self)}.download"
        try:
            try:
                self.client.download_file(self.bucket, key, str(staged))
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND:
                    raise missing_artifact(sha256) from None
                raise
            found, _ = hash_file(staged)
            if found != sha256:
                raise ArtifactStoreError(
                    f"artifact {artifact_uri(sha256)} in bucket {self.bucket!r} is corrupt: "
                    f"its content hashes to {found}",
                    details={"sha256": sha256, "found": found},
                )
            self._keep(staged, sha256)
        finally:
            staged.unlink(missing_ok=True)
        return cached

    def _list(self, prefix: str, *, delimiter: str | None = None) -> list[dict[str, Any]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, **({"Delimiter": delimiter} if delimiter else {})
        )
        found: list[dict[str, Any]] = []
        for page in pages:
            found += page.get("CommonPrefixes" if delimiter else "Contents", [])
        return found

    def _delete_run(self, run_id: UUID) -> int:
        run = str(run_id)
        deleted = 0
        for marker in self._list(self._key("runs", run, "")):
            sha256 = marker["Key"].rsplit("/", 1)[1]
            with contextlib.suppress(MediaError):
                check_sha256(sha256)
                self.client.delete_object(Bucket=self.bucket, Key=self._key("refs", sha256, run))
                left = self.client.list_objects_v2(
                    Bucket=self.bucket, Prefix=self._key("refs", sha256, ""), MaxKeys=1
                )
                if not left.get("KeyCount"):
                    key = self._key("sha256", sha256)
                    if self._exists(key):
                        self.client.delete_object(Bucket=self.bucket, Key=key)
                        deleted += 1
                    self._cached(sha256).unlink(missing_ok=True)
            # The run's marker goes last: a deletion cut short is finished by the next.
            self.client.delete_object(Bucket=self.bucket, Key=marker["Key"])
        return deleted

    def _run_ids(self) -> list[UUID]:
        found: list[UUID] = []
        for common in self._list(self._key("runs", ""), delimiter="/"):
            with contextlib.suppress(ValueError):
                found.append(UUID(common["Prefix"].rstrip("/").rsplit("/", 1)[1]))
        return sorted(found)


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
