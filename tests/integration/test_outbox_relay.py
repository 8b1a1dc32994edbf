"""The outbox relay against the real broker and PostgreSQL: committed rows handed over are
published at once and in order; rows nobody handed over (a crash between commit and
publish) are found in the table once stale; rows being published are not sent twice."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faststream.kafka import KafkaBroker
from sqlalchemy import MetaData, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contracts import RunCancelled
from conveyor.runtime import (
    DatabaseSettings,
    OutboxMessage,
    OutboxRelay,
    create_db_engine,
    outbox_table,
    stage,
)

pytestmark = pytest.mark.usefixtures("kafka_bootstrap")


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[tuple[AsyncEngine, Any]]:
    schema = f"relay_{uuid.uuid4().hex[:8]}"
    table = outbox_table(MetaData(schema=schema))
    engine = create_db_engine(DatabaseSettings(url=database_url))
    async with engine.begin() as conn:
        await conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        await conn.run_sync(table.metadata.create_all)
    yield engine, table
    async with engine.begin() as conn:
        await conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    await engine.dispose()


async def _create_topic(bootstrap: str, name: str) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=name, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    return name


@pytest.fixture
async def topic(kafka_bootstrap: str) -> str:
    return await _create_topic(kafka_bootstrap, f"relay-{uuid.uuid4().hex[:8]}")


@pytest.fixture
async def broker(kafka_bootstrap: str) -> AsyncIterator[KafkaBroker]:
    broker = KafkaBroker(kafka_bootstrap)
    await broker.connect()
    yield broker
    await broker.stop()


async def _published(bootstrap: str, topic: str, expected: int, within: float = 20) -> list[str]:
    """Reasons of the RunCancelled events on ``topic``, in order, once ``expected`` are
    there (and a little longer, to catch any extra)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        seen: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        settle: float | None = None
        while loop.time() < deadline and (settle is None or loop.time() < settle):
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                seen += [RunCancelled.model_validate_json(r.value).reason or "" for r in records]
            if len(seen) >= expected and settle is None:
                settle = loop.time() + 1.0
        return seen
    finally:
        await consumer.stop()


def _messages(topic: str, reasons: list[str]) -> list[OutboxMessage]:
    run_id = uuid.uuid4()
    return [
        OutboxMessage(topic=topic, event=RunCancelled(run_id=run_id, reason=r), key=str(run_id))
        for r in reasons
    ]


async def _count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


async def _left(engine: AsyncEngine, table: Any, within: float = 5.0) -> int:
    """The rows left in the outbox once it is empty, or once ``within`` seconds passed."""
    for _ in range(int(within / 0.05)):
        if await _count(engine, table) == 0:
            return 0
        await asyncio.sleep(0.05)
    return await _count(engine, table)


@pytest.mark.parametrize("own_producer", [True, False], ids=["own-producer", "via-broker"])
async def test_handed_over_rows_go_out_in_order_and_leave_the_table(
    engine: tuple[AsyncEngine, Any],
    broker: KafkaBroker,
    topic: str,
    kafka_bootstrap: str,
    own_producer: bool,
) -> None:
    db, table = engine
    relay = OutboxRelay(
        engine=db,
        table=table,
        broker=broker,
        lock_key=1,
        stale_after=60,
        bootstrap=kafka_bootstrap if own_producer else None,
    )
    await relay.start()
    try:
        reasons = [f"r{i}" for i in range(30)]
        for chunk in (reasons[:10], reasons[10:]):
            async with db.begin() as conn:
                staged = await stage(conn, table, _messages(topic, chunk))
            relay.submit(staged)
        assert await _published(kafka_bootstrap, topic, 30) == reasons
        assert await _left(db, table) == 0
    finally:
        await relay.stop()


async def test_rows_left_behind_are_published_once_stale(
    engine: tuple[AsyncEngine, Any], broker: KafkaBroker, topic: str, kafka_bootstrap: str
) -> None:
    db, table = engine
    async with db.begin() as conn:  # committed, never handed over: the writer crashed
        await stage(conn, table, _messages(topic, ["old-1", "old-2"]))
        await conn.execute(
            update(table).values(
                created_at=func.clock_timestamp() - func.make_interval(0, 0, 0, 0, 0, 0, 10)
            )
        )
        await stage(conn, table, _messages(topic, ["young"]))
    relay = OutboxRelay(
        engine=db,
        table=table,
        broker=broker,
        lock_key=2,
        poll_interval=0.1,
        stale_after=3,
        bootstrap=kafka_bootstrap,
    )
    await relay.start()
    try:
        # the stale rows at the first scan; the young one only once it is stale too
        assert await _published(kafka_bootstrap, topic, 2, within=2.5) == ["old-1", "old-2"]
        assert await _published(kafka_bootstrap, topic, 3) == ["old-1", "old-2", "young"]
    finally:
        await relay.stop()
    assert await _count(db, table) == 0


