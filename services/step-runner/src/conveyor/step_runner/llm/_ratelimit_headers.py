"""What a provider's response headers say about when a key may send again.

OpenAI reports ``x-ratelimit-remaining-{requests,tokens}`` with resets as Go durations
(``"1s"``, ``"6m0s"``, ``"20ms"``); Anthropic reports
``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{remaining,reset}`` with
resets as RFC 3339 times; both send ``retry-after`` on a 429, OpenAI-compatible servers
sometimes ``retry-after-ms``. A remaining count of zero means the window is spent: sending
before its reset would only earn a 429, so the key is penalised until then.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

__all__ = [
    "MAX_PENALTY_SECONDS",
    "parse_go_duration",
    "parse_reset",
    "parse_retry_after",
    "penalty_from_headers",
]

MAX_PENALTY_SECONDS = 3600.0
"""A garbled header (a reset in the year 2099) must not lock a key out for good; an hour
outlasts any per-minute window, and a step's own timeout still bounds its wait."""

_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|h|m|s)")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # Go writes the micro sign
    "μs": 1e-6,  # and some servers the Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_OPENAI_REMAINING = re.compile(r"x-ratelimit-remaining-(?P<dim>.+)")
_ANTHROPIC_REMAINING = re.compile(r"anthropic-ratelimit-(?P<dim>.+)-remaining")


def parse_go_duration(text: str) -> float | None:
    """Seconds in a Go duration like ``"1m30s"`` or ``"250ms"`` (a bare number: seconds)."""
    text = text.strip()
    if not text:
        return None
    number = _number(text)
    if number is not None:
        return number if number >= 0 else None
    position, seconds = 0, 0.0
    for part in _GO_PART.finditer(text):
        if part.start() != position:
            return None
        seconds += float(part[1]) * _GO_UNITS[part[2]]
        position = part.end()
    return seconds if position == len(text) else None


def parse_reset(text: str, *, now: datetime) -> float | None:
    """Seconds until a window resets: a Go duration (OpenAI) or an RFC 3339 time (Anthropic)."""
    seconds = parse_go_duration(text)
    if seconds is not None:
        return seconds
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def parse_retry_after(text: str, *, now: datetime) -> float | None:
    """Seconds in a Retry-After header: delay-seconds (fractions tolerated) or an HTTP date."""
    seconds = _number(text)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def penalty_from_headers(headers: Mapping[str, str], *, now: datetime) -> float | None:
    """Seconds nobody sharing the key should send for, or ``None`` when nothing says wait.

    The longest of every signal wins: a spent requests window and a spent tokens window
    both have to reset before a request can succeed.
    """
    lowered = {name.lower(): value for name, value in headers.items()}
    waits: list[float] = []
    if (value := lowered.get("retry-after-ms")) is not None and (ms := _number(value)) is not None:
        waits.append(max(0.0, ms / 1000.0))
    value = lowered.get("retry-after")
    if value is not None and (seconds := parse_retry_after(value, now=now)) is not None:
        waits.append(seconds)
    for name, value in lowered.items():
        reset_name = _reset_header(name)
        if reset_name is None or reset_name not in lowered:
            continue
        remaining = _number(value)
        if remaining is None or remaining > 0:
            continue
        if (seconds := parse_reset(lowered[reset_name], now=now)) is not None:
            waits.append(seconds)
    if not waits:
        return None
    return min(max(waits), MAX_PENALTY_SECONDS)


def _reset_header(remaining_name: str) -> str | None:
    if match := _OPENAI_REMAINING.fullmatch(remaining_name):
        return f"x-ratelimit-reset-{match['dim']}"
    if match := _ANTHROPIC_REMAINING.fullmatch(remaining_name):
        return f"anthropic-ratelimit-{match['dim']}-reset"
    return None


def _number(text: str) -> float | None:
    try:
        number = float(text.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None
