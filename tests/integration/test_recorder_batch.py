"""The recorder's batches against a real PostgreSQL: what one poll returned, projected
together (one statement logs the batch, the writes grouped by statement), ends in exactly
the rows that projecting the same events one at a time gives, down to the event log's
order and the errors' ids; through the handler too."""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from faststream.kafka import TestKafkaBroker
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.cli import stack
from conveyor.contracts import (
    DeadLetter,
    ErrorInfo,
    Event,
    PipelineRegistered,
    RunCancelled,
    RunCompleted,
    RunDeleted,
    RunFailed,
    RunParked,
    RunQueued,
    RunResumed,
    RunStarted,
    ScheduleUpdated,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepMetrics,
    StepProgress,
    StepScheduled,
    StepStarted,
)
from conveyor.run_recorder import MIGRATIONS, create_router, record_event
from conveyor.run_recorder.projection import project_events
from conveyor.run_recorder.tables import deleted_runs, event_log, runs, step_attempts
from conveyor.runtime import (
    DatabaseSettings,
    KafkaSettings,
    create_broker,
    create_db_engine,
    upgrade_schema,
)
from tests.integration.test_recorder_projection import at, history
from tests.integration.test_recorder_semantics import retried_history

TABLES = {
    "event_log": "seq",
    "runs": "id",
    "step_attempts": "run_id, step_id, attempt, item_index",
    "errors": "id",
    "dead_letters": "event_id",
    "pipelines": "name, version",
    "schedules": "name",
    "deleted_runs": "run_id",
}


@dataclass(frozen=True)
class Origin:
    topic: str
    partition: int = 0
    offset: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()


@pytest.fixture(scope="module")
def engines(postgres_server_url: str) -> Iterator[tuple[str, str]]:
    """Two fresh databases: one projected event by event, one in batches."""
    names = [f"conveyor_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    urls = [stack.create_database(postgres_server_url, name) for name in names]
    try:
        for url in urls:
            upgrade_schema(url, migrations=MIGRATIONS, schema="recorder")
        yield urls[0], urls[1]
    finally:
        for name in names:
            stack.drop_database(postgres_server_url, name)


@pytest.fixture
async def one_by_one(engines: tuple[str, str]) -> AsyncIterator[AsyncEngine]:
    async with _emptied(engines[0]) as engine:
        yield engine


@pytest.fixture
async def batched(engines: tuple[str, str]) -> AsyncIterator[AsyncEngine]:
    async with _emptied(engines[1]) as engine:
        yield engine


class _emptied:
    """An engine on ``url`` whose recorder tables start empty, identities from 1."""

    def __init__(self, url: str) -> None:
        self.engine = create_db_engine(DatabaseSettings(url=url))

    async def __aenter__(self) -> AsyncEngine:
        async with self.engine.begin() as conn:
            names = ", ".join(f"recorder.{t}" for t in TABLES)
            await conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))
        return self.engine

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.dispose()


