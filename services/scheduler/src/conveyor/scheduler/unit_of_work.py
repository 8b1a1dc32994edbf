"""One database transaction of the scheduler: state changes, inbox entry and the events to
publish (outbox) commit together or not at all.

Rolls back unless ``commit()`` is called; after a commit the outbox relay is woken.

Inside ``shared_transaction(engine, relay)`` every unit of work is a savepoint of one
shared transaction instead: a use case keeps its all-or-nothing meaning (no commit,
nothing of it stays), while a whole batch of consumed events costs one commit, one WAL
flush and one relay wake-up. That is where the scheduler's time went with a transaction per event.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextvars import ContextVar
from datetime import datetime
from types import TracebackType
from typing import Any
from uuid import UUID

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction

from conveyor.contracts import Event, PipelineSpec, spec_for_run
from conveyor.runtime import OutboxMessage, OutboxRelay, stage
from conveyor.scheduler import tables
from conveyor.scheduler.domain import RunState, StepState

__all__ = ["SpecCache", "UnitOfWork", "shared_transaction"]

_SHARED: ContextVar[AsyncConnection | None] = ContextVar("conveyor_scheduler_batch", default=None)


@contextlib.asynccontextmanager
async def shared_transaction(
    engine: AsyncEngine, relay: OutboxRelay | None
) -> AsyncIterator[AsyncConnection]:
    """One transaction for every unit of work opened inside (each one a savepoint).

    Commits when the block ends normally, rolls everything back when it raises; the relay
    is woken once, after the commit."""
    if _SHARED.get() is not None:
        raise RuntimeError("scheduler batches do not nest")
    async with engine.connect() as conn:
        tx = await conn.begin()
        token = _SHARED.set(conn)
        try:
            yield conn
        except BaseException:
            _SHARED.reset(token)
            await tx.rollback()
            raise
        _SHARED.reset(token)
        await tx.commit()
    if relay is not None:
        relay.wake()


class SpecCache:
    """Parsed pipeline versions, as runs execute them (``spec_for_run``: with the synthetic
    ``auto`` step of a ``resolve: run_start`` pipeline). A version is immutable, so it is
    parsed once per process."""

    def __init__(self) -> None:
        self._specs: dict[tuple[str, int], PipelineSpec] = {}

    def get(
        self, name: str, version: int, raw: dict[str, Any] | None = None
    ) -> PipelineSpec | None:
        spec = self._specs.get((name, version))
        if spec is None and raw is not None:
            spec = spec_for_run(PipelineSpec.model_validate(raw))
            self._specs[(name, version)] = spec
        return spec


class UnitOfWork:
    def __init__(self, *, engine: AsyncEngine, relay: OutboxRelay | None, specs: SpecCache) -> None:
        self._engine = engine
        self._relay = relay
        self._specs = specs
        self._messages: list[OutboxMessage] = []
        self._conn: AsyncConnection | None = None
        self._tx: AsyncTransaction | None = None
        self._shared = False

    async def __aenter__(self) -> UnitOfWork:
        shared = _SHARED.get()
        if shared is not None:
            self._shared = True
            self._conn = shared
            self._tx = await shared.begin_nested()
            return self
        self._conn = await self._engine.connect()
        self._tx = await self._conn.begin()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._conn is not None
        try:
            if self._tx is not None and self._tx.is_active:
                await self._tx.rollback()
        finally:
            if not self._shared:
                await self._conn.close()

    @property
    def conn(self) -> AsyncConnection:
        assert self._conn is not None, "use the unit of work as an async context manager"
        return self._conn

    def emit(self, topic: str, event: Event, *, key: str | None) -> None:
        self._messages.append(OutboxMessage(topic=topic, event=event, key=key))

    async def commit(self) -> None:
        assert self._tx is not None
        await stage(self.conn, tables.outbox, self._messages)
        await self._tx.commit()  # in a batch: releases the savepoint
        self._messages = []
        if self._relay is not None and not self._shared:
            self._relay.wake()

    # --- inbox ------------------------------------------------------------------------

    async def first_delivery(self, event_id: UUID) -> bool:
        """Record ``event_id``; False when it was handled before (a redelivery)."""
        inserted = await self.conn.execute(
            pg_insert(tables.inbox)
            .values(event_id=event_id)
            .on_conflict_do_nothing()
            .returning(tables.inbox.c.event_id)
        )
        return inserted.first() is not None

    # --- pipelines --------------------------------------------------------------------

    async def lock_pipeline_name(self, name: str) -> None:
        await self.conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": f"pipeline:{name}"}
        )

    async def latest_pipeline(
        self, name: str, version: int | None = None
    ) -> tuple[int, str, PipelineSpec] | None:
        p = tables.pipelines
        query = select(p.c.version, p.c.digest).where(p.c.name == name)
        query = query.where(p.c.version == version) if version else query
        row = (await self.conn.execute(query.order_by(p.c.version.desc()).limit(1))).first()
        if row is None:
            return None
        spec = self._specs.get(name, row.version)
        if spec is None:
            raw = await self.conn.scalar(
                select(p.c.spec).where(p.c.name == name, p.c.version == row.version)
            )
            spec = self._specs.get(name, row.version, raw)
        assert spec is not None
        return row.version, row.digest, spec

    async def add_pipeline(
        self, spec: PipelineSpec, *, version: int, digest: str, source_file: str | None
    ) -> datetime:
        registered_at: datetime = await self.conn.scalar(
            insert(tables.pipelines)
            .values(
                name=spec.name,
                version=version,
                digest=digest,
                spec=spec.canonical(),
                source_file=source_file,
            )
            .returning(tables.pipelines.c.registered_at)
        )
        return registered_at

    async def pipeline_spec(self, name: str, version: int) -> PipelineSpec | None:
        spec = self._specs.get(name, version)
        if spec is not None:
            return spec
        p = tables.pipelines
        raw = await self.conn.scalar(
            select(p.c.spec).where(p.c.name == name, p.c.version == version)
        )
        return self._specs.get(name, version, raw) if raw is not None else None

    # --- runs -------------------------------------------------------------------------

    async def run_exists(self, run_id: UUID) -> bool:
        found = await self.conn.scalar(select(func.count()).where(tables.runs.c.id == run_id))
        return bool(found)

    async def insert_run(
        self,
        state: RunState,
        *,
        requested_at: datetime,
        idempotency_key: str | None,
        requested_event_id: UUID,
        started_at: datetime | None,
        finished_at: datetime | None,
    ) -> bool:
        """Insert a new run; False when the id or the idempotency key is taken already."""
        inserted = await self.conn.execute(
            pg_insert(tables.runs)
            .values(
                id=UUID(state.run_id),
                pipeline=state.pipeline,
                version=state.version or None,
                status=state.status,
                input=state.input,
                output=state.output,
                error=state.error,
                steps=_steps_json(state),
                idempotency_key=idempotency_key,
                requested_event_id=requested_event_id,
                requested_at=requested_at,
                started_at=started_at,
                finished_at=finished_at,
            )
            .on_conflict_do_nothing()
            .returning(tables.runs.c.id)
        )
        return inserted.first() is not None

    async def load_run(self, run_id: UUID) -> RunState | None:
        """The run, locked until the transaction ends."""
        r = tables.runs
        row = (await self.conn.execute(select(r).where(r.c.id == run_id).with_for_update())).first()
        if row is None:
            return None
        return RunState(
            run_id=str(row.id),
            pipeline=row.pipeline,
            version=row.version or 0,
            input=row.input,
            status=row.status,
            steps={sid: StepState.from_json(st) for sid, st in row.steps.items()},
            output=row.output,
            error=row.error,
            overrides=row.overrides,
            cost=row.cost,
            budget_grants=row.budget_grants,
        )

    async def save_run(
        self,
        state: RunState,
        *,
        finished_at: datetime | None,
        started_at: datetime | None = None,
    ) -> None:
        r = tables.runs
        values: dict[str, Any] = {
            "status": state.status,
            "steps": _steps_json(state),
            "output": state.output,
            "error": state.error,
            "input": state.input,
            "overrides": state.overrides,
            "cost": state.cost,
            "budget_grants": state.budget_grants,
            "updated_at": func.now(),
        }
        if finished_at is not None:
            values["finished_at"] = finished_at
        if started_at is not None:
            values["started_at"] = started_at
        await self.conn.execute(update(r).where(r.c.id == UUID(state.run_id)).values(**values))

    # --- timers -----------------------------------------------------------------------

    async def add_timer(
        self,
        *,
        kind: str,
        run_id: UUID,
        step_id: str,
        attempt: int,
        item_index: int | None,
        due_at: datetime,
    ) -> None:
        await self.conn.execute(
            insert(tables.timers).values(
                kind=kind,
                run_id=run_id,
                step_id=step_id,
                attempt=attempt,
                item_index=item_index,
                due_at=due_at,
            )
        )

    async def clear_deadline(
        self, *, run_id: UUID, step_id: str, attempt: int, item_index: int | None
    ) -> None:
        """The attempt answered: its deadline has nothing left to watch."""
        t = tables.timers
        item = t.c.item_index.is_(None) if item_index is None else t.c.item_index == item_index
        await self.conn.execute(
            delete(t).where(
                t.c.kind == "deadline",
                t.c.run_id == run_id,
                t.c.step_id == step_id,
                t.c.attempt == attempt,
                item,
            )
        )

    # --- idempotency keys and the run queue -------------------------------------------

    async def claim_idempotency_key(
        self, *, pipeline: str, key: str, run_id: UUID, now: datetime, expires_at: datetime
    ) -> UUID | None:
        """Take ``key`` for ``run_id``; the run already holding it when it is still live.

        Insert first: a concurrent claim of the same key waits on the primary key until the
        first commits, then finds it taken, so two requests never both get the key.
        """
        k = tables.idempotency_keys
        taken = await self.conn.execute(
            pg_insert(k)
            .values(pipeline=pipeline, key=key, run_id=run_id, expires_at=expires_at)
            .on_conflict_do_nothing()
            .returning(k.c.run_id)
        )
        if taken.first() is not None:
            return None
        held = (
            await self.conn.execute(
                select(k.c.run_id, k.c.expires_at)
                .where(k.c.pipeline == pipeline, k.c.key == key)
                .with_for_update()
            )
        ).one()
        if held.expires_at > now:
            return held.run_id  # type: ignore[no-any-return]
        await self.conn.execute(
            update(k)
            .where(k.c.pipeline == pipeline, k.c.key == key)
            .values(run_id=run_id, expires_at=expires_at)
        )
        return None

    async def live_idempotency_key(self, *, pipeline: str, key: str, now: datetime) -> UUID | None:
        k = tables.idempotency_keys
        run_id = await self.conn.scalar(
            select(k.c.run_id).where(k.c.pipeline == pipeline, k.c.key == key, k.c.expires_at > now)
        )
        return run_id

    async def active_runs(self, pipeline: str) -> int:
        r = tables.runs
        count = await self.conn.scalar(
            select(func.count()).where(
                r.c.pipeline == pipeline, r.c.status.in_(("running", "parked"))
            )
        )
        return int(count or 0)

    async def oldest_queued(self, pipeline: str) -> UUID | None:
        r = tables.runs
        run_id = await self.conn.scalar(
            select(r.c.id)
            .where(r.c.pipeline == pipeline, r.c.status == "queued")
            .order_by(r.c.requested_at, r.c.id)
            .limit(1)
        )
        return run_id


def _steps_json(state: RunState) -> dict[str, Any]:
    return {sid: st.to_json() for sid, st in state.steps.items()}
