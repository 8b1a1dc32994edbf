"""SourceResolver on real files and a real HTTP server: paths kept inside the media root,
artifacts read from the store, and downloads within their limits."""

from __future__ import annotations

import gzip
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conveyor.media.artifacts import LocalArtifactStore
from conveyor.media.errors import (
    DownloadFailed,
    DownloadRefused,
    DownloadTooLarge,
    InvalidMediaSource,
    MediaNotFound,
    PathOutsideRoot,
)
from conveyor.media.sources import SourceResolver
from conveyor.runtime.runner import StepError

LIMIT = 2000
CLIP = bytes(range(256)) * 4  # 1024 bytes


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hits: list[str]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up on purpose (too large, timed out)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.hits.append(path)
        if path == "/clip.mp4":
            self._send(200, CLIP, Content_Type="video/mp4")
        elif path == "/declared-big":  # says so up front; nothing should be read
            self._send(200, b"x" * (LIMIT + 1))
        elif path == "/undeclared-big":  # no Content-Length: the end is the closed connection
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"y" * 500)
                self.wfile.flush()
        elif path == "/bomb":  # 1 KB on the wire that unpacks to 100 KB
            body = gzip.compress(b"\0" * 100_000)
            self._send(200, body, Content_Encoding="gzip")
        elif path == "/missing":
            self._send(404, b"no such clip")
        elif path == "/broken":
            self._send(500, b"oops")
        elif path == "/busy":
            self._send(429, b"slow down", Retry_After="7")
        elif path == "/moved":
            self._send(302, Location="/clip.mp4")
        elif path == "/to-file":
            self._send(302, Location="file:///etc/passwd")
        elif path == "/loop":
            self._send(302, Location="/loop")
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, b"late")
        else:
            self._send(400, b"bad test path")


@pytest.fixture(scope="module")
def http_server() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def base(http_server: _Server) -> str:
    return f"http://127.0.0.1:{http_server.server_address[1]}"


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "media"
    (root / "clips").mkdir(parents=True)
    (root / "clips" / "a.mp4").write_bytes(b"inside")
    (root / "-rf.mp4").write_bytes(b"dash")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.mp4").write_bytes(b"secret")
    (root / "escape.mp4").symlink_to(outside / "secret.mp4")
    (root / "link.mp4").symlink_to(root / "clips" / "a.mp4")
    return {"root": root, "outside": outside, "work": tmp_path / "work"}


@pytest.fixture
async def store(tmp_path: Path) -> LocalArtifactStore:
    store = LocalArtifactStore(tmp_path / "artifacts")
    await store.prepare()
    return store


def _resolver(
    layout: dict[str, Path], store: LocalArtifactStore, **overrides: Any
) -> SourceResolver:
    options: dict[str, Any] = {
        "root": layout["root"],
        "store": store,
        "max_download_bytes": LIMIT,
        "http_timeout_s": 5.0,
        "allow_private_urls": True,  # the test server is on loopback
        **overrides,
    }
    return SourceResolver(**options)


# --- paths under the media root ----------------------------------------------------------


async def test_paths_and_file_uris_inside_the_root_resolve(
    layout: dict[str, Path], store: LocalArtifactStore
) -> None:
    resolver = _resolver(layout, store)
    root, work = layout["root"].resolve(), layout["work"]
    inside = root / "clips" / "a.mp4"
    for source in (
        "clips/a.mp4",
        "./clips/../clips/a.mp4",
        str(inside),
        f"file://{inside}",
        f"file://localhost{inside}",
        "file://" + str(root / "clips" / "%61.mp4"),  # percent-encoded 'a'
        "link.mp4",  # a symlink that stays inside
    ):
        assert await resolver.resolve(source, workdir=work) == inside, source
    assert await resolver.resolve("./-rf.mp4", workdir=work) == root / "-rf.mp4"