async def dump(engine: AsyncEngine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, but the times of day it was written at."""
    out = {}
    async with engine.connect() as conn:
        for table, order in TABLES.items():
            rows = await conn.execute(text(f"SELECT * FROM recorder.{table} ORDER BY {order}"))
            out[table] = [
                {k: v for k, v in row.items() if k not in ("updated_at", "recorded_at")}
                for row in rows.mappings()
            ]
    return out


def _origin(event: Event, offset: int, rng: random.Random) -> Origin:
    result = isinstance(event, StepStarted | StepProgress | StepCompleted | StepFailed)
    topic = "conveyor.steps.completed" if result else "conveyor.runs.events"
    trace = f"00-{uuid.uuid4().hex}-{'1' * 16}-01".encode()
    headers = (("traceparent", trace),) if rng.random() < 0.5 else ()
    return Origin(topic, partition=offset % 3, offset=offset, headers=headers)


def _cancelled(run_id: uuid.UUID) -> list[Event]:
    return [
        RunQueued(run_id=run_id, pipeline="p", occurred_at=at(0)),
        RunStarted(run_id=run_id, pipeline="p", version=1, occurred_at=at(1)),
        StepScheduled(run_id=run_id, step_id="a", attempt=1, kind="llm", occurred_at=at(2)),
        StepStarted(run_id=run_id, step_id="a", attempt=1, worker="w", occurred_at=at(3)),
        StepCancelled(run_id=run_id, step_id="a", attempt=1, reason="r", occurred_at=at(4)),
        RunCancelled(run_id=run_id, reason="r", occurred_at=at(4)),
        StepFailed(
            run_id=run_id, step_id="a", attempt=1, error=ErrorInfo(type="Cancelled", message="c"),
            worker="w", occurred_at=at(5),
        ),
        StepCompleted(
            run_id=run_id, step_id="a", attempt=1, output=1, worker="w", occurred_at=at(6)
        ),
    ]  # fmt: skip


def _ties(run_id: uuid.UUID) -> list[Event]:
    """Events of one rank at one instant: the order they are read in decides, so a batch
    must apply them in that order too (across statements: RunFailed then RunCompleted)."""
    boom = ErrorInfo(type="E", message="m")
    return [
        RunStarted(run_id=run_id, pipeline="tie", version=1, occurred_at=at(3)),
        RunParked(run_id=run_id, step_id="x", occurred_at=at(3)),
        RunResumed(run_id=run_id, step_id="x", occurred_at=at(3)),
        StepStarted(run_id=run_id, step_id="x", attempt=1, worker="w1", occurred_at=at(3)),
        StepProgress(
            run_id=run_id, step_id="x", attempt=1, progress=0.1, message="a", occurred_at=at(4)
        ),
        StepProgress(
            run_id=run_id, step_id="x", attempt=1, progress=0.2, message="b", occurred_at=at(4)
        ),
        StepFailed(
            run_id=run_id, step_id="x", attempt=1, error=boom,
            metrics=StepMetrics(tokens_in=3, cost=0.5), occurred_at=at(5),
        ),
        StepCompleted(
            run_id=run_id, step_id="x", attempt=1, output="o",
            metrics=StepMetrics(tokens_in=3), occurred_at=at(5),
        ),
        RunFailed(run_id=run_id, error=boom, occurred_at=at(6)),
        RunCompleted(run_id=run_id, output=1, occurred_at=at(6)),
        RunQueued(run_id=run_id, pipeline="tie", occurred_at=at(7), requested_at=at(-3)),
        RunStarted(run_id=run_id, pipeline="tie2", version=3, occurred_at=at(8)),
    ]  # fmt: skip


def _letter(run_id: uuid.UUID, n: int) -> DeadLetter:
    about = {"run_id": str(run_id), "pipeline": "lp"} if n % 2 else {"x": 1}
    return DeadLetter(
        source_topic="t",
        partition=0,
        offset=n,
        consumer_group="g",
        reason=f"bad\ndetails {n}",
        value_b64=base64.b64encode(json.dumps(about).encode()).decode(),
        headers={"h": "v"},
        occurred_at=at(n),
    )


def stream(rng: random.Random) -> list[Event]:
    """Whole runs of every kind, shuffled together, with redeliveries (some back to back),
    runs deleted midway (and again later), pipelines, schedules, dead letters."""
    run_ids = [uuid.uuid4() for _ in range(8)]
    events: list[Event] = []
    for n, run_id in enumerate(run_ids):
        events += [history, retried_history, _cancelled, _ties][n % 4](run_id)
        events += [*_ties(run_id), _letter(run_id, n), _letter(run_id, n + 1)]
    for n in range(3):
        events.append(
            PipelineRegistered(
                name=f"p{n % 2}", version=1, digest=f"d{n}", spec={"name": f"p{n % 2}"},
                occurred_at=at(n),
            )
        )  # fmt: skip
        events.append(ScheduleUpdated(name="p0", paused=bool(n % 2), occurred_at=at(n % 2)))
    events += rng.sample(events, len(events) // 4)
    rng.shuffle(events)
    for run_id in rng.sample(run_ids, 3):
        deletion = RunDeleted(run_id=run_id, requested_by="me", occurred_at=at(50))
        where = rng.randrange(len(events))
        events.insert(where, deletion)
        if rng.random() < 0.5:
            events.insert(rng.randrange(where, len(events)), deletion)
    for n in range(len(events) - 1, 0, -1):
        if rng.random() < 0.05:
            events.insert(n, events[n])
    return events


@pytest.mark.parametrize("seed", range(6))
async def test_batches_give_exactly_the_rows_of_one_by_one(
    one_by_one: AsyncEngine, batched: AsyncEngine, seed: int
) -> None:
    rng = random.Random(seed)
    events = stream(rng)
    items = [(event, _origin(event, n, rng)) for n, event in enumerate(events)]
    alone = [await record_event(one_by_one, event, origin) for event, origin in items]
    together: list[bool] = []
    while len(together) < len(items):
        batch = items[len(together) : len(together) + rng.choice([1, 2, 7, 40, 200])]
        async with batched.begin() as conn:
            together += await project_events(conn, batch)
    assert together == alone
    assert False in alone  # redeliveries, events about deleted runs
    expected = await dump(one_by_one)
    assert await dump(batched) == expected
    assert len(expected["errors"]) > 10
    assert len(expected["deleted_runs"]) == 3


async def test_a_redelivery_within_a_batch_counts_once(batched: AsyncEngine) -> None:
    run_id = uuid.uuid4()
    usage = StepMetrics(tokens_in=10, tokens_out=5)
    done = StepCompleted(run_id=run_id, step_id="a", attempt=1, output=1, metrics=usage)
    queued = RunQueued(run_id=run_id, pipeline="p")
    origin = Origin("conveyor.steps.completed")
    async with batched.begin() as conn:
        projected = await project_events(
            conn, [(done, origin), (queued, origin), (done, origin), (done, origin)]
        )
    assert projected == [True, True, False, False]
    async with batched.connect() as conn:
        tokens = await conn.scalar(select(runs.c.tokens).where(runs.c.id == run_id))
        logged = await conn.scalar(
            select(func.count()).select_from(event_log).where(event_log.c.run_id == run_id)
        )
    assert (tokens, logged) == (15, 2)


async def test_what_follows_a_deletion_in_a_batch_is_dropped(batched: AsyncEngine) -> None:
    run_id = uuid.uuid4()
    origin = Origin("conveyor.runs.events")
    before = [
        RunQueued(run_id=run_id, pipeline="p"),
        StepFailed(run_id=run_id, step_id="a", attempt=1, error=ErrorInfo(type="E", message="m")),
    ]
    deleted = RunDeleted(run_id=run_id, requested_by="me")
    late = StepCompleted(run_id=run_id, step_id="a", attempt=2, output=1)
    async with batched.begin() as conn:
        projected = await project_events(
            conn, [(e, origin) for e in (*before, deleted, late, before[0])]
        )
    assert projected == [True, True, True, False, False]
    async with batched.connect() as conn:
        left = [
            await conn.scalar(select(func.count()).select_from(t).where(column == run_id))
            for t, column in (
                (runs, runs.c.id),
                (step_attempts, step_attempts.c.run_id),
                (event_log, event_log.c.run_id),
                (deleted_runs, deleted_runs.c.run_id),
            )
        ]
    assert left == [0, 0, 0, 1]


async def test_a_batch_through_the_handler(batched: AsyncEngine, topic_prefix: str) -> None:
    """What one poll returned, through the recorder's subscriber: projected in one go."""
    kafka = KafkaSettings(topic_prefix=topic_prefix)
    broker = create_broker(kafka, service="run-recorder", tracer_provider=TracerProvider())
    broker.include_router(create_router(broker=broker, kafka=kafka, engine=batched))
    run_id = uuid.uuid4()
    events = [
        RunQueued(run_id=run_id, pipeline="p", occurred_at=at(0)),
        StepScheduled(run_id=run_id, step_id="a", attempt=1, kind="llm", occurred_at=at(1)),
        RunStarted(run_id=run_id, pipeline="p", version=1, occurred_at=at(1)),
        RunCompleted(run_id=run_id, output="done", occurred_at=at(3)),
    ]
    bodies = [e.model_dump_json().encode() for e in [*events, events[1]]]
    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish_batch(*bodies, topic=kafka.topics.runs_events)
    async with batched.connect() as conn:
        run = (await conn.execute(select(runs).where(runs.c.id == run_id))).mappings().one()
        logged = (
            await conn.scalars(
                select(event_log.c.type).where(event_log.c.run_id == run_id).order_by("seq")
            )
        ).all()
    assert (run["status"], run["output"], run["pipeline"]) == ("succeeded", "done", "p")
    assert logged == ["RunQueued", "StepScheduled", "RunStarted", "RunCompleted"]
