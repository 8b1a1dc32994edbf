"""Order-tolerant upserts: the rule that makes the read model the same whatever order the
events were read in.

An event *wins* a row when its status ranks higher than the row's, or ranks the same and
occurred no earlier than the event that set the row's status. A winning event's non-null
values replace the row's; a losing event only fills the row's nulls. So a status never moves
backwards, a timestamp is never overwritten by null, and a late StepScheduled still
contributes its ``kind`` to an attempt that already succeeded.

Two refinements. A cancelled attempt ranks below a result (succeeded, failed, skipped): a
runner's late answer for an attempt cancelled in flight is kept, and a cancellation read
after the result changes nothing. And a run can be reopened: RunRetried is the one event
that moves a run's status backwards (see ``projection._run_retried``); it stamps the run's
``retried_at``, and from then on an event that occurred at or before that fence never wins
the run, nor contributes its ``outcome`` (output, error, finished_at, which belong to the
event that ended the run: a re-run that succeeds does not keep the first run's error).

The ranks and the rule live in SQL functions created by the migrations
(``recorder.run_rank``, ``recorder.attempt_rank``, ``recorder.supersedes``); the maps below
mirror them for Python and a test keeps the two in step. Statements are built once per
shape with bind parameters: building SQLAlchemy expressions per event, or SQL too long for
psycopg's query cache, cost more than the database work itself.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, and_, bindparam, case, func, literal_column
from sqlalchemy.dialects.postgresql import Insert, insert

__all__ = ["ATTEMPT_STATUS_RANK", "RUN_STATUS_RANK", "merge_statement"]

RUN_STATUS_RANK: Mapping[str, int] = {
    "queued": 0,
    "running": 1,
    "parked": 1,
    "succeeded": 2,
    "failed": 2,
    "cancelled": 2,
    "skipped": 2,
}
ATTEMPT_STATUS_RANK: Mapping[str, int] = {
    "scheduled": 0,
    "running": 1,
    "cancelled": 2,
    "succeeded": 3,
    "failed": 3,
    "skipped": 3,
}

_NEVER: ColumnElement[datetime] = literal_column("'-infinity'::timestamptz")


@functools.cache
def merge_statement(
    table: Table,
    *,
    rank: str,
    key: tuple[str, ...],
    values: tuple[str, ...] = (),
    overwrite: tuple[str, ...] = (),
    outcome: tuple[str, ...] = (),
    on_insert: tuple[str, ...] = (),
    latest: tuple[str, ...] = (),
    latest_at: str | None = None,
    fence: str | None = None,
) -> Insert:
    """``INSERT .. ON CONFLICT DO UPDATE`` of one row of ``table`` with the rule above.

    Execute it with one parameter per column named, plus ``status`` and ``status_at``.
    ``rank`` names the SQL rank function (``run_rank`` or ``attempt_rank``).
    ``values`` follow the win/lose rule; ``overwrite`` columns are authoritative for this
    event whatever its rank (RunQueued's ``requested_at`` replaces the provisional one a
    step event wrote before it), unless the new value is null. ``on_insert`` columns are
    written only when the event creates the row (a provisional value for a NOT NULL column).
    ``latest`` columns, stamped by their ``latest_at`` column, keep the values of the latest
    event that carried them, independently of the status: the last progress report of an
    attempt, whatever order the reports were read in. ``outcome`` columns are set exactly
    (null included) by a winning event and kept by a losing one. ``fence`` names a
    timestamp column of the row: an event whose ``status_at`` is not after it never wins.
    """
    if latest and latest_at not in latest:
        raise ValueError(f"latest_at={latest_at!r} must be one of the latest columns")
    names = dict.fromkeys(
        (*key, "status", "status_at", *on_insert, *values, *overwrite, *outcome, *latest)
    )
    stmt = insert(table).values({n: bindparam(n, type_=table.c[n].type) for n in names})
    new, old = stmt.excluded, table.c
    rank_of = getattr(func.recorder, rank)
    wins: ColumnElement[bool] = func.recorder.supersedes(
        rank_of(new.status), new.status_at, rank_of(old.status), old.status_at
    )
    if fence is not None:
        wins = and_(wins, new.status_at > func.coalesce(old[fence], _NEVER))
    updates: dict[str, Any] = {
        "status": case((wins, new.status), else_=old.status),
        "status_at": case((wins, new.status_at), else_=old.status_at),
        "updated_at": func.now(),
    }
    for name in values:
        updates[name] = case(
            (wins, func.coalesce(new[name], old[name])),
            else_=func.coalesce(old[name], new[name]),
        )
    for name in overwrite:
        updates[name] = func.coalesce(new[name], old[name])
    for name in outcome:
        updates[name] = case((wins, new[name]), else_=old[name])
    if latest:
        stamp = str(latest_at)
        newer = new[stamp] >= func.coalesce(old[stamp], _NEVER)
        for name in latest:
            updates[name] = case((newer, new[name]), else_=old[name])
    return stmt.on_conflict_do_update(index_elements=list(table.primary_key.columns), set_=updates)
