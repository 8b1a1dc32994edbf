"""One database transaction of the scheduler: state changes, inbox entry and the events to
publish (outbox) commit together or not at all.

Rolls back unless ``commit()`` is called; after a commit the outbox relay publishes what
the unit staged.

Writes are deferred: saving a run, adding or clearing a timer, marking an event seen and
staging events only record what to write, and the writes go to the database together,
each kind as one statement, at commit or just before a statement that must see them
(``connection()``). Runs are read once per transaction, locked ``FOR UPDATE``, and kept
in memory for the rest of it.

Inside ``shared_transaction(engine, relay)`` every unit of work is part of one shared
transaction: a whole batch of consumed events costs one commit, one WAL flush, one write
per kind of row and one relay hand-over. A unit keeps its all-or-nothing meaning: what it
deferred is dropped if it does not commit, and a unit that has to run statements of its
own (``connection()``) runs them inside a savepoint, opened only then. ``prepare(events)``
locks the runs a batch names and reads which of its events were seen before, in two
queries for the whole batch. Before this, a step result cost eight statements.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction

from conveyor.contracts import Event, PipelineSpec, spec_for_run
from conveyor.runtime import OutboxMessage, OutboxRelay, Staged, outbox_rows
from conveyor.scheduler import tables
from conveyor.scheduler.domain import RunState, StepState

__all__ = ["SpecCache", "UnitOfWork", "prepare_batch", "shared_transaction"]

_RUN_STATE_COLUMNS = (
    "pipeline",
    "version",
    "input",
    "status",
    "steps",
    "output",
    "error",
    "overrides",
    "cost",
    "budget_grants",
)


@dataclass
class _Writes:
    """Deferred writes, in the order they must reach the database."""

    inbox: list[UUID] = field(default_factory=list)
    new_runs: list[dict[str, Any]] = field(default_factory=list)
    """rows of runs to insert (a run id known not to exist: a conflict fails the batch)."""
    runs: dict[UUID, dict[str, Any]] = field(default_factory=dict)
    """run id → column values of its UPDATE (later saves overwrite earlier ones)."""
    cleared: list[dict[str, Any]] = field(default_factory=list)
    """deadline timers to delete (run_id, step_id, attempt, item_index)."""
    timers: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.inbox or self.new_runs or self.runs or self.cleared or self.timers or self.outbox
        )

    def clear_deadline(self, key: dict[str, Any]) -> None:
        self.timers = [t for t in self.timers if not _is_deadline(t, key)]
        self.cleared.append(key)

    def merge(self, later: _Writes) -> None:
        self.inbox.extend(later.inbox)
        self.new_runs.extend(later.new_runs)
        for run_id, values in later.runs.items():
            self.runs[run_id] = self.runs.get(run_id, {}) | values
        for key in later.cleared:
            self.timers = [t for t in self.timers if not _is_deadline(t, key)]
        self.cleared.extend(later.cleared)
        self.timers.extend(later.timers)
        self.outbox.extend(later.outbox)


def _is_deadline(timer: dict[str, Any], key: dict[str, Any]) -> bool:
    return timer["kind"] == "deadline" and all(timer[k] == v for k, v in key.items())


_r = tables.runs
_t = tables.timers
# The hot writes and reads are plain SQL on the driver connection, sent in one pipeline
# (psycopg pipeline mode): a batch's writes cost one round trip, not one per statement.
_RUNS = _r.fullname
_INSERT_SEEN = f"INSERT INTO {tables.inbox.fullname} (event_id) VALUES (%s) ON CONFLICT DO NOTHING"
_NEW_RUN_COLUMNS = (
    "id",
    "pipeline",
    "version",
    "status",
    "input",
    "output",
    "error",
    "steps",
    "idempotency_key",
    "requested_event_id",
    "requested_at",
    "started_at",
    "finished_at",
)
_INSERT_RUN = (
    f"INSERT INTO {_RUNS} ({', '.join(_NEW_RUN_COLUMNS)}) "
    f"VALUES ({', '.join(['%s'] * len(_NEW_RUN_COLUMNS))})"
)
_UPDATE_RUN = (
    f"UPDATE {_RUNS} SET status = %s, steps = %s, output = %s, error = %s, input = %s, "
    "overrides = %s, cost = %s, budget_grants = %s, updated_at = now(), "
    "started_at = coalesce(%s, started_at), finished_at = coalesce(%s, finished_at) "
    "WHERE id = %s"
)
_CLEAR_DEADLINE = (
    f"DELETE FROM {_t.fullname} WHERE kind = 'deadline' AND run_id = %s AND step_id = %s "
    "AND attempt = %s AND item_index IS NOT DISTINCT FROM %s::integer"
)
_INSERT_TIMER = (
    f"INSERT INTO {_t.fullname} (kind, run_id, step_id, attempt, item_index, due_at) "
    "VALUES (%s, %s, %s, %s, %s, %s)"
)
_INSERT_OUTBOX = (
    f"INSERT INTO {tables.outbox.fullname} (topic, key, payload, headers, created_at) "
    "VALUES (%s, %s, %s, %s, clock_timestamp()) RETURNING id"
)
_LOCK_RUNS = (
    f"SELECT id, {', '.join(_RUN_STATE_COLUMNS)} FROM {_RUNS} "
    "WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
)
_SEEN = f"SELECT event_id FROM {tables.inbox.fullname} WHERE event_id = ANY(%s)"


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, say
        return json.dumps(value)


def _json(value: Any) -> Jsonb:
    """A JSONB parameter (``None`` is JSON null, as SQLAlchemy stores it)."""
    return Jsonb(value, dumps=_dumps)


async def _driver(conn: AsyncConnection) -> psycopg.AsyncConnection[Any]:
    raw = await conn.get_raw_connection()
    driver: psycopg.AsyncConnection[Any] = raw.driver_connection  # type: ignore[assignment]
    return driver


async def _write(conn: AsyncConnection, writes: _Writes, *, commit: bool = False) -> list[Staged]:
    """Send ``writes`` in one pipeline, a statement per kind; the outbox rows as staged.

    ``commit``: end the transaction with a ``COMMIT`` in the same pipeline, a round trip
    fewer than committing after it (the caller's own commit then finds nothing to do)."""
    driver = await _driver(conn)
    ids: list[int] = []
    async with driver.pipeline(), driver.cursor() as cur:
        if writes.inbox:
            await cur.executemany(_INSERT_SEEN, [(e,) for e in writes.inbox])
        if writes.new_runs:
            await cur.executemany(
                _INSERT_RUN,
                [
                    tuple(_json(row[c]) if c in _JSON_COLUMNS else row[c] for c in _NEW_RUN_COLUMNS)
                    for row in writes.new_runs
                ],
            )
        if writes.runs:
            await cur.executemany(
                _UPDATE_RUN,
                [
                    (
                        v["status"],
                        _json(v["steps"]),
                        _json(v["output"]),
                        _json(v["error"]),
                        _json(v["input"]),
                        _json(v["overrides"]),
                        v["cost"],
                        v["budget_grants"],
                        v.get("started_at"),
                        v.get("finished_at"),
                        run_id,
                    )
                    for run_id, v in writes.runs.items()
                ],
            )
        if writes.cleared:
            await cur.executemany(
                _CLEAR_DEADLINE,
                [
                    (k["run_id"], k["step_id"], k["attempt"], k["item_index"])
                    for k in writes.cleared
                ],
            )
        if writes.timers:
            await cur.executemany(
                _INSERT_TIMER,
                [
                    (
                        t["kind"],
                        t["run_id"],
                        t["step_id"],
                        t["attempt"],
                        t["item_index"],
                        t["due_at"],
                    )
                    for t in writes.timers
                ],
            )
        if writes.outbox:
            cur = driver.cursor()  # its own: the results read are this statement's
            await cur.executemany(
                _INSERT_OUTBOX,
                [(o["topic"], o["key"], o["payload"], _json(o["headers"])) for o in writes.outbox],
                returning=True,
            )
        if commit:
            await driver.execute("COMMIT")  # queued behind the writes; fails them all or none
        if writes.outbox:
            while True:
                row = await cur.fetchone()
                assert row is not None
                ids.append(row[0])
                if not cur.nextset():
                    break
    return [Staged(id=i, **row) for i, row in zip(ids, writes.outbox, strict=True)]


class _Batch:
    """What a transaction knows beyond the database: runs it has locked (as their latest
    committed values), events known seen, deferred writes of units that committed, and
    outbox rows written for the relay."""

    def __init__(self, conn: AsyncConnection | None = None, engine: AsyncEngine | None = None):
        self._conn = conn
        self._engine = engine
        self._tx: AsyncTransaction | None = None
        self.runs: dict[UUID, dict[str, Any]] = {}
        self.seen: set[UUID] = set()
        self.checked: set[UUID] = set()
        """Event ids whose inbox entry was looked up (``prepare_batch``)."""
        self.absent: set[UUID] = set()
        """Run ids looked up and not found (``prepare_batch``); see ``runs`` first."""
        self.latest: dict[str, tuple[int, str] | None] = {}
        """Newest version and digest of pipelines looked up (``prepare_batch``)."""
        self.writes = _Writes()
        self.staged: list[Staged] = []

    async def connect(self) -> AsyncConnection:
        """The transaction's connection; a shared batch begins it on first use, so a batch
        of events the scheduler ignores (``StepStarted``) costs no database work."""
        if self._conn is None:
            assert self._engine is not None
            self._conn = await self._engine.connect()
            self._tx = await self._conn.begin()
        return self._conn

    @property
    def started(self) -> bool:
        return self._conn is not None

    async def write(self, *, commit: bool = False) -> None:
        """Send the deferred writes; ``commit`` ends the transaction in the same round trip
        (``end`` then only returns the connection)."""
        if self.writes:
            writes, self.writes = self.writes, _Writes()
            self.staged.extend(await _write(await self.connect(), writes, commit=commit))

    async def end(self, *, commit: bool) -> None:
        """Commit or roll back a shared batch's transaction, if it began."""
        if self._conn is None:
            return
        try:
            if self._tx is not None:
                await (self._tx.commit() if commit else self._tx.rollback())
        finally:
            await self._conn.close()


_SHARED: ContextVar[_Batch | None] = ContextVar("conveyor_scheduler_batch", default=None)


@contextlib.asynccontextmanager
async def shared_transaction(engine: AsyncEngine, relay: OutboxRelay | None) -> AsyncIterator[None]:
    """One transaction for every unit of work opened inside, begun when the first needs it.

    Commits when the block ends normally, rolls everything back when it raises; the relay
    gets the staged events after the commit."""
    if _SHARED.get() is not None:
        raise RuntimeError("scheduler batches do not nest")
    batch = _Batch(engine=engine)
    token = _SHARED.set(batch)
    try:
        yield None
        await batch.write(commit=True)
    except BaseException:
        _SHARED.reset(token)
        await batch.end(commit=False)
        raise
    _SHARED.reset(token)
    await batch.end(commit=True)
    if relay is not None:
        relay.submit(batch.staged)


async def prepare_batch(
    run_ids: Sequence[UUID], event_ids: Sequence[UUID], pipelines: Sequence[str] = ()
) -> None:
    """In the shared transaction: lock and read the runs ``run_ids`` (in id order, so two
    schedulers never deadlock), look up which of ``event_ids`` were seen before and the
    newest versions of ``pipelines``. Locking first makes the inbox lookup exact: a peer
    that handled one of these events holds its run until it commits, inbox entry included."""
    batch = _SHARED.get()
    if batch is None:
        return
    wanted = sorted({r for r in run_ids if r not in batch.runs and r not in batch.absent})
    unchecked = [e for e in event_ids if e not in batch.checked]
    if wanted or unchecked:
        driver = await _driver(await batch.connect())
        async with (
            driver.pipeline(),
            driver.cursor(row_factory=dict_row) as runs_cur,
            driver.cursor() as seen_cur,
        ):
            if wanted:
                await runs_cur.execute(_LOCK_RUNS, (wanted,))
            if unchecked:
                await seen_cur.execute(_SEEN, (unchecked,))
            for row in await runs_cur.fetchall() if wanted else ():
                batch.runs[row.pop("id")] = row
            batch.seen.update(r[0] for r in (await seen_cur.fetchall() if unchecked else ()))
        batch.absent.update(r for r in wanted if r not in batch.runs)
        batch.checked.update(unchecked)
    names = sorted({n for n in pipelines if n not in batch.latest})
    if names:
        p = tables.pipelines
        newest = (
            select(p.c.name, func.max(p.c.version).label("version"))
            .where(p.c.name.in_(names))
            .group_by(p.c.name)
            .subquery()
        )
        found = await (await batch.connect()).execute(
            select(p.c.name, p.c.version, p.c.digest).join(
                newest, (p.c.name == newest.c.name) & (p.c.version == newest.c.version)
            )
        )
        batch.latest.update(dict.fromkeys(names))
        batch.latest.update({row.name: (row.version, row.digest) for row in found})


_JSON_COLUMNS = ("input", "steps", "output", "error", "overrides")


def _snapshot(row: Any) -> dict[str, Any]:
    return {column: getattr(row, column) for column in _RUN_STATE_COLUMNS}


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
        self._writes = _Writes()
        self._runs: dict[UUID, dict[str, Any]] = {}
        """Runs this unit saved: their values as of its last save."""
        self._seen: set[UUID] = set()
        self._loaded: set[UUID] = set()
        """Runs this unit read from the database inside its savepoint."""
        self._conn: AsyncConnection | None = None
        self._tx: AsyncTransaction | None = None
        self._batch: _Batch | None = None
        self._shared = False
        self._done = False

    async def __aenter__(self) -> UnitOfWork:
        shared = _SHARED.get()
        if shared is not None:
            self._shared = True
            self._batch = shared
            self._conn = await shared.connect()
            return self
        self._conn = await self._engine.connect()
        self._tx = await self._conn.begin()
        self._batch = _Batch(self._conn)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._conn is not None
        assert self._batch is not None
        try:
            if not self._done and self._tx is not None and self._tx.is_active:
                await self._tx.rollback()
            if not self._done and self._shared:
                for run_id in self._loaded:  # its lock may have gone with the savepoint
                    self._batch.runs.pop(run_id, None)
        finally:
            if not self._shared:
                await self._conn.close()

    @property
    def conn(self) -> AsyncConnection:
        """The connection, for statements that need not see this unit's deferred writes
        (outside a batch only); ``connection()`` is the general way."""
        assert self._conn is not None, "use the unit of work as an async context manager"
        assert not self._shared, "inside a batch, use await uow.connection()"
        return self._conn

    async def connection(self) -> AsyncConnection:
        """The connection, with every write so far sent, for statements of the caller's own.
        Inside a batch this opens the unit's savepoint (once)."""
        assert self._conn is not None
        assert self._batch is not None
        if self._shared and self._tx is None:
            await self._batch.write()  # what committed units deferred stays, whatever we do
            self._tx = await self._conn.begin_nested()
        if self._writes:
            writes, self._writes = self._writes, _Writes()
            self._batch.staged.extend(await _write(self._conn, writes))
        return self._conn

    def emit(self, topic: str, event: Event, *, key: str | None) -> None:
        self.send(OutboxMessage(topic=topic, event=event, key=key))

    def send(self, message: OutboxMessage) -> None:
        """Stage ``message`` as it is (``emit`` builds one)."""
        self._messages.append(message)

    async def commit(self) -> None:
        assert self._conn is not None
        assert self._batch is not None
        batch = self._batch
        self._writes.outbox.extend(outbox_rows(self._messages))
        self._messages = []
        if self._shared:
            batch.writes.merge(self._writes)
            batch.runs.update(self._runs)
            batch.seen.update(self._seen)
            if self._tx is not None:
                await self._tx.commit()  # releases the savepoint
        else:
            await self.connection()
            assert self._tx is not None
            await self._tx.commit()
            if self._relay is not None:
                self._relay.submit(batch.staged)
        self._writes = _Writes()
        self._done = True

    # --- inbox ------------------------------------------------------------------------

    async def first_delivery(self, event_id: UUID) -> bool:
        """Record ``event_id``; False when it was handled before (a redelivery)."""
        assert self._batch is not None
        batch = self._batch
        if event_id in self._seen or event_id in batch.seen:
            return False
        if event_id in batch.checked:
            self._seen.add(event_id)
            self._writes.inbox.append(event_id)
            return True
        conn = await self.connection()
        inserted = await conn.execute(
            pg_insert(tables.inbox)
            .values(event_id=event_id)
            .on_conflict_do_nothing()
            .returning(tables.inbox.c.event_id)
        )
        self._seen.add(event_id)
        return inserted.first() is not None

    # --- pipelines --------------------------------------------------------------------

    async def lock_pipeline_name(self, name: str) -> None:
        conn = await self.connection()
        await conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": f"pipeline:{name}"}
        )

    async def latest_pipeline(
        self, name: str, version: int | None = None
    ) -> tuple[int, str, PipelineSpec] | None:
        assert self._batch is not None
        p = tables.pipelines
        if not version and name in self._batch.latest:
            newest = self._batch.latest[name]
        else:
            query = select(p.c.version, p.c.digest).where(p.c.name == name)
            query = query.where(p.c.version == version) if version else query
            row = (
                await self._reader().execute(query.order_by(p.c.version.desc()).limit(1))
            ).first()
            newest = None if row is None else (row.version, row.digest)
        if newest is None:
            return None
        found_version, digest = newest
        spec = self._specs.get(name, found_version)
        if spec is None:
            raw = await self._reader().scalar(
                select(p.c.spec).where(p.c.name == name, p.c.version == found_version)
            )
            spec = self._specs.get(name, found_version, raw)
        assert spec is not None
        return found_version, digest, spec

    async def add_pipeline(
        self, spec: PipelineSpec, *, version: int, digest: str, source_file: str | None
    ) -> datetime:
        conn = await self.connection()
        registered_at: datetime = await conn.scalar(
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
        raw = await self._reader().scalar(
            select(p.c.spec).where(p.c.name == name, p.c.version == version)
        )
        return self._specs.get(name, version, raw) if raw is not None else None

    # --- runs -------------------------------------------------------------------------

    async def run_exists(self, run_id: UUID) -> bool:
        assert self._batch is not None
        if run_id in self._runs or run_id in self._batch.runs:
            return True
        if run_id in self._batch.absent:
            return False
        conn = await self.connection()
        found = await conn.scalar(select(func.count()).where(tables.runs.c.id == run_id))
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
        assert self._batch is not None
        run_id = UUID(state.run_id)
        row = {
            "id": run_id,
            "pipeline": state.pipeline,
            "version": state.version or None,
            "status": state.status,
            "input": state.input,
            "output": state.output,
            "error": state.error,
            "steps": _steps_json(state),
            "idempotency_key": idempotency_key,
            "requested_event_id": requested_event_id,
            "requested_at": requested_at,
            "started_at": started_at,
            "finished_at": finished_at,
        }
        if run_id in self._batch.absent and run_id not in self._runs:
            self._writes.new_runs.append(row)
            self._runs[run_id] = {c: row[c] for c in _RUN_STATE_COLUMNS if c in row} | {
                "overrides": {},
                "cost": 0.0,
                "budget_grants": 1,
            }
            return True
        conn = await self.connection()
        inserted = await conn.execute(
            pg_insert(tables.runs).values(**row).on_conflict_do_nothing().returning(_r.c.id)
        )
        return inserted.first() is not None

    async def load_run(self, run_id: UUID) -> RunState | None:
        """The run, locked until the transaction ends (read once per transaction)."""
        assert self._conn is not None
        assert self._batch is not None
        values = self._runs.get(run_id) or self._batch.runs.get(run_id)
        if values is None:
            row = (
                await self._conn.execute(select(_r).where(_r.c.id == run_id).with_for_update())
            ).first()
            if row is None:
                return None
            values = self._batch.runs[run_id] = _snapshot(row)
            if self._shared and self._tx is not None:
                self._loaded.add(run_id)
        # A copy: the state machine changes what it is given, the snapshot must not change.
        data = _copy({k: values[k] for k in _JSON_COLUMNS})
        return RunState(
            run_id=str(run_id),
            pipeline=values["pipeline"],
            version=values["version"] or 0,
            input=data["input"],
            status=values["status"],
            steps={sid: StepState.from_json(st) for sid, st in data["steps"].items()},
            output=data["output"],
            error=data["error"],
            overrides=data["overrides"],
            cost=values["cost"],
            budget_grants=values["budget_grants"],
        )

    async def save_run(
        self,
        state: RunState,
        *,
        finished_at: datetime | None,
        started_at: datetime | None = None,
    ) -> None:
        assert self._batch is not None
        run_id = UUID(state.run_id)
        values: dict[str, Any] = {
            "status": state.status,
            "steps": _steps_json(state),
            "output": state.output,
            "error": state.error,
            "input": state.input,
            "overrides": state.overrides,
            "cost": state.cost,
            "budget_grants": state.budget_grants,
        }
        previous = self._runs.get(run_id) or self._batch.runs.get(run_id) or {}
        self._runs[run_id] = (
            previous
            | values
            | {
                "pipeline": state.pipeline,
                "version": state.version or None,
            }
        )
        if finished_at is not None:
            values["finished_at"] = finished_at
        if started_at is not None:
            values["started_at"] = started_at
        self._writes.runs[run_id] = self._writes.runs.get(run_id, {}) | values

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
        self._writes.timers.append(
            {
                "kind": kind,
                "run_id": run_id,
                "step_id": step_id,
                "attempt": attempt,
                "item_index": item_index,
                "due_at": due_at,
            }
        )

    async def clear_deadline(
        self, *, run_id: UUID, step_id: str, attempt: int, item_index: int | None
    ) -> None:
        """The attempt answered: its deadline has nothing left to watch."""
        self._writes.clear_deadline(
            {"run_id": run_id, "step_id": step_id, "attempt": attempt, "item_index": item_index}
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
        conn = await self.connection()
        taken = await conn.execute(
            pg_insert(k)
            .values(pipeline=pipeline, key=key, run_id=run_id, expires_at=expires_at)
            .on_conflict_do_nothing()
            .returning(k.c.run_id)
        )
        if taken.first() is not None:
            return None
        held = (
            await conn.execute(
                select(k.c.run_id, k.c.expires_at)
                .where(k.c.pipeline == pipeline, k.c.key == key)
                .with_for_update()
            )
        ).one()
        if held.expires_at > now:
            return held.run_id  # type: ignore[no-any-return]
        await conn.execute(
            update(k)
            .where(k.c.pipeline == pipeline, k.c.key == key)
            .values(run_id=run_id, expires_at=expires_at)
        )
        return None

    async def live_idempotency_key(self, *, pipeline: str, key: str, now: datetime) -> UUID | None:
        k = tables.idempotency_keys
        conn = await self.connection()
        run_id = await conn.scalar(
            select(k.c.run_id).where(k.c.pipeline == pipeline, k.c.key == key, k.c.expires_at > now)
        )
        return run_id

    async def active_runs(self, pipeline: str) -> int:
        r = tables.runs
        conn = await self.connection()
        count = await conn.scalar(
            select(func.count()).where(
                r.c.pipeline == pipeline, r.c.status.in_(("running", "parked"))
            )
        )
        return int(count or 0)

    async def oldest_queued(self, pipeline: str) -> UUID | None:
        r = tables.runs
        conn = await self.connection()
        run_id = await conn.scalar(
            select(r.c.id)
            .where(r.c.pipeline == pipeline, r.c.status == "queued")
            .order_by(r.c.requested_at, r.c.id)
            .limit(1)
        )
        return run_id

    def forget_run(self, run_id: UUID) -> None:
        """The run's rows were deleted: nothing of it is left to write or to read."""
        assert self._batch is not None
        self._runs.pop(run_id, None)
        self._writes.runs.pop(run_id, None)
        self._batch.runs.pop(run_id, None)
        self._batch.writes.runs.pop(run_id, None)

    def _reader(self) -> AsyncConnection:
        """For reads that no deferred write can change (pipelines)."""
        assert self._conn is not None, "use the unit of work as an async context manager"
        return self._conn


def _copy(data: dict[str, Any]) -> dict[str, Any]:
    try:
        copied: dict[str, Any] = orjson.loads(orjson.dumps(data))
    except orjson.JSONEncodeError:  # an integer beyond 64 bits, say
        copied = copy.deepcopy(data)
    return copied


def _steps_json(state: RunState) -> dict[str, Any]:
    return {sid: st.to_json() for sid, st in state.steps.items()}
