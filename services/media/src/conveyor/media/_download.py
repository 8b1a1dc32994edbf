"""Fetching an http(s) media source into a step's working directory, within limits.

- Size: a ``Content-Length`` over the limit is refused before a byte is read; without one
  (or with a lying one) the transfer is stopped as soon as it passes the limit. The limit
  counts decoded bytes, so a small compressed body cannot unpack into a huge file.
- Where: redirects are followed by hand (at most ``max_redirects``), each hop must be http
  or https, and unless private URLs are allowed every address the host resolves to must be
  public: a pipeline's input must not make the runner read internal services. (The check
  resolves the name before httpx does; a name that changes its answer in between is not
  caught.) Proxies from the environment are not used, for the same reason.
- Time: connect and each read are bounded by the timeout; the step's own timeout bounds
  the whole download.
- Failures: 5xx, 408, 425, 429, timeouts and broken connections are retryable
  ``DownloadFailed``; other 4xx are not. A partial file never stays behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import ssl
import uuid
from pathlib import Path, PurePosixPath

import httpx

from conveyor.media.errors import DownloadFailed, DownloadRefused, DownloadTooLarge

__all__ = ["Downloader", "display_url"]

_RETRYABLE_STATUS = frozenset({408, 425, 429})
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}")


def display_url(url: str | httpx.URL) -> str:
    """The URL for messages: no user info, no query (it may hold a signature or token)."""
    try:
        parsed = httpx.URL(str(url))
    except httpx.InvalidURL:
        return "<invalid URL>"
    shown = parsed.copy_with(username=None, password=None, query=None, fragment=None)
    return str(shown) + ("?…" if parsed.query else "")


class Downloader:
    def __init__(
        self,
        *,
        max_bytes: int,
        timeout_s: float,
        allow_private: bool = False,
        max_redirects: int = 5,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.allow_private = allow_private
        self.max_redirects = max_redirects
        self._tls: ssl.SSLContext | None = None  # loading CA certificates is slow: once

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        return self._tls

    async def fetch(self, url: str, *, workdir: Path) -> Path:
        """Download ``url`` into a new file in ``workdir``; its path."""
        shown = display_url(url)
        try:
            current = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise DownloadRefused(f"media source {shown}: not a valid URL: {exc}") from None
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        target = workdir / f"download-{uuid.uuid4().hex[:12]}{_suffix(current)}"
        timeout = httpx.Timeout(self.timeout_s)
        async with httpx.AsyncClient(
            timeout=timeout, follow_redirects=False, trust_env=False, verify=self._tls_context()
        ) as client:
            for _ in range(self.max_redirects + 1):
                await self._check(current, source=shown)
                try:
                    async with client.stream("GET", current) as response:
                        location = response.headers.get("location")
                        if response.is_redirect and location:
                            current = _redirect(response.url, location, source=shown)
                            continue
                        _check_status(response, source=shown)
                        await self._save(response, target, source=shown)
                        return target
                except httpx.TimeoutException:
                    raise DownloadFailed(
                        f"downloading {shown}: no answer within {self.timeout_s:g}s",
                        retryable=True,
                        details={"timeout_s": self.timeout_s},
                    ) from None
                except httpx.TransportError as exc:
                    raise DownloadFailed(
                        f"downloading {shown}: {type(exc).__name__}: {exc}", retryable=True
                    ) from None
        raise DownloadFailed(f"downloading {shown}: more than {self.max_redirects} redirects")

    async def _check(self, url: httpx.URL, *, source: str) -> None:
        if url.scheme not in ("http", "https"):
            raise DownloadRefused(
                f"downloading {source}: refusing to fetch {url.scheme}:// "
                f"({display_url(url)}); only http and https are followed"
            )
        host = url.host
        if not host:
            raise DownloadRefused(f"media source {source}: the URL names no host")
        if self.allow_private:
            return
        for address in await _addresses(host, url.port or (443 if url.scheme == "https" else 80)):
            if not address.is_global:
                raise DownloadRefused(
                    f"downloading {source}: {host} is {address}, a private address; "
                    "set CONVEYOR_MEDIA_ALLOW_PRIVATE_URLS=true to fetch from it",
                    details={"host": host, "address": str(address)},
                )

    async def _save(self, response: httpx.Response, target: Path, *, source: str) -> None:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise DownloadTooLarge(
                f"{source} is {int(declared)} bytes, more than the {self.max_bytes} bytes "
                "a download may be (CONVEYOR_MEDIA_MAX_DOWNLOAD_BYTES)",
                details={"size": int(declared), "max_bytes": self.max_bytes},
            )
        received = 0
        handle = await asyncio.to_thread(open, target, "wb")
        try:
            async for chunk in response.aiter_bytes():
                received += len(chunk)
                if received > self.max_bytes:
                    raise DownloadTooLarge(
                        f"{source} sent more than the {self.max_bytes} bytes a download may "
                        "be (CONVEYOR_MEDIA_MAX_DOWNLOAD_BYTES); the download was stopped",
                        details={"max_bytes": self.max_bytes},
                    )
                handle.write(chunk)
        except BaseException:
            handle.close()
            with contextlib.suppress(OSError):
                await asyncio.to_thread(target.unlink)
            raise
        handle.close()


async def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [_unmapped(ipaddress.ip_address(host.strip("[]")))]
    except ValueError:
        pass  # a name, not an address literal
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DownloadFailed(
            f"cannot resolve {host}: {exc}", retryable=True, details={"host": host}
        ) from None
    return [_unmapped(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])) for info in infos]


def _unmapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _redirect(base: httpx.URL, location: str, *, source: str) -> httpx.URL:
    try:
        return base.join(location)
    except httpx.InvalidURL as exc:
        raise DownloadFailed(f"downloading {source}: a redirect to an invalid URL: {exc}") from None


def _check_status(response: httpx.Response, *, source: str) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    retryable = status >= 500 or status in _RETRYABLE_STATUS
    raise DownloadFailed(
        f"downloading {source}: the server answered {status} {response.reason_phrase}".rstrip(),
        retryable=retryable,
        retry_after_s=_retry_after(response) if retryable else None,
        details={"status": status},
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _suffix(url: httpx.URL) -> str:
    """The URL's file extension when it looks like one (ffmpeg guesses formats from it)."""
    suffix = PurePosixPath(url.path).suffix
    return suffix.lower() if _SUFFIX.fullmatch(suffix) else ""
