"""Transactional outbox: events are written in the same transaction as the state that
caused them, and a relay publishes them in order, in batches, and deletes what the broker
acknowledged. A crash between commit and publish re-sends; it never loses.

We evaluated ``faststream-outbox`` first. It relays with concurrent workers (no per-run
ordering), deletes row by row, and LISTENs only with asyncpg; Conveyor needs ordered,
batched publishing on psycopg with the trace context of the writer carried across, which
this module does in about a hundred lines.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from faststream.kafka import KafkaBroker
from opentelemetry import context as otel_context
from opentelemetry import propagate
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Identity,
    LargeBinary,
    MetaData,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.contracts import DeadLetter, Event
from conveyor.runtime.guard import DEAD_LETTER_VALUE_BYTES, MAX_MESSAGE_BYTES

__all__ = [
    "OutboxMessage",
    "OutboxRelay",
    "Staged",
    "outbox_rows",
    "outbox_table",
    "stage",
]

log = logging.getLogger("conveyor.runtime.outbox")


def outbox_table(metadata: MetaData) -> Table:
    return Table(
        "outbox",
        metadata,
        Column("id", BigInteger, Identity(always=True), primary_key=True),
        Column("topic", Text, nullable=False),
        Column("key", Text),
        Column("payload", LargeBinary, nullable=False),
        Column("headers", JSONB, nullable=False),
        Column("created_at", DateTime(timezone=True), server_default=func.now(), nullable=False),
    )


@dataclass(frozen=True)
class OutboxMessage:
    topic: str
    event: Event
    key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @functools.cached_property
    def payload(self) -> bytes:
        """The event as it goes on the wire, serialized once (a writer may check its size
        before staging it)."""
        return self.event.model_dump_json().encode()


_RECORD_OVERHEAD = 16 << 10
"""Room for the record and batch framing around key, value and headers."""
_OVERSIZED = uuid.UUID("6f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")


@dataclass(frozen=True)
class Staged:
    """A message written to the outbox: its row id and what goes on the wire."""

    id: int
    topic: str
    key: str | None
    payload: bytes
    headers: dict[str, str]


def outbox_rows(messages: list[OutboxMessage]) -> list[dict[str, Any]]:
    """The rows for ``messages``, carrying the current trace context (call it inside the
    span that caused them)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [
        {
            "topic": m.topic,
            "key": m.key,
            "payload": m.payload,
            "headers": {"content-type": "application/json", **carrier, **m.headers},
        }
        for m in messages
    ]


async def stage(conn: AsyncConnection, table: Table, messages: list[OutboxMessage]) -> list[Staged]:
    """Insert ``messages`` in the caller's transaction, in one statement, carrying the
    current trace context. Hand what it returns to ``OutboxRelay.submit`` once the
    transaction has committed."""
    rows = outbox_rows(messages)
    if not rows:
        return []
    result = await conn.execute(
        insert(table)
        .values(created_at=func.clock_timestamp())
        .returning(table.c.id, sort_by_parameter_order=True),
        rows,
    )
    return [Staged(id=row_id, **row) for row_id, row in zip(result.scalars(), rows, strict=True)]


