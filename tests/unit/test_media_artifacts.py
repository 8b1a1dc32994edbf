"""The local artifact store on a real directory: content addressing, references per run,
deletion of unreferenced files, atomic puts, and artifact uris."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
import warnings
from pathlib import Path

import pytest
from pydantic import ValidationError

from conveyor.contracts import ArtifactRef, artifact_uri, parse_artifact_uri
from conveyor.media.artifacts import LocalArtifactStore, create_store
from conveyor.media.errors import InvalidMediaSource, MediaNotFound
from conveyor.media.settings import MediaSettings

SHA = hashlib.sha256(b"x").hexdigest()


@pytest.fixture
async def store(tmp_path: Path) -> LocalArtifactStore:
    store = LocalArtifactStore(tmp_path / "artifacts")
    await store.prepare()
    return store


def _file(directory: Path, content: bytes, name: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (name or f"{uuid.uuid4().hex}.bin")
    path.write_bytes(content)
    return path


def _stored_files(store: LocalArtifactStore) -> list[Path]:
    return sorted(p for p in (store.directory / "sha256").rglob("*") if p.is_file())


# --- artifact uris and references --------------------------------------------------------


def test_an_artifact_uri_names_the_sha256() -> None:
    assert artifact_uri(SHA) == f"artifact://sha256/{SHA}"
    assert parse_artifact_uri(f"artifact://sha256/{SHA}") == SHA
    assert parse_artifact_uri(f"ARTIFACT://sha256/{SHA}") == SHA


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("", "is not an artifact uri"),
        (f"http://sha256/{SHA}", "is not an artifact uri"),
        (f"artifact:sha256/{SHA}", "is not an artifact uri"),
        (f"artifact://md5/{SHA}", "only sha256 artifacts exist, not 'md5'"),
        ("artifact://sha256/abc", "is not a sha256"),
        (f"artifact://sha256/{SHA.upper()}", "is not a sha256"),
        (f"artifact://sha256/{SHA}/../x", "is not a sha256"),
        (f"artifact://sha256/{'g' * 64}", "is not a sha256"),
    ],
)
def test_a_malformed_artifact_uri_is_refused_saying_why(uri: str, says: str) -> None:
    with pytest.raises(ValueError, match="artifact") as caught:
        parse_artifact_uri(uri)
    assert says in str(caught.value)


def test_an_artifact_ref_is_frozen_strict_and_consistent() -> None:
    ref = ArtifactRef(uri=artifact_uri(SHA), sha256=SHA, size=1, mime="text/plain")
    assert ref.codecs == []
    assert ArtifactRef.model_validate(ref.model_dump()) == ref
    with pytest.raises(ValidationError):
        ArtifactRef(uri=artifact_uri(SHA), sha256=SHA, size=1, mime="x", colour="red")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="does not name sha256"):
        ArtifactRef(uri=artifact_uri("0" * 64), sha256=SHA, size=1, mime="x")
    with pytest.raises(ValidationError):
        ref.size = 2  # type: ignore[misc]


# --- putting and reading -----------------------------------------------------------------


async def test_a_put_file_is_moved_in_under_its_sha256(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    content = b"frame data" * 1000
    source = _file(tmp_path / "work", content, "clip.mp4")
    ref = await store.put_file(
        source,
        mime="video/mp4",
        run_id=uuid.uuid4(),
        duration=2.5,
        width=320,
        height=240,
        codecs=("h264", "aac"),
    )
    sha = hashlib.sha256(content).hexdigest()
    assert ref == ArtifactRef(
        uri=f"artifact://sha256/{sha}",
        sha256=sha,
        size=len(content),
        mime="video/mp4",
        duration=2.5,
        width=320,
        height=240,
        codecs=["h264", "aac"],
    )
    assert not source.exists()  # consumed
    path = await store.local_path(sha)
    assert path.read_bytes() == content
    assert path.is_relative_to(store.directory)
    assert not os.access(path, os.W_OK) or os.geteuid() == 0  # read-only (root writes anyway)
    assert path.stat().st_mode & 0o222 == 0
    assert list((store.directory / "tmp").iterdir()) == []


async def test_the_same_bytes_twice_are_one_file_referenced_per_run(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    first, second = uuid.uuid4(), uuid.uuid4()
    a = await store.put_file(_file(tmp_path / "w", b"same"), mime="text/plain", run_id=first)
    again = await store.put_file(_file(tmp_path / "w", b"same"), mime="text/plain", run_id=first)
    b = await store.put_file(_file(tmp_path / "w", b"same"), mime="text/plain", run_id=second)
    only = await store.put_file(_file(tmp_path / "w", b"mine"), mime="text/plain", run_id=first)
    assert a.sha256 == again.sha256 == b.sha256 != only.sha256
    assert len(_stored_files(store)) == 2
    assert await store.run_ids() == sorted([first, second])

    # the first run's deletion keeps what the second still references
    assert await store.delete_run(first) == 1
    assert (await store.local_path(b.sha256)).read_bytes() == b"same"
    with pytest.raises(MediaNotFound, match=f"artifact://sha256/{only.sha256}"):
        await store.local_path(only.sha256)
    assert await store.run_ids() == [second]

    assert await store.delete_run(second) == 1
    with pytest.raises(MediaNotFound, match="not in the artifact store"):
        await store.local_path(b.sha256)
    assert _stored_files(store) == []
    assert await store.run_ids() == []
    # a second deletion, or one of a run never seen, deletes nothing
    assert await store.delete_run(second) == 0
    assert await store.delete_run(uuid.uuid4()) == 0


async def test_local_path_refuses_what_is_not_a_sha256(store: LocalArtifactStore) -> None:
    for bad in ("../../etc/passwd", SHA.upper(), SHA[:-1], f"{SHA[:-1]}/", ""):
        with pytest.raises(InvalidMediaSource, match="is not a sha256"):
            await store.local_path(bad)
    with pytest.raises(MediaNotFound):
        await store.local_path(SHA)


async def test_putting_what_is_not_a_file_fails_clearly(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    with pytest.raises(MediaNotFound, match="no such regular file"):
        await store.put_file(tmp_path / "nope.mp4", mime="video/mp4", run_id=uuid.uuid4())
    with pytest.raises(MediaNotFound, match="no such regular file"):
        await store.put_file(tmp_path, mime="video/mp4", run_id=uuid.uuid4())


async def test_a_symlink_is_stored_as_its_content_and_its_target_kept(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    target = _file(tmp_path / "elsewhere", b"the real bytes", "real.wav")
    link = tmp_path / "work" / "link.wav"
    link.parent.mkdir()
    link.symlink_to(target)
    ref = await store.put_file(link, mime="audio/wav", run_id=uuid.uuid4())
    stored = await store.local_path(ref.sha256)
    assert not stored.is_symlink()
    assert stored.read_bytes() == b"the real bytes"
    assert not link.exists()
    assert target.read_bytes() == b"the real bytes"


def _on_another_filesystem(path: Path, other: Path) -> bool:
    return path.is_dir() and path.stat().st_dev != other.stat().st_dev


async def test_a_file_on_another_filesystem_is_copied_in(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    shm = Path("/dev/shm")
    if not _on_another_filesystem(shm, store.directory):
        pytest.skip("no second filesystem to move from")
    source = _file(shm / f"conveyor-test-{uuid.uuid4().hex}", b"across devices")
    try:
        ref = await store.put_file(source, mime="application/octet-stream", run_id=uuid.uuid4())
        assert (await store.local_path(ref.sha256)).read_bytes() == b"across devices"
        assert not source.exists()
    finally:
        source.unlink(missing_ok=True)
        source.parent.rmdir()


async def test_prepare_sweeps_what_a_crashed_put_left(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    await store.prepare()
    staging = store.directory / "tmp"
    stale, fresh = staging / "old.part", staging / "new.part"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"in progress")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    await store.prepare()
    assert sorted(p.name for p in staging.iterdir()) == ["new.part"]


# --- concurrency -------------------------------------------------------------------------


async def test_concurrent_puts_and_deletions_keep_every_referenced_file(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    """Runs that come and go while others put the same content: what a live run references
    is always there, and nothing half-written is ever visible."""
    kept = [uuid.uuid4() for _ in range(8)]
    churn = [uuid.uuid4() for _ in range(8)]
    content = os.urandom(256 * 1024)

    async def put(run_id: uuid.UUID) -> None:
        await store.put_file(_file(tmp_path / "w", content), mime="x/y", run_id=run_id)

    async def put_then_delete(run_id: uuid.UUID) -> None:
        await put(run_id)
        await store.delete_run(run_id)

    await asyncio.gather(*(put(r) for r in kept), *(put_then_delete(r) for r in churn))
    sha = hashlib.sha256(content).hexdigest()
    assert hashlib.sha256((await store.local_path(sha)).read_bytes()).hexdigest() == sha
    assert await store.run_ids() == sorted(kept)
    assert list((store.directory / "tmp").iterdir()) == []


def _hammer(store: LocalArtifactStore, work: Path, *, churn: bool, content: bytes) -> None:
    """In a forked child: put (and with ``churn`` delete) 40 runs' copies of ``content``."""
    for i in range(40):
        source = work / f"{churn}-{i}.bin"
        source.write_bytes(content)
        run_id = uuid.uuid4()
        store._put(source, run_id)
        if churn:
            store._delete_run(run_id)