async def test_a_scan_skips_rows_the_relay_is_publishing(
    engine: tuple[AsyncEngine, Any], broker: KafkaBroker, topic: str, kafka_bootstrap: str
) -> None:
    db, table = engine
    relay = OutboxRelay(engine=db, table=table, broker=broker, lock_key=3, stale_after=0)
    async with db.begin() as conn:
        staged = await stage(conn, table, _messages(topic, ["held"]))
    relay.submit(staged)  # not started: held in memory
    assert await relay.flush(stale_only=True) == 0
    await relay.start()
    await relay.stop()
    assert await _published(kafka_bootstrap, topic, 1) == ["held"]
    assert await _count(db, table) == 0


async def test_a_row_too_large_for_the_broker_is_dead_lettered_and_the_rest_go_on(
    engine: tuple[AsyncEngine, Any], broker: KafkaBroker, topic: str, kafka_bootstrap: str
) -> None:
    """The relay keeps the outbox's order: a row the broker refuses would hold every later
    row forever. It goes to the dead-letter topic instead (its start and why), and the
    rows after it are published."""
    from conveyor.contracts import DeadLetter

    db, table = engine
    dlq = await _create_topic(kafka_bootstrap, f"{topic}-dlq")
    relay = OutboxRelay(
        engine=db,
        table=table,
        broker=broker,
        lock_key=1,
        stale_after=60,
        bootstrap=kafka_bootstrap,
        dead_letters=dlq,
    )
    await relay.start()
    try:
        messages = _messages(topic, ["before", "x" * (1 << 20), "after"])
        async with db.begin() as conn:
            staged = await stage(conn, table, messages)
        relay.submit(staged)
        assert await _published(kafka_bootstrap, topic, 2) == ["before", "after"]

        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partition = TopicPartition(dlq, 0)
            consumer.assign([partition])
            await consumer.seek_to_beginning(partition)
            record = await asyncio.wait_for(consumer.getone(), 20)
        finally:
            await consumer.stop()
        letter = DeadLetter.model_validate_json(record.value)
        assert (letter.source_topic, letter.offset) == (topic, staged[1].id)
        assert "over the 1048576-byte limit" in letter.reason
        assert await _left(db, table) == 0
    finally:
        await relay.stop()


async def test_published_rows_are_deleted_together_not_one_transaction_each(
    engine: tuple[AsyncEngine, Any], broker: KafkaBroker, topic: str, kafka_bootstrap: str
) -> None:
    """Rows stay in the table, skipped by the relay's own scans, until ``batch_size`` are
    published or ``forget_after`` has passed since the first; then one DELETE takes them."""
    db, table = engine
    relay = OutboxRelay(
        engine=db,
        table=table,
        broker=broker,
        lock_key=5,
        batch_size=3,
        poll_interval=0.05,
        stale_after=120,
        forget_after=60,  # only the batch size can end this wait within the test
        bootstrap=kafka_bootstrap,
    )
    await relay.start()
    try:
        for reason in ("one", "two"):
            async with db.begin() as conn:
                relay.submit(await stage(conn, table, _messages(topic, [reason])))
        assert await _published(kafka_bootstrap, topic, 2) == ["one", "two"]
        assert await _count(db, table) == 2  # published, not yet deleted
        assert await relay.flush(stale_only=True) == 0  # and not published again
        async with db.begin() as conn:
            relay.submit(await stage(conn, table, _messages(topic, ["three"])))
        assert await _left(db, table) == 0  # the third filled the batch: all three went
    finally:
        await relay.stop()
    assert await _published(kafka_bootstrap, topic, 3) == ["one", "two", "three"]

    quick = OutboxRelay(
        engine=db, table=table, broker=broker, lock_key=6, forget_after=0.2, stale_after=120
    )
    await quick.start()
    try:
        async with db.begin() as conn:
            quick.submit(await stage(conn, table, _messages(topic, ["four"])))
        assert await _left(db, table) == 0  # once forget_after passed, with no more traffic
    finally:
        await quick.stop()
