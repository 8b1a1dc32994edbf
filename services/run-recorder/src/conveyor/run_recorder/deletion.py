"""Deleting an ended run's history, and keeping it deleted.

``DELETE /runs/{id}`` deletes in one transaction: a tombstone in ``deleted_runs`` and every
row about the run (the run, its attempts, errors, dead letters and raw events). It then
publishes ``RunDeleted`` on ``runs.control``: the scheduler drops the run's state, the
media runners delete its artifacts, and the recorder reads it too.

Why a tombstone rather than deleting rows alone: the recorder is a projection that events
reach out of order across topics, and that can be rebuilt by replaying the stream. A late
event about the run (a result read after the run's end) or a replay would recreate the
rows; with the tombstone, ``LOG`` drops every event about a deleted run. An event that was
being projected while the API deleted can still slip in, so the projection of RunDeleted
deletes once more: the recorder projects its events one after another (a batch in its
order, see ``projection``), so nothing about the run is in flight then. A replay of the
stream converges on the same state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from uuid import UUID

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.run_recorder.tables import (
    dead_letters,
    deleted_runs,
    errors,
    event_log,
    runs,
    step_attempts,
)

__all__ = ["TERMINAL_STATUSES", "Deletion", "delete_run", "deleted", "purge", "tombstone"]

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "skipped"})


@dataclass(frozen=True)
class Deletion:
    outcome: Literal["deleted", "already_deleted", "not_found", "not_ended"]
    status: str | None = None
    deleted_at: datetime | None = None
    deleted_by: str | None = None


async def delete_run(
    conn: AsyncConnection, run_id: UUID, *, now: datetime, deleted_by: str | None = None
) -> Deletion:
    """Delete the run if it has ended, in the caller's transaction."""
    # The run's row locked first: two deletions of one run take turns, and the second
    # finds the tombstone the first left.
    status = await conn.scalar(select(runs.c.status).where(runs.c.id == run_id).with_for_update())
    gone = await deleted(conn, run_id)
    if gone is not None:
        await purge(conn, run_id)  # what an event projected meanwhile may have recreated
        return Deletion("already_deleted", deleted_at=gone[0], deleted_by=gone[1])
    if status is None:
        return Deletion("not_found")
    if status not in TERMINAL_STATUSES:
        return Deletion("not_ended", status=status)
    await tombstone(conn, run_id, deleted_at=now, deleted_by=deleted_by)
    await purge(conn, run_id)
    return Deletion("deleted", status=status, deleted_at=now, deleted_by=deleted_by)


async def deleted(conn: AsyncConnection, run_id: UUID) -> tuple[datetime, str | None] | None:
    """When and by whom the run was deleted; None if it was not."""
    row = (
        await conn.execute(
            select(deleted_runs.c.deleted_at, deleted_runs.c.deleted_by).where(
                deleted_runs.c.run_id == run_id
            )
        )
    ).first()
    return None if row is None else (row.deleted_at, row.deleted_by)


async def tombstone(
    conn: AsyncConnection, run_id: UUID, *, deleted_at: datetime, deleted_by: str | None
) -> None:
    await conn.execute(
        insert(deleted_runs)
        .values(run_id=run_id, deleted_at=deleted_at, deleted_by=deleted_by)
        .on_conflict_do_nothing(index_elements=[deleted_runs.c.run_id])
    )


async def purge(conn: AsyncConnection, run_id: UUID) -> None:
    """Delete every row about the run (deleting nothing is fine: this is repeated)."""
    letters = select(event_log.c.event_id).where(
        event_log.c.run_id == run_id, event_log.c.type == "DeadLetter"
    )
    await conn.execute(delete(dead_letters).where(dead_letters.c.event_id.in_(letters)))
    await conn.execute(delete(errors).where(errors.c.run_id == run_id))
    await conn.execute(delete(step_attempts).where(step_attempts.c.run_id == run_id))
    await conn.execute(delete(event_log).where(event_log.c.run_id == run_id))
    await conn.execute(delete(runs).where(runs.c.id == run_id))
