"""Reads behind the HTTP API: plain async functions over a connection, returning the API's
shapes. Listing runs is a keyset scan on (requested_at, id), so a page costs the same at
the millionth run as at the first, and a run recorded while a client pages never makes it
see a row twice.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import (
    Row,
    RowMapping,
    case,
    exists,
    extract,
    false,
    func,
    literal,
    null,
    select,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.run_recorder.schemas import (
    DeadLetterEntry,
    ErrorEntry,
    EventEntry,
    PipelineEntry,
    PipelineHealth,
    RunDetail,
    RunPage,
    RunSummary,
    StepAttempt,
)
from conveyor.run_recorder.tables import (
    NO_ITEM,
    dead_letters,
    errors,
    event_log,
    pipelines,
    runs,
    schedules,
    step_attempts,
)

__all__ = [
    "InvalidCursor",
    "decode_cursor",
    "encode_cursor",
    "get_run",
    "list_dead_letters",
    "list_errors",
    "list_pipelines",
    "list_runs",
    "pipeline_health",
    "run_events",
]


class InvalidCursor(ValueError):
    """A ``cursor`` that this API did not hand out."""


def encode_cursor(requested_at: datetime, run_id: UUID) -> str:
    raw = f"{requested_at.isoformat()}|{run_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        when, _, run_id = raw.partition("|")
        moment = datetime.fromisoformat(when)
        if moment.tzinfo is None:
            raise ValueError("naive timestamp")
        return moment, UUID(run_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor(f"invalid cursor {cursor!r}: pass next_cursor as given") from None


def _ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds() * 1000


_SUMMARY_COLUMNS = (
    runs.c.id,
    runs.c.pipeline,
    runs.c.version,
    runs.c.status,
    runs.c.requested_at,
    runs.c.started_at,
    runs.c.finished_at,
    runs.c.tokens,
    runs.c.cost,
    runs.c.error,
    runs.c.retries,
)


def _summary(row: RowMapping) -> RunSummary:
    return RunSummary(**row, duration_ms=_ms(row["started_at"], row["finished_at"]))


async def list_runs(
    conn: AsyncConnection,
    *,
    pipeline: str | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> RunPage:
    """Newest first. Raises ``InvalidCursor``."""
    query = select(*_SUMMARY_COLUMNS)
    if pipeline is not None:
        query = query.where(runs.c.pipeline == pipeline)
    if status is not None:
        query = query.where(runs.c.status == status)
    if cursor:
        after, after_id = decode_cursor(cursor)
        query = query.where(tuple_(runs.c.requested_at, runs.c.id) < tuple_(after, after_id))
    query = query.order_by(runs.c.requested_at.desc(), runs.c.id.desc()).limit(limit + 1)
    rows = (await conn.execute(query)).mappings().all()
    items = [_summary(row) for row in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor(last["requested_at"], last["id"])
    return RunPage(items=items, next_cursor=next_cursor)


def _attempt(row: RowMapping) -> StepAttempt:
    data = dict(row)
    if data["item_index"] == NO_ITEM:
        data["item_index"] = None
    duration = _ms(data["started_at"], data["finished_at"])
    if duration is None and data["metrics"]:
        duration = data["metrics"].get("duration_ms") or None  # 0 means not measured
    return StepAttempt(**data, duration_ms=duration)


async def get_run(conn: AsyncConnection, run_id: UUID) -> RunDetail | None:
    row = (await conn.execute(select(runs).where(runs.c.id == run_id))).mappings().first()
    if row is None:
        return None
    a = step_attempts.c
    first_seen = func.coalesce(a.scheduled_at, a.started_at, a.finished_at)
    attempts = await conn.execute(
        select(
            a.step_id,
            a.attempt,
            a.item_index,
            a.status,
            a.kind,
            a.input,
            a.output,
            a.error,
            a.reason,
            a.worker,
            a.scheduled_at,
            a.started_at,
            a.finished_at,
            a.metrics,
            a.progress,
            a.progress_message,
        )
        .where(a.run_id == run_id)
        .order_by(first_seen.asc().nulls_last(), a.step_id, a.attempt, a.item_index)
    )
    data = {k: v for k, v in row.items() if k in RunDetail.model_fields}
    e = event_log.c
    trace_id = await conn.scalar(
        select(e.trace_id)
        .where(e.run_id == run_id, e.trace_id.is_not(None))
        .order_by(e.occurred_at, e.seq)
        .limit(1)
    )
    return RunDetail(
        **data,
        trace_id=trace_id,
        duration_ms=_ms(row["started_at"], row["finished_at"]),
        steps=[_attempt(r) for r in attempts.mappings()],
    )


async def run_events(conn: AsyncConnection, run_id: UUID) -> list[EventEntry] | None:
    """The run's raw events in the order they happened; None when the run is unknown."""
    e = event_log.c
    rows = (
        (
            await conn.execute(
                select(e.event_id, e.type, e.topic, e.occurred_at, e.trace_id, e.payload)
                .where(e.run_id == run_id)
                .order_by(e.occurred_at, e.seq)
            )
        )
        .mappings()
        .all()
    )
    if not rows:
        known = await conn.scalar(select(exists().where(runs.c.id == run_id)))
        return [] if known else None
    return [EventEntry(**row) for row in rows]


