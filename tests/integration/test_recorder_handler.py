"""The recorder's subscriber in memory (FastStream's TestKafkaBroker) against a real
PostgreSQL: valid events are projected, malformed ones are dead-lettered and then recorded
as dead letters, and what is unreadable on the DLQ topic itself is skipped, not looped."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contracts import (
    RunQueued,
    RunRetried,
    ScheduleUpdated,
    StepCancelled,
    StepCompleted,
    Topics,
)
from conveyor.run_recorder import MIGRATIONS, create_router, recorded_topics
from conveyor.run_recorder.tables import dead_letters, errors, event_log, runs
from conveyor.runtime import (
    DatabaseSettings,
    KafkaSettings,
    create_broker,
    create_db_engine,
    upgrade_schema,
)


@pytest.fixture(scope="module")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    upgrade_schema(database_url, migrations=MIGRATIONS, schema="recorder")
    engine = create_db_engine(DatabaseSettings(url=database_url))
    yield engine
    await engine.dispose()


@dataclass
class Recorder:
    broker: KafkaBroker
    topics: Topics
    dlq_seen: list[bytes]

    def letters(self) -> list[dict[str, Any]]:
        return [json.loads(body) for body in self.dlq_seen]


@pytest.fixture
async def recorder(engine: AsyncEngine, topic_prefix: str) -> AsyncIterator[Recorder]:
    kafka = KafkaSettings(topic_prefix=topic_prefix)
    broker = create_broker(kafka, service="run-recorder", tracer_provider=TracerProvider())
    broker.include_router(create_router(broker=broker, kafka=kafka, engine=engine))
    dlq_seen: list[bytes] = []

    # Another consumer group on the DLQ: sees every message published there.
    @broker.subscriber(kafka.topics.dlq, group_id=f"{topic_prefix}.spy")
    async def spy(msg: KafkaMessage) -> None:
        dlq_seen.append(msg.body)

    async with TestKafkaBroker(broker) as test_broker:
        yield Recorder(broker=test_broker, topics=kafka.topics, dlq_seen=dlq_seen)


def test_one_subscriber_reads_every_recorded_topic() -> None:
    topics = Topics("x")
    assert recorded_topics(topics) == [
        "x.steps.completed",
        "x.runs.events",
        "x.runs.control",
        "x.pipelines",
        "x.dlq",
    ]


async def test_a_valid_event_is_projected(recorder: Recorder, engine: AsyncEngine) -> None:
    queued = RunQueued(run_id=uuid.uuid4(), pipeline="leads", input={"n": 1})
    await recorder.broker.publish(
        queued.model_dump_json().encode(), recorder.topics.runs_events, key=b"k"
    )
    async with engine.connect() as conn:
        run = (await conn.execute(select(runs).where(runs.c.id == queued.run_id))).mappings().one()
        topic = await conn.scalar(
            select(event_log.c.topic).where(event_log.c.event_id == queued.event_id)
        )
    assert (run["pipeline"], run["status"], run["input"]) == ("leads", "queued", {"n": 1})
    assert topic == recorder.topics.runs_events
    assert recorder.dlq_seen == []


async def test_the_new_events_are_read_from_their_topics(
    recorder: Recorder, engine: AsyncEngine
) -> None:
    """A fan-out summary comes on runs.events; ScheduleUpdated on pipelines."""
    run_id = uuid.uuid4()
    events = [
        (StepCancelled(run_id=run_id, step_id="a", attempt=1, reason="r"), "runs_events"),
        (RunRetried(run_id=run_id, from_step="a", input={"n": 2}), "runs_events"),
        (StepCompleted(run_id=run_id, step_id="b", attempt=1, output=[1]), "runs_events"),
        (ScheduleUpdated(name=f"p-{run_id.hex[:6]}", paused=True), "pipelines"),
    ]
    for event, topic in events:
        await recorder.broker.publish(
            event.model_dump_json().encode(), getattr(recorder.topics, topic), key=b"k"
        )
    assert recorder.dlq_seen == []
    async with engine.connect() as conn:
        logged = (
            await conn.scalars(
                select(event_log.c.type).where(
                    event_log.c.event_id.in_([e.event_id for e, _ in events])
                )
            )
        ).all()
        run = (await conn.execute(select(runs).where(runs.c.id == run_id))).mappings().one()
    assert sorted(logged) == ["RunRetried", "ScheduleUpdated", "StepCancelled", "StepCompleted"]
    assert (run["retries"], run["input"]) == (1, {"n": 2})


async def test_a_malformed_message_is_dead_lettered_and_recorded(
    recorder: Recorder, engine: AsyncEngine
) -> None:
    body = b'{"type": "RunQueued", "run_id": "not-a-uuid"'  # truncated JSON
    await recorder.broker.publish(body, recorder.topics.runs_events, key=b"run-7")

    [letter] = recorder.letters()
    assert letter["type"] == "DeadLetter"
    assert letter["source_topic"] == recorder.topics.runs_events
    assert letter["consumer_group"] == f"{recorder.topics.prefix}.run-recorder"
    assert letter["reason"].startswith("body is not JSON")
    assert base64.b64decode(letter["value_b64"]) == body
    async with engine.connect() as conn:
        stored = (
            (
                await conn.execute(
                    select(dead_letters).where(
                        dead_letters.c.event_id == uuid.UUID(letter["event_id"])
                    )
                )
            )
            .mappings()
            .one()
        )
        error = (
            await conn.execute(
                select(errors.c.scope, errors.c.type).where(
                    errors.c.event_id == uuid.UUID(letter["event_id"])
                )
            )
        ).one()
    assert base64.b64decode(stored["value_b64"]) == body
    assert base64.b64decode(stored["key_b64"]) == b"run-7"
    assert tuple(error) == ("dead_letter", "DeadLetter")


async def test_an_invalid_event_is_dead_lettered_with_the_field(recorder: Recorder) -> None:
    await recorder.broker.publish(
        b'{"type": "StepCompleted", "run_id": "x", "step_id": "s", "attempt": 1}',
        recorder.topics.steps_completed,
    )
    [letter] = recorder.letters()
    assert "run_id" in letter["reason"]


async def test_unreadable_dead_letters_are_skipped_not_looped(
    recorder: Recorder, engine: AsyncEngine
) -> None:
    async with engine.connect() as conn:
        before = len((await conn.execute(select(dead_letters.c.event_id))).all())
    await recorder.broker.publish(b'{"type": "DeadLetter"}', recorder.topics.dlq)
    await recorder.broker.publish(b"\xff\xfe", recorder.topics.dlq)
    # the spy saw what the test published and nothing more: the recorder re-published nothing
    assert recorder.dlq_seen == [b'{"type": "DeadLetter"}', b"\xff\xfe"]
    async with engine.connect() as conn:
        after = len((await conn.execute(select(dead_letters.c.event_id))).all())
    assert after == before
