"""The recorder's pure parts: the listing cursor, status ranks against the API's statuses,
and what a dead letter's body says about its run."""

from __future__ import annotations

import base64
import json
import typing
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest

from conveyor.contracts import DeadLetter
from conveyor.run_recorder._merge import ATTEMPT_STATUS_RANK, RUN_STATUS_RANK
from conveyor.run_recorder.projection import _subject_of
from conveyor.run_recorder.queries import InvalidCursor, decode_cursor, encode_cursor
from conveyor.run_recorder.schemas import AttemptStatus, RunStatus


def test_a_cursor_round_trips_and_is_url_safe() -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    run_id = uuid.uuid4()
    cursor = encode_cursor(when, run_id)
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert decode_cursor(cursor) == (when, run_id)


@pytest.mark.parametrize(
    "cursor",
    [
        "%%%",
        base64.urlsafe_b64encode(b"2025-01-01T00:00:00|not-a-uuid").decode(),
        base64.urlsafe_b64encode(f"2025-01-01T00:00:00|{uuid.uuid4()}".encode()).decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        "",
    ],
)
def test_a_cursor_not_handed_out_is_refused(cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor)


def test_every_status_the_api_shows_has_a_rank() -> None:
    assert set(typing.get_args(RunStatus)) == set(RUN_STATUS_RANK)
    assert set(typing.get_args(AttemptStatus)) == set(ATTEMPT_STATUS_RANK)
    terminal = {"succeeded", "failed", "cancelled", "skipped"}
    for ranks, first, live in (
        (RUN_STATUS_RANK, "queued", {"running", "parked"}),
        (ATTEMPT_STATUS_RANK, "scheduled", {"running"}),
    ):
        assert min(ranks, key=ranks.__getitem__) == first
        # every terminal status outranks every live one: nothing finished starts again
        assert min(ranks[s] for s in terminal) > max(ranks[s] for s in live | {first})
    # a runner's result for an attempt outranks that attempt's cancellation
    for result in ("succeeded", "failed", "skipped"):
        assert ATTEMPT_STATUS_RANK[result] > ATTEMPT_STATUS_RANK["cancelled"]


def _letter(value: bytes) -> DeadLetter:
    return DeadLetter(
        source_topic="t",
        partition=0,
        offset=0,
        consumer_group="g",
        reason="r",
        value_b64=base64.b64encode(value).decode(),
        occurred_at=datetime(2025, 1, 1, tzinfo=UTC),
    )


def test_a_dead_letter_body_names_its_run_when_it_can() -> None:
    run_id = uuid.uuid4()
    body = json.dumps({"run_id": str(run_id), "pipeline": "p"}).encode()
    assert _subject_of(_letter(body)) == (run_id, "p")
    assert _subject_of(_letter(b'{"run_id": "nope", "pipeline": 3}')) == (None, None)
    assert _subject_of(_letter(b"[1, 2]")) == (None, None)
    assert _subject_of(_letter(b"\xff\xfe")) == (None, None)
    assert _subject_of(_letter(b"{truncated")) == (None, None)