@pytest.mark.parametrize(
    ("source", "error", "says"),
    [
        ("../outside/secret.mp4", PathOutsideRoot, "outside the media root"),
        ("clips/../../outside/secret.mp4", PathOutsideRoot, "outside the media root"),
        ("{outside}/secret.mp4", PathOutsideRoot, "outside the media root"),
        ("file://{outside}/secret.mp4", PathOutsideRoot, "outside the media root"),
        ("escape.mp4", PathOutsideRoot, "outside the media root"),
        ("-rf.mp4", InvalidMediaSource, "must not start with '-'"),
        ("-i", InvalidMediaSource, "must not start with '-'"),
        ("clips/a.mp4\x00.txt", InvalidMediaSource, "NUL"),
        ("file://evil.example/etc/passwd", InvalidMediaSource, "names host"),
        ("clips", MediaNotFound, "not a regular file"),
        ("clips/nope.mp4", MediaNotFound, "no such file"),
        ("ftp://example.com/a.mp4", InvalidMediaSource, "ftp:// is not supported"),
        ("s3://bucket/a.mp4", InvalidMediaSource, "s3:// is not supported"),
    ],
)
async def test_what_escapes_the_root_or_is_no_file_is_refused(
    layout: dict[str, Path],
    store: LocalArtifactStore,
    source: str,
    error: type[StepError],
    says: str,
) -> None:
    resolver = _resolver(layout, store)
    with pytest.raises(error, match=says) as caught:
        await resolver.resolve(source.format(outside=layout["outside"]), workdir=layout["work"])
    assert not caught.value.retryable


async def test_a_source_of_another_type_is_refused(
    layout: dict[str, Path], store: LocalArtifactStore
) -> None:
    resolver = _resolver(layout, store)
    with pytest.raises(InvalidMediaSource, match="not int"):
        await resolver.resolve(42, workdir=layout["work"])  # type: ignore[arg-type]
    with pytest.raises(InvalidMediaSource, match='without a string "uri"'):
        await resolver.resolve({"path": "clips/a.mp4"}, workdir=layout["work"])


# --- artifacts ---------------------------------------------------------------------------


async def test_artifact_references_and_uris_resolve_to_the_stored_file(
    layout: dict[str, Path], store: LocalArtifactStore, tmp_path: Path
) -> None:
    made = tmp_path / "made.wav"
    made.write_bytes(b"an artifact")
    ref = await store.put_file(made, mime="audio/wav", run_id=uuid.uuid4())
    resolver = _resolver(layout, store)
    work = layout["work"]
    path = await resolver.resolve(ref.model_dump(mode="json"), workdir=work)
    assert path.read_bytes() == b"an artifact"
    assert await resolver.resolve(ref.uri, workdir=work) == path
    assert await resolver.resolve({"uri": ref.uri}, workdir=work) == path

    with pytest.raises(InvalidMediaSource, match="says sha256"):
        await resolver.resolve({**ref.model_dump(), "sha256": "0" * 64}, workdir=work)
    with pytest.raises(InvalidMediaSource, match="is not a sha256"):
        await resolver.resolve("artifact://sha256/../../etc/passwd", workdir=work)
    with pytest.raises(InvalidMediaSource, match="only sha256 artifacts"):
        await resolver.resolve(f"artifact://md5/{ref.sha256}", workdir=work)
    with pytest.raises(MediaNotFound, match="not in the artifact store"):
        await resolver.resolve(f"artifact://sha256/{'0' * 64}", workdir=work)


# --- downloads ---------------------------------------------------------------------------


async def test_a_url_is_downloaded_into_the_workdir(
    layout: dict[str, Path], store: LocalArtifactStore, base: str
) -> None:
    resolver = _resolver(layout, store)
    path = await resolver.resolve(f"{base}/clip.mp4?sig=abc", workdir=layout["work"])
    assert path.parent == layout["work"]
    assert path.suffix == ".mp4"
    assert path.read_bytes() == CLIP
    moved = await resolver.resolve(f"{base}/moved", workdir=layout["work"])
    assert moved.read_bytes() == CLIP