async def list_errors(
    conn: AsyncConnection,
    *,
    pipeline: str | None = None,
    run_id: UUID | None = None,
    scope: str | None = None,
    limit: int = 50,
) -> list[ErrorEntry]:
    query = select(errors).order_by(errors.c.occurred_at.desc(), errors.c.id.desc()).limit(limit)
    if pipeline is not None:
        query = query.where(errors.c.pipeline == pipeline)
    if run_id is not None:
        query = query.where(errors.c.run_id == run_id)
    if scope is not None:
        query = query.where(errors.c.scope == scope)
    rows = (await conn.execute(query)).mappings()
    return [ErrorEntry(**row) for row in rows]


def _text(b64: str | None) -> str | None:
    if b64 is None:
        return None
    try:
        return base64.b64decode(b64).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _dead_letter(row: Row[Any]) -> DeadLetterEntry:
    data = dict(row._mapping)
    key_b64 = data.pop("key_b64")
    return DeadLetterEntry(**data, key=_text(key_b64), value=_text(data["value_b64"]))


async def list_dead_letters(conn: AsyncConnection, *, limit: int = 50) -> list[DeadLetterEntry]:
    d = dead_letters.c
    rows = await conn.execute(
        select(dead_letters).order_by(d.occurred_at.desc(), d.event_id.desc()).limit(limit)
    )
    return [_dead_letter(row) for row in rows]


async def list_pipelines(conn: AsyncConnection) -> list[PipelineEntry]:
    p, s = pipelines.c, schedules.c
    scheduled = func.jsonb_typeof(p.spec["schedule"]) == "object"
    paused = case((scheduled, func.coalesce(s.paused, false())), else_=null())
    rows = await conn.execute(
        select(p.name, p.version, p.digest, p.registered_at, paused.label("paused"))
        .select_from(pipelines.outerjoin(schedules, s.name == p.name))
        .order_by(p.name, p.version)
    )
    return [PipelineEntry(**row) for row in rows.mappings()]


async def pipeline_health(
    conn: AsyncConnection, name: str, *, window: int = 100
) -> PipelineHealth | None:
    """Figures over the pipeline's newest ``window`` runs; None when nothing is known of it."""
    recent = (
        select(runs)
        .where(runs.c.pipeline == name)
        .order_by(runs.c.requested_at.desc(), runs.c.id.desc())
        .limit(window)
        .subquery()
    )
    r = recent.c
    counted = await conn.execute(select(r.status, func.count()).group_by(r.status))
    by_status: dict[str, int] = {status: count for status, count in counted}
    if not by_status:
        registered = await conn.scalar(select(exists().where(pipelines.c.name == name)))
        if not registered:
            return None
    # NULL for runs not finished (or never started): ordered-set aggregates skip NULLs.
    duration = extract("epoch", r.finished_at - r.started_at) * 1000
    figures = (
        (
            await conn.execute(
                select(
                    func.percentile_cont(0.5).within_group(duration).label("p50"),
                    func.percentile_cont(0.95).within_group(duration).label("p95"),
                    func.coalesce(func.sum(r.tokens), 0).label("tokens"),
                    func.coalesce(func.sum(r.cost), literal(0.0)).label("cost"),
                    func.max(r.requested_at).label("last_run_at"),
                    func.max(r.finished_at).filter(r.status == "failed").label("last_failure_at"),
                )
            )
        )
        .mappings()
        .one()
    )
    succeeded = by_status.get("succeeded", 0)
    finished = sum(by_status.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
    return PipelineHealth(
        pipeline=name,
        window=window,
        runs=sum(by_status.values()),
        by_status=by_status,
        success_rate=succeeded / finished if finished else None,
        p50_duration_ms=figures["p50"],
        p95_duration_ms=figures["p95"],
        tokens=figures["tokens"],
        cost=figures["cost"],
        last_run_at=figures["last_run_at"],
        last_failure_at=figures["last_failure_at"],
    )