class OutboxRelay:
    """Publishes what committed transactions staged, in order, and deletes it once the
    broker has acknowledged it.

    The fast path: a writer hands its committed rows to ``submit`` and they are published
    straight away, with no query to find them. The table is the safety net: rows older
    than ``stale_after`` seconds that this process is not publishing (a crash between
    commit and publish, a failed publish, another replica that died) are found by a scan
    every ``poll_interval`` and published in id order. After a failed publish the relay
    drops what it holds in memory and goes back to the table, so order is kept. Delivery
    is at least once: consumers deduplicate.

    Published rows are deleted together, once ``forget_after`` seconds have passed since
    the first of them went out or ``batch_size`` are waiting, not one transaction per
    publish: with runs one after another that transaction ran beside the next hop of the
    run (leaving it out made a 5-step run about 10 ms quicker; deleting in batches, 126 ms
    against 134 ms at p50 on average over five A/B pairs, with the noise of a shared
    2-core machine). The relay skips them in its own scans meanwhile; ``forget_after`` is well
    under ``stale_after``, so no other relay's scan takes them for rows left behind, and
    after a crash they are published again (at least once, as before)."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        table: Table,
        broker: KafkaBroker,
        lock_key: int,
        batch_size: int = 500,
        poll_interval: float = 0.5,
        stale_after: float = 2.0,
        bootstrap: str | None = None,
        dead_letters: str | None = None,
        forget_after: float = 0.25,
    ) -> None:
        """``bootstrap``: publish with a producer of the relay's own rather than through
        ``broker``. The rows carry the writer's trace context already, so a consumer's span
        is still a child of the writer's; what is skipped is the broker's per-message
        middleware (a span of its own per publish), a fifth of the scheduler's CPU.

        ``dead_letters``: the topic that gets a DeadLetter in place of a row too large for
        the broker (see ``_fit``); without one such a row is logged and dropped."""
        self._bootstrap = bootstrap
        self._dead_letters = dead_letters
        self._producer: AIOKafkaProducer | None = None
        self._engine = engine
        self._table = table
        self._broker = broker
        self._lock_key = lock_key
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._stale_after = stale_after
        self._queue: collections.deque[Staged] = collections.deque()
        self._held: set[int] = set()
        """Ids of rows queued or published and not yet deleted: this relay's scans skip them."""
        self._published: list[int] = []
        self._forget_at: float | None = None
        """When the oldest of ``_published`` is to be deleted (the loop's clock)."""
        self._forget_after = min(forget_after, stale_after / 2)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def submit(self, staged: list[Staged]) -> None:
        """Publish ``staged`` (committed rows) now."""
        if staged:
            self._queue.extend(staged)
            self._held.update(s.id for s in staged)
            self._wake.set()

    def wake(self) -> None:
        """Look in the table now rather than at the next poll."""
        self._wake.set()

    async def start(self) -> None:
        if self._bootstrap is not None:
            self._producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                client_id="conveyor-outbox-relay",
                acks="all",
                enable_idempotence=False,  # the embedded broker lacks it; consumers dedupe
                linger_ms=0,
            )
            await self._producer.start()
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await self._drain()
            await self._forget()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                wait = self._poll_interval
                if self._forget_at is not None:
                    wait = max(0.0, min(wait, self._forget_at - loop.time()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            try:
                if self._queue:
                    await self._drain()
                elif self._forget_at is not None and loop.time() >= self._forget_at:
                    await self._forget()
                else:
                    while await self.flush(stale_only=True) >= self._batch_size:
                        pass
            except Exception:
                log.exception("outbox relay failed; going back to the table")
                self._queue.clear()
                self._held.clear()
                self._published.clear()
                self._forget_at = None
                await asyncio.sleep(1.0)

    async def _drain(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
            await self._publish(batch)
            if self._forget_at is None:
                self._forget_at = asyncio.get_running_loop().time() + self._forget_after
            self._published.extend(s.id for s in batch)
            if len(self._published) >= self._batch_size:
                await self._forget()

    async def _forget(self) -> None:
        """Delete the rows published so far, in one transaction."""
        ids, self._published, self._forget_at = self._published, [], None
        if ids:
            async with self._engine.begin() as conn:
                await conn.execute(delete(self._table).where(self._table.c.id.in_(ids)))
            self._held.difference_update(ids)

    async def flush(self, *, stale_only: bool = False) -> int:
        """Publish one batch of rows from the table in id order; return how many went out.

        ``stale_only``: leave rows younger than ``stale_after`` (their writer is about to
        publish them) and the rows this relay holds."""
        table = self._table
        async with self._engine.begin() as conn:
            locked = await conn.scalar(select(func.pg_try_advisory_xact_lock(self._lock_key)))
            if not locked:
                return 0
            query = select(table).order_by(table.c.id).limit(self._batch_size)
            if stale_only:
                query = query.where(
                    table.c.created_at
                    < func.clock_timestamp() - timedelta(seconds=self._stale_after)
                )
            rows = [row for row in (await conn.execute(query)).all() if row.id not in self._held]
            if not rows:
                return 0
            await self._publish(
                [Staged(row.id, row.topic, row.key, row.payload, row.headers) for row in rows]
            )
            await conn.execute(delete(table).where(table.c.id.in_([row.id for row in rows])))
        return len(rows)

    def _fit(self, item: Staged) -> Staged | None:
        """``item``, or what goes instead when the broker would refuse it as too large.

        The relay keeps the outbox's order, so a refused row would be retried forever with
        every later row (every run's events) queued behind it. Instead it becomes a
        DeadLetter (its start, the reason), the error is logged, and the rows after it go
        on. Writers keep their events under the limit (the scheduler fails a step whose
        input would not fit); this is the net under them."""
        size = (
            len(item.payload)
            + len(item.key or "")
            + sum(len(k) + len(v) for k, v in item.headers.items())
        )
        if size <= MAX_MESSAGE_BYTES - _RECORD_OVERHEAD:
            return item
        log.error(
            "outbox row %d (%s) is %d bytes, more than the broker takes: dead-lettered",
            item.id,
            item.topic,
            size,
        )
        if self._dead_letters is None:
            return None
        letter = DeadLetter(
            event_id=uuid.uuid5(_OVERSIZED, f"{item.topic}/{item.id}/{len(item.payload)}"),
            source_topic=item.topic,
            partition=-1,
            offset=item.id,
            consumer_group="outbox-relay",
            reason=f"not published: {size} bytes, over the {MAX_MESSAGE_BYTES}-byte limit "
            "of one message (offset is the outbox row id)",
            key_b64=base64.b64encode(item.key.encode()).decode() if item.key else None,
            value_b64=base64.b64encode(item.payload[:DEAD_LETTER_VALUE_BYTES]).decode(),
            headers=item.headers,
        )
        payload = letter.model_dump_json().encode()
        return Staged(item.id, self._dead_letters, item.key, payload, item.headers)

    async def _publish(self, batch: list[Staged]) -> None:
        batch = [fit for item in batch if (fit := self._fit(item)) is not None]
        pending: list[Any] = []
        if self._producer is not None:
            for item in batch:
                pending.append(
                    await self._producer.send(
                        item.topic,
                        item.payload,
                        key=item.key.encode() if item.key is not None else None,
                        headers=[(k, v.encode()) for k, v in item.headers.items()],
                    )
                )
            await asyncio.gather(*pending)
            return
        for item in batch:
            token = otel_context.attach(propagate.extract(item.headers))
            try:
                pending.append(
                    await self._broker.publish(
                        item.payload,
                        item.topic,
                        key=item.key.encode() if item.key is not None else None,
                        headers=item.headers,
                        no_confirm=True,
                    )
                )
            finally:
                otel_context.detach(token)
        await asyncio.gather(*pending)
