"""The S3 artifact store against a real S3-compatible server: moto's, as a process."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.cli import stack
from conveyor.media.artifacts import ArtifactStore, create_store
from conveyor.media.errors import ArtifactStoreError, MediaNotFound
from conveyor.media.settings import MediaSettings

pytest.importorskip("moto", reason="moto[server] is not installed")
boto3 = pytest.importorskip("boto3")

KEYS = {"s3_access_key_id": "testing", "s3_secret_access_key": "testing"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = stack.free_port()
    server = shutil.which("moto_server")
    command = [server] if server else [sys.executable, "-m", "moto.server"]
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*command, "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        stack.wait_for_port("127.0.0.1", port, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    name = f"conveyor-{uuid.uuid4().hex[:12]}"
    _client(s3_endpoint).create_bucket(Bucket=name)
    return name


def _client(endpoint: str) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def _store(endpoint: str, bucket: str, cache: Path) -> ArtifactStore:
    settings = MediaSettings(
        artifact_backend="s3",
        artifact_dir=cache,
        s3_bucket=bucket,
        s3_prefix="conveyor/",
        s3_endpoint_url=endpoint,
        s3_region="us-east-1",
        **KEYS,  # type: ignore[arg-type]
    )
    return create_store(settings)


def _keys(endpoint: str, bucket: str) -> list[str]:
    listed = _client(endpoint).list_objects_v2(Bucket=bucket)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def _file(directory: Path, content: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(content)
    return path


async def test_s3_store_dedupes_caches_and_deletes_unreferenced_files(
    s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    store = _store(s3_endpoint, bucket, tmp_path / "cache-a")
    await store.prepare()
    first, second = uuid.uuid4(), uuid.uuid4()
    content = os.urandom(64 * 1024)
    sha = hashlib.sha256(content).hexdigest()
    work = tmp_path / "work"
    ref = await store.put_file(_file(work, content), mime="video/mp4", run_id=first, width=320)
    again = await store.put_file(_file(work, content), mime="video/mp4", run_id=second)
    only = await store.put_file(_file(work, b"first only"), mime="text/plain", run_id=first)
    assert (ref.sha256, ref.size, ref.width, ref.uri) == (
        sha,
        len(content),
        320,
        f"artifact://sha256/{sha}",
    )
    assert again.sha256 == sha
    assert list(work.iterdir()) == []  # consumed
    assert _keys(s3_endpoint, bucket) == sorted(
        [
            f"conveyor/sha256/{sha}",
            f"conveyor/sha256/{only.sha256}",
            f"conveyor/refs/{sha}/{first}",
            f"conveyor/refs/{sha}/{second}",
            f"conveyor/refs/{only.sha256}/{first}",
            f"conveyor/runs/{first}/{sha}",
            f"conveyor/runs/{first}/{only.sha256}",
            f"conveyor/runs/{second}/{sha}",
        ]
    )
    head = _client(s3_endpoint).head_object(Bucket=bucket, Key=f"conveyor/sha256/{sha}")
    assert head["ContentType"] == "video/mp4"
    assert await store.run_ids() == sorted([first, second])

    # another media process: an empty cache, filled from the bucket and checked
    other = _store(s3_endpoint, bucket, tmp_path / "cache-b")
    await other.prepare()
    path = await other.local_path(sha)
    assert path.read_bytes() == content
    assert path.is_relative_to((tmp_path / "cache-b").resolve())
    assert (await other.local_path(only.sha256)).read_bytes() == b"first only"

    assert await store.delete_run(first) == 1  # the shared file stays for the second run
    assert (await store.local_path(sha)).read_bytes() == content
    with pytest.raises(MediaNotFound, match=only.sha256):
        await store.local_path(only.sha256)
    # the other process still has a copy in its cache, but the bucket says it is gone
    with pytest.raises(MediaNotFound, match="not in the artifact store"):
        await other.local_path(only.sha256)

    assert await store.delete_run(second) == 1
    assert await store.delete_run(second) == 0
    assert _keys(s3_endpoint, bucket) == []
    assert await store.run_ids() == []
    with pytest.raises(MediaNotFound):
        await other.local_path(sha)


async def test_a_corrupt_object_is_never_handed_out(
    s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    sha = hashlib.sha256(b"the real content").hexdigest()
    _client(s3_endpoint).put_object(Bucket=bucket, Key=f"conveyor/sha256/{sha}", Body=b"rot")
    store = _store(s3_endpoint, bucket, tmp_path / "cache")
    await store.prepare()
    with pytest.raises(ArtifactStoreError, match="is corrupt") as caught:
        await store.local_path(sha)
    assert caught.value.retryable
    assert list((tmp_path / "cache").rglob(f"{sha}*")) == []


async def test_a_missing_bucket_or_server_fails_clearly(s3_endpoint: str, tmp_path: Path) -> None:
    missing = _store(s3_endpoint, "no-such-bucket", tmp_path / "cache")
    with pytest.raises(RuntimeError, match=r"'no-such-bucket'.*CONVEYOR_MEDIA_S3_BUCKET"):
        await missing.prepare()
    down = _store(f"http://127.0.0.1:{stack.free_port()}", "b", tmp_path / "cache")
    with pytest.raises(ArtifactStoreError, match="artifact bucket 'b' failed") as caught:
        await down.local_path("0" * 64)
    assert caught.value.retryable