async def test_two_processes_sharing_the_directory_never_lose_a_referenced_file(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    """The lock is a flock on a file: it holds between processes (two media runners on
    one volume), not only between threads."""
    content = os.urandom(4096)
    work = tmp_path / "hammer"
    work.mkdir()
    children = []
    for churn in (False, True):
        with warnings.catch_warnings():  # fork() with threads running: the child only
            warnings.simplefilter("ignore", DeprecationWarning)  # touches files
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                _hammer(store, work, churn=churn, content=content)
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    codes = [
        os.waitstatus_to_exitcode((await asyncio.to_thread(os.waitpid, pid, 0))[1])
        for pid in children
    ]
    assert codes == [0, 0]
    sha = hashlib.sha256(content).hexdigest()
    assert (await store.local_path(sha)).read_bytes() == content
    assert len(await store.run_ids()) == 40  # the keepers'


# --- choosing a store --------------------------------------------------------------------


def test_create_store_is_local_by_default_and_checks_s3_settings(tmp_path: Path) -> None:
    store = create_store(MediaSettings(artifact_dir=tmp_path / "a"))
    assert isinstance(store, LocalArtifactStore)
    assert store.directory == (tmp_path / "a").resolve()
    assert not store.directory.exists()  # nothing is touched before prepare()
    with pytest.raises(ValueError, match="CONVEYOR_MEDIA_S3_BUCKET"):
        create_store(MediaSettings(artifact_dir=tmp_path / "a", artifact_backend="s3"))


def test_media_settings_read_the_artifact_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_MEDIA_ARTIFACT_DIR", "/data/artifacts")
    monkeypatch.setenv("CONVEYOR_MEDIA_ARTIFACT_BACKEND", "s3")
    monkeypatch.setenv("CONVEYOR_MEDIA_S3_BUCKET", "media")
    monkeypatch.setenv("CONVEYOR_MEDIA_S3_SECRET_ACCESS_KEY", "hush")
    monkeypatch.setenv("CONVEYOR_MEDIA_MAX_DOWNLOAD_BYTES", "1000")
    settings = MediaSettings()
    assert settings.artifact_dir == Path("/data/artifacts")
    assert (settings.artifact_backend, settings.s3_bucket) == ("s3", "media")
    assert "hush" not in repr(settings)
    assert settings.max_download_bytes == 1000
    assert MediaSettings(artifact_backend="local").allow_private_urls is False
