"""The ``http`` kind: one request through the process's shared ``httpx.AsyncClient``.

The step's packet is ``{"status", "headers", "json", "text"}``: ``json`` holds the parsed
body when the response is JSON, else ``text`` holds the body text (cut at 1 MiB). A status
outside ``expect`` (default: any 2xx or 3xx) fails the step; whether trying again can help
follows HTTP: 5xx, 408 and 429 are retryable, honouring Retry-After.
"""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from conveyor.contracts import StepReady, parse_duration
from conveyor.contracts.kinds import HttpConfig
from conveyor.step_runner.errors import (
    HttpConnectError,
    HttpRequestError,
    HttpStatusError,
    HttpTimeout,
    HttpTransportError,
)

__all__ = ["HttpStep", "parse_retry_after"]

MAX_TEXT_CHARS = 1024 * 1024
ERROR_BODY_CHARS = 2000
_RETRYABLE_STATUSES = frozenset({408, 429})


class HttpStep:
    """Executor of the ``http`` kind; owns no client, so one client serves every step."""

    def __init__(self, client: httpx.AsyncClient, *, max_body_bytes: int = 16 * 1024 * 1024):
        self._client = client
        self._max_body_bytes = max_body_bytes

    async def __call__(self, config: HttpConfig, step: StepReady) -> dict[str, Any]:
        method = config.method.upper()
        try:
            request = self._client.build_request(
                method,
                config.url,
                headers=config.headers,
                params=_query_params(config.params),
                json=config.json_body,
                content=config.body if config.json_body is None else None,
                timeout=_timeout(config.timeout, self._client.timeout),
            )
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            raise HttpRequestError(f"{method} {config.url}: {exc}") from None
        except ValueError as exc:  # a bad timeout, a params value httpx cannot encode
            raise HttpRequestError(f"{method} {config.url}: {exc}") from None
        where = f"{method} {request.url}"
        try:
            response = await self._client.send(
                request, stream=True, follow_redirects=config.follow_redirects
            )
            try:
                body, truncated = await self._read(response)
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise HttpTimeout(f"{where} timed out ({type(exc).__name__})") from None
        except httpx.ConnectError as exc:
            raise HttpConnectError(f"{where}: cannot connect: {exc}") from None
        except (httpx.UnsupportedProtocol, httpx.TooManyRedirects, httpx.InvalidURL) as exc:
            raise HttpRequestError(f"{where}: {exc}") from None
        except httpx.RequestError as exc:  # connection broke, undecodable body, ...
            raise HttpTransportError(f"{where}: {type(exc).__name__}: {exc}") from None
        packet = _packet(response, body, truncated=truncated)
        if not _accepted(response.status_code, config.expect):
            raise _status_error(where, response, body)
        return packet

    async def _read(self, response: httpx.Response) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_body_bytes:
                return b"".join(chunks)[: self._max_body_bytes], True
        return b"".join(chunks), False


def _query_params(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in params.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, dict):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _timeout(value: float | str | None, default: httpx.Timeout) -> httpx.Timeout:
    if value is None:
        return default
    return httpx.Timeout(parse_duration(value))


def _accepted(status: int, expect: list[int] | None) -> bool:
    return status in expect if expect else 200 <= status < 400


def _is_json(response: httpx.Response) -> bool:
    media_type: str = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _packet(response: httpx.Response, body: bytes, *, truncated: bool) -> dict[str, Any]:
    parsed: Any = None
    is_json = False
    if body and not truncated and _is_json(response):
        with contextlib.suppress(ValueError):
            parsed, is_json = json.loads(body), True
    text = None if is_json else _text(response, body)[:MAX_TEXT_CHARS]
    return {
        "status": response.status_code,
        "headers": {name.lower(): value for name, value in response.headers.items()},
        "json": parsed,
        "text": text,
    }


def _text(response: httpx.Response, body: bytes) -> str:
    return body.decode(response.charset_encoding or "utf-8", errors="replace")


def _status_error(where: str, response: httpx.Response, body: bytes) -> HttpStatusError:
    status = response.status_code
    retryable = status >= 500 or status in _RETRYABLE_STATUSES
    reason = response.reason_phrase or ""
    return HttpStatusError(
        f"{where} returned {status} {reason}".rstrip(),
        retryable=retryable,
        retry_after_s=parse_retry_after(response.headers.get("retry-after")),
        details={
            "status": status,
            "headers": {name.lower(): value for name, value in response.headers.items()},
            "body": _text(response, body)[:ERROR_BODY_CHARS],
        },
    )


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