@pytest.mark.parametrize("path", ["/declared-big", "/undeclared-big", "/bomb"])
async def test_a_download_over_the_limit_is_stopped_and_leaves_nothing(
    layout: dict[str, Path], store: LocalArtifactStore, base: str, path: str
) -> None:
    resolver = _resolver(layout, store)
    with pytest.raises(DownloadTooLarge, match=f"{LIMIT} bytes") as caught:
        await resolver.resolve(f"{base}{path}", workdir=layout["work"])
    assert "CONVEYOR_MEDIA_MAX_DOWNLOAD_BYTES" in caught.value.message
    assert not caught.value.retryable
    assert list(layout["work"].iterdir()) == []


@pytest.mark.parametrize(
    ("path", "retryable", "says"),
    [
        ("/missing", False, "answered 404 Not Found"),
        ("/broken", True, "answered 500 Internal Server Error"),
        ("/busy", True, "answered 429"),
        ("/loop", False, "more than 5 redirects"),
    ],
)
async def test_a_failed_download_says_why_and_whether_to_retry(
    layout: dict[str, Path],
    store: LocalArtifactStore,
    base: str,
    path: str,
    retryable: bool,
    says: str,
) -> None:
    resolver = _resolver(layout, store)
    with pytest.raises(DownloadFailed, match=says) as caught:
        await resolver.resolve(f"{base}{path}", workdir=layout["work"])
    assert caught.value.retryable is retryable
    if path == "/busy":
        assert caught.value.retry_after_s == 7.0


async def test_timeouts_and_refused_connections_are_retryable(
    layout: dict[str, Path], store: LocalArtifactStore, base: str
) -> None:
    resolver = _resolver(layout, store, http_timeout_s=0.3)
    with pytest.raises(DownloadFailed, match=r"no answer within 0\.3s") as caught:
        await resolver.resolve(f"{base}/slow", workdir=layout["work"])
    assert caught.value.retryable
    closed = _closed_port()
    with pytest.raises(DownloadFailed, match="ConnectError") as caught:
        await resolver.resolve(f"http://127.0.0.1:{closed}/a.mp4", workdir=layout["work"])
    assert caught.value.retryable


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_a_redirect_to_another_scheme_is_refused(
    layout: dict[str, Path], store: LocalArtifactStore, base: str
) -> None:
    resolver = _resolver(layout, store)
    with pytest.raises(DownloadRefused, match="refusing to fetch file://"):
        await resolver.resolve(f"{base}/to-file", workdir=layout["work"])


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/clip.mp4",
        "http://localhost:{port}/clip.mp4",
        "http://[::1]:{port}/clip.mp4",
        "http://[::ffff:127.0.0.1]:{port}/clip.mp4",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/clip.mp4",
    ],
)
async def test_private_addresses_are_refused_unless_allowed(
    layout: dict[str, Path], store: LocalArtifactStore, http_server: _Server, url: str
) -> None:
    resolver = _resolver(layout, store, allow_private_urls=False)
    hits = len(http_server.hits)
    with pytest.raises(DownloadRefused, match="CONVEYOR_MEDIA_ALLOW_PRIVATE_URLS") as caught:
        await resolver.resolve(
            url.format(port=http_server.server_address[1]), workdir=layout["work"]
        )
    assert "private address" in caught.value.message
    assert len(http_server.hits) == hits  # not even asked


async def test_messages_never_show_credentials_or_query_strings(
    layout: dict[str, Path], store: LocalArtifactStore, http_server: _Server
) -> None:
    resolver = _resolver(layout, store)
    port = http_server.server_address[1]
    url = f"http://ada:hunter2@127.0.0.1:{port}/missing?token=s3cr3t"
    with pytest.raises(StepError) as caught:
        await resolver.resolve(url, workdir=layout["work"])
    assert "hunter2" not in caught.value.message
    assert "s3cr3t" not in caught.value.message
    assert f"127.0.0.1:{port}/missing?…" in caught.value.message
