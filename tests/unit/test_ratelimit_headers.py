"""Reading OpenAI's and Anthropic's rate-limit headers into a penalty."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from conveyor.step_runner.llm.ratelimit import (
    MAX_PENALTY_SECONDS,
    parse_go_duration,
    parse_reset,
    parse_retry_after,
    penalty_from_headers,
)

NOW = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1m30s", 90.0),
        ("250ms", 0.25),
        ("1h2m3.5s", 3723.5),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("750us", 0.00075),
        ("3µs", 0.000003),
        ("2", 2.0),
        (" 7s ", 7.0),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "1x", "s1", "-1s", "1s garbage", "-3"])
def test_not_a_go_duration(text: str) -> None:
    assert parse_go_duration(text) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2025-05-01T12:00:30Z", 30.0),
        ("2025-05-01T14:00:45+02:00", 45.0),
        ("2025-05-01T12:00:00.250000Z", 0.25),
        ("2025-05-01T11:59:00Z", 0.0),  # already passed
        ("6m0s", 360.0),
        ("20ms", 0.02),
    ],
)
def test_reset_is_a_duration_or_an_rfc3339_time(text: str, seconds: float) -> None:
    assert parse_reset(text, now=NOW) == pytest.approx(seconds)


def test_unreadable_reset() -> None:
    assert parse_reset("tomorrow-ish", now=NOW) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2", 2.0),
        ("1.5", 1.5),
        ("Thu, 01 May 2025 12:00:20 GMT", 20.0),
        ("Thu, 01 May 2025 11:00:00 GMT", 0.0),
    ],
)
def test_retry_after_is_seconds_or_an_http_date(text: str, seconds: float) -> None:
    assert parse_retry_after(text, now=NOW) == pytest.approx(seconds)


def test_unreadable_retry_after() -> None:
    assert parse_retry_after("later", now=NOW) is None


def test_openai_spent_requests_window_waits_for_its_reset() -> None:
    headers = {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m30s",
        "x-ratelimit-remaining-tokens": "149000",
        "x-ratelimit-reset-tokens": "20ms",
    }
    assert penalty_from_headers(headers, now=NOW) == pytest.approx(90.0)


def test_openai_spent_tokens_window_waits_for_its_reset() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert penalty_from_headers(headers, now=NOW) == pytest.approx(360.0)


def test_remaining_capacity_says_nothing() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "12",
        "x-ratelimit-reset-requests": "1s",
        "anthropic-ratelimit-tokens-remaining": "4000",
        "anthropic-ratelimit-tokens-reset": "2025-05-01T12:00:30Z",
        "content-type": "application/json",
    }
    assert penalty_from_headers(headers, now=NOW) is None


@pytest.mark.parametrize("dimension", ["requests", "tokens", "input-tokens", "output-tokens"])
def test_anthropic_spent_window_waits_until_its_reset_time(dimension: str) -> None:
    headers = {
        f"anthropic-ratelimit-{dimension}-limit": "50",
        f"anthropic-ratelimit-{dimension}-remaining": "0",
        f"anthropic-ratelimit-{dimension}-reset": (NOW + timedelta(seconds=42)).isoformat(),
    }
    assert penalty_from_headers(headers, now=NOW) == pytest.approx(42.0)


def test_a_spent_window_without_a_reset_says_nothing() -> None:
    assert penalty_from_headers({"x-ratelimit-remaining-requests": "0"}, now=NOW) is None


def test_retry_after_and_retry_after_ms() -> None:
    assert penalty_from_headers({"retry-after": "7"}, now=NOW) == pytest.approx(7.0)
    assert penalty_from_headers({"retry-after-ms": "1500"}, now=NOW) == pytest.approx(1.5)


def test_the_longest_signal_wins() -> None:
    headers = {
        "retry-after": "3",
        "retry-after-ms": "2500",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2025-05-01T12:00:10Z",
    }
    assert penalty_from_headers(headers, now=NOW) == pytest.approx(10.0)


def test_header_names_are_case_insensitive_in_a_plain_dict() -> None:
    headers = {"Retry-After": "4", "X-RateLimit-Remaining-Tokens": "0"}
    headers["X-RateLimit-Reset-Tokens"] = "9s"
    assert penalty_from_headers(headers, now=NOW) == pytest.approx(9.0)


def test_httpx_headers_are_a_mapping_it_reads() -> None:
    response_headers = httpx.Headers([("Retry-After", "5"), ("Content-Type", "text/plain")])
    assert penalty_from_headers(response_headers, now=NOW) == pytest.approx(5.0)


def test_a_garbled_reset_cannot_lock_a_key_out_for_good() -> None:
    headers = {
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": "2099-01-01T00:00:00Z",
    }
    assert penalty_from_headers(headers, now=NOW) == MAX_PENALTY_SECONDS


def test_garbage_values_are_ignored() -> None:
    headers = {
        "retry-after": "whenever",
        "retry-after-ms": "nan",
        "x-ratelimit-remaining-requests": "none",
        "x-ratelimit-reset-requests": "1s",
    }
    assert penalty_from_headers(headers, now=NOW) is None
