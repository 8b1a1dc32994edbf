"""The recorder's projection against a real PostgreSQL: a whole run's history, the same
rows whatever order the events arrive in, redelivery changing nothing, dead letters, and
migrations that match the table definitions."""

from __future__ import annotations

import asyncio
import base64
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contracts import (
    CancelRun,
    DeadLetter,
    ErrorInfo,
    Event,
    PipelineRegistered,
    RunCompleted,
    RunFailed,
    RunParked,
    RunQueued,
    RunResumed,
    RunStarted,
    StepCompleted,
    StepFailed,
    StepMetrics,
    StepProgress,
    StepRetrying,
    StepScheduled,
    StepSkipped,
    StepStarted,
)
from conveyor.run_recorder import MIGRATIONS, record_event
from conveyor.run_recorder.tables import (
    dead_letters,
    errors,
    event_log,
    metadata,
    pipelines,
    runs,
    step_attempts,
)
from conveyor.runtime import DatabaseSettings, create_db_engine, database_url, upgrade_schema

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Origin:
    topic: str
    partition: int = 0
    offset: int = 0


RUNS_EVENTS = Origin("conveyor.runs.events")
STEPS_COMPLETED = Origin("conveyor.steps.completed")


def _origin(event: Event) -> Origin:
    if isinstance(event, StepStarted | StepProgress | StepCompleted | StepFailed):
        return STEPS_COMPLETED
    return RUNS_EVENTS


@pytest.fixture(scope="module")
def migrated(database_url: str) -> str:
    upgrade_schema(database_url, migrations=MIGRATIONS, schema="recorder")
    upgrade_schema(database_url, migrations=MIGRATIONS, schema="recorder")  # idempotent
    return database_url


@pytest.fixture(scope="module")
async def engine(migrated: str) -> AsyncIterator[AsyncEngine]:
    engine = create_db_engine(DatabaseSettings(url=migrated))
    yield engine
    await engine.dispose()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def history(run_id: uuid.UUID) -> list[Event]:
    """A run with a retried LLM step, a fan-out, progress reports, a skipped step."""
    usage = StepMetrics(duration_ms=900, tokens_in=100, tokens_out=20, cost=0.01)
    boom = ErrorInfo(type="RateLimited", message="slow down", traceback="tb", retryable=True)
    return [
        RunQueued(
            run_id=run_id,
            occurred_at=at(0),
            pipeline="article",
            version=2,
            input={"topic": "otters"},
            idempotency_key="k-1",
            requested_by="alice",
            requested_at=at(-1),
        ),
        RunStarted(run_id=run_id, occurred_at=at(1), pipeline="article", version=2),
        StepScheduled(
            run_id=run_id,
            occurred_at=at(2),
            step_id="draft",
            attempt=1,
            kind="llm",
            config={"prompt": "about {{ input.topic }}"},
        ),
        StepStarted(run_id=run_id, occurred_at=at(3), step_id="draft", attempt=1, worker="w1"),
        StepFailed(
            run_id=run_id,
            occurred_at=at(4),
            step_id="draft",
            attempt=1,
            error=boom,
            input={"prompt": "about otters"},
            metrics=usage,
            started_at=at(3),
            worker="w1",
        ),
        StepRetrying(
            run_id=run_id,
            occurred_at=at(4.5),
            step_id="draft",
            attempt=1,
            next_attempt=2,
            retry_at=at(5),
            error=boom,
        ),
        StepScheduled(
            run_id=run_id,
            occurred_at=at(5),
            step_id="draft",
            attempt=2,
            kind="llm",
            config={"prompt": "about {{ input.topic }}"},
        ),
        StepStarted(run_id=run_id, occurred_at=at(6), step_id="draft", attempt=2, worker="w2"),
        StepProgress(
            run_id=run_id,
            occurred_at=at(6.5),
            step_id="draft",
            attempt=2,
            progress=0.3,
            message="thinking",
        ),
        StepProgress(
            run_id=run_id,
            occurred_at=at(6.8),
            step_id="draft",
            attempt=2,
            progress=0.9,
            message="writing",
        ),
        StepCompleted(
            run_id=run_id,
            occurred_at=at(8),
            step_id="draft",
            attempt=2,
            output={"title": "Otters"},
            input={"prompt": "about otters"},
            metrics=usage,
            started_at=at(6),
            worker="w2",
        ),
        *(
            ev
            for i in range(2)
            for ev in (
                StepScheduled(
                    run_id=run_id,
                    occurred_at=at(9),
                    step_id="fan",
                    attempt=1,
                    kind="http",
                    item_index=i,
                    config={"url": "{{ item }}"},
                ),
                StepCompleted(
                    run_id=run_id,
                    occurred_at=at(10 + i),
                    step_id="fan",
                    attempt=1,
                    item_index=i,
                    output=i,
                ),
            )
        ),
        StepSkipped(run_id=run_id, occurred_at=at(11), step_id="notify", reason="when: false"),
        RunParked(run_id=run_id, occurred_at=at(12), step_id="review"),
        RunResumed(run_id=run_id, occurred_at=at(13), step_id="review"),
        RunCompleted(run_id=run_id, occurred_at=at(14), output={"title": "Otters"}),
        CancelRun(run_id=run_id, occurred_at=at(15), reason="too late"),
    ]


async def project_all(engine: AsyncEngine, events: list[Event]) -> list[bool]:
    return [await record_event(engine, event, _origin(event)) for event in events]


async def snapshot(engine: AsyncEngine, run_id: uuid.UUID) -> dict[str, Any]:
    """The run's rows, without what legitimately differs between two projections."""
    async with engine.connect() as conn:
        run = (await conn.execute(select(runs).where(runs.c.id == run_id))).mappings().one()
        attempts = (
            await conn.execute(
                select(step_attempts)
                .where(step_attempts.c.run_id == run_id)
                .order_by(step_attempts.c.step_id, step_attempts.c.attempt, "item_index")
            )
        ).mappings()
        errs = (
            await conn.execute(
                select(errors.c.scope, errors.c.step_id, errors.c.type, errors.c.pipeline)
                .where(errors.c.run_id == run_id)
                .order_by(errors.c.occurred_at)
            )
        ).all()
    drop = {"id", "run_id", "updated_at"}
    return {
        "run": {k: v for k, v in run.items() if k not in drop},
        "attempts": [{k: v for k, v in a.items() if k not in drop} for a in attempts],
        "errors": errs,
    }


async def test_a_whole_run_is_projected(engine: AsyncEngine) -> None:
    run_id = uuid.uuid4()
    assert all(await project_all(engine, history(run_id)))
    got = await snapshot(engine, run_id)

    run = got["run"]
    assert run["pipeline"] == "article"
    assert run["version"] == 2
    assert run["status"] == "succeeded"
    assert run["input"] == {"topic": "otters"}
    assert run["output"] == {"title": "Otters"}
    assert run["requested_at"] == at(-1)
    assert run["started_at"] == at(1)
    assert run["finished_at"] == at(14)
    assert run["idempotency_key"] == "k-1"
    assert run["requested_by"] == "alice"
    # both draft attempts were billed: the failed one too
    assert run["tokens"] == 240
    assert run["cost"] == pytest.approx(0.02)

    by_key = {(a["step_id"], a["attempt"], a["item_index"]): a for a in got["attempts"]}
    assert set(by_key) == {
        ("draft", 1, -1),
        ("draft", 2, -1),
        ("fan", 1, 0),
        ("fan", 1, 1),
        ("notify", 1, -1),
    }
    failed = by_key[("draft", 1, -1)]
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "RateLimited"
    assert failed["input"] == {"prompt": "about otters"}  # rendered, not the template
    assert (failed["started_at"], failed["finished_at"]) == (at(3), at(4))
    done = by_key[("draft", 2, -1)]
    assert done["status"] == "succeeded"
    assert done["kind"] == "llm"
    assert done["output"] == {"title": "Otters"}
    assert done["metrics"]["tokens_in"] == 100
    assert done["worker"] == "w2"
    assert (done["scheduled_at"], done["started_at"], done["finished_at"]) == (at(5), at(6), at(8))
    assert (done["progress"], done["progress_message"]) == (0.9, "writing")
    fan = by_key[("fan", 1, 1)]
    assert (fan["status"], fan["output"], fan["input"]) == ("succeeded", 1, {"url": "{{ item }}"})
    skipped = by_key[("notify", 1, -1)]
    assert (skipped["status"], skipped["reason"]) == ("skipped", "when: false")

    assert got["errors"] == [("step", "draft", "RateLimited", "article")]
    async with engine.connect() as conn:
        logged = await conn.scalar(
            select(event_log.c.type).where(
                event_log.c.type == "CancelRun", event_log.c.run_id == run_id
            )
        )
    assert logged == "CancelRun"


@pytest.mark.parametrize("seed", range(6))
async def test_any_delivery_order_gives_the_same_rows(engine: AsyncEngine, seed: int) -> None:
    in_order, shuffled = uuid.uuid4(), uuid.uuid4()
    await project_all(engine, history(in_order))
    events = history(shuffled)
    random.Random(seed).shuffle(events)
    await project_all(engine, events)
    assert await snapshot(engine, shuffled) == await snapshot(engine, in_order)


async def test_completion_before_schedule_and_run_end_before_start(engine: AsyncEngine) -> None:
    """The cases that happen for real: steps.completed is read before runs.events."""
    run_id = uuid.uuid4()
    events = history(run_id)
    completed = next(e for e in events if isinstance(e, StepCompleted) and e.attempt == 2)
    scheduled = next(e for e in events if isinstance(e, StepScheduled) and e.attempt == 2)
    started = next(e for e in events if isinstance(e, RunStarted))
    finished = next(e for e in events if isinstance(e, RunCompleted))
    await project_all(engine, [completed, finished])
    early = await snapshot(engine, run_id)
    assert early["run"]["status"] == "succeeded"
    assert early["run"]["pipeline"] is None  # not known until RunQueued is read
    assert early["attempts"][0]["status"] == "succeeded"

    await project_all(engine, [scheduled, started])
    late = await snapshot(engine, run_id)
    assert late["run"]["status"] == "succeeded"  # never moves backwards
    assert late["run"]["started_at"] == at(1)  # but fills what it did not know
    assert late["run"]["finished_at"] == at(14)
    attempt = late["attempts"][0]
    assert (attempt["status"], attempt["kind"], attempt["scheduled_at"]) == (
        "succeeded",
        "llm",
        at(5),
    )
    assert attempt["input"] == {"prompt": "about otters"}  # the runner's, not the template

    await project_all(
        engine, [e for e in events if e not in (completed, scheduled, started, finished)]
    )
    reference = uuid.uuid4()
    await project_all(engine, history(reference))
    assert await snapshot(engine, run_id) == await snapshot(engine, reference)


async def test_an_attempt_without_step_scheduled_is_whole(engine: AsyncEngine) -> None:
    """Schedulers no longer publish StepScheduled: the runner's StepStarted (for a step
    that ran a while) and its result carry the kind and the dispatch time."""
    run_id = uuid.uuid4()
    common = {"run_id": run_id, "step_id": "draft", "attempt": 1, "kind": "llm"}
    quick = StepCompleted(
        **common, occurred_at=at(3), scheduled_at=at(1), started_at=at(2), worker="w", output=1
    )
    begun = RunStarted(run_id=run_id, occurred_at=at(0), pipeline="article", version=2)
    await project_all(engine, [begun, quick])
    (attempt,) = (await snapshot(engine, run_id))["attempts"]
    assert (attempt["status"], attempt["kind"]) == ("succeeded", "llm")
    assert (attempt["scheduled_at"], attempt["started_at"], attempt["finished_at"]) == (
        at(1),
        at(2),
        at(3),
    )

    slow = uuid.uuid4()
    started = StepStarted(
        **{**common, "run_id": slow}, occurred_at=at(2), scheduled_at=at(1), worker="w"
    )
    begun = RunStarted(run_id=slow, occurred_at=at(0), pipeline="article", version=2)
    await project_all(engine, [begun, started])
    (running,) = (await snapshot(engine, slow))["attempts"]
    assert (running["status"], running["kind"], running["scheduled_at"]) == (
        "running",
        "llm",
        at(1),
    )
    # an older runner's result says neither: what the row has stays
    older = StepCompleted(
        run_id=slow, step_id="draft", attempt=1, occurred_at=at(3), started_at=at(2), output=1
    )
    await project_all(engine, [older])
    (done,) = (await snapshot(engine, slow))["attempts"]
    assert (done["status"], done["kind"], done["scheduled_at"]) == ("succeeded", "llm", at(1))


async def test_parked_and_resumed_follow_the_latest_event(engine: AsyncEngine) -> None:
    """Same rank, so the later event wins, whichever is read first."""
    resumed_last, parked_last = uuid.uuid4(), uuid.uuid4()
    for run_id, parked, resumed in ((resumed_last, 12, 13), (parked_last, 14, 13)):
        await project_all(
            engine,
            [
                RunResumed(run_id=run_id, occurred_at=at(resumed), step_id="review"),
                RunParked(run_id=run_id, occurred_at=at(parked), step_id="review"),
                RunStarted(run_id=run_id, occurred_at=at(1), pipeline="p", version=1),
                RunQueued(run_id=run_id, occurred_at=at(0), pipeline="p"),
            ],
        )
    assert (await snapshot(engine, resumed_last))["run"]["status"] == "running"
    assert (await snapshot(engine, parked_last))["run"]["status"] == "parked"


async def test_a_redelivered_event_changes_nothing(engine: AsyncEngine) -> None:
    run_id = uuid.uuid4()
    events = history(run_id)
    await project_all(engine, events)
    before = await snapshot(engine, run_id)
    assert not any(await project_all(engine, events))  # every one already recorded
    after = await snapshot(engine, run_id)
    assert after == before
    assert after["run"]["tokens"] == 240  # not double counted
    async with engine.connect() as conn:
        count = await conn.scalar(
            select(func.count()).select_from(event_log).where(event_log.c.run_id == run_id)
        )
    assert count == len(events)


async def test_run_failure_is_an_error_with_its_pipeline(engine: AsyncEngine) -> None:
    run_id = uuid.uuid4()
    failure = ErrorInfo(type="StepFailed", message="draft failed 3 times", traceback="tb")
    await project_all(
        engine,
        [
            RunFailed(run_id=run_id, occurred_at=at(9), error=failure, step_id="draft"),
            RunQueued(run_id=run_id, occurred_at=at(0), pipeline="article", input={}),
        ],
    )
    got = await snapshot(engine, run_id)
    assert got["run"]["status"] == "failed"
    assert got["run"]["error"]["message"] == "draft failed 3 times"
    assert got["run"]["finished_at"] == at(9)
    # the pipeline was learnt after the error was recorded, and filled in
    assert got["errors"] == [("run", "draft", "StepFailed", "article")]


async def test_dead_letter_lands_in_dead_letters_and_errors(engine: AsyncEngine) -> None:
    run_id = uuid.uuid4()
    await project_all(engine, [RunQueued(run_id=run_id, occurred_at=at(0), pipeline="leads")])
    body = f'{{"type": "StepCompleted", "run_id": "{run_id}", "step_id": 7}}'.encode()
    letter = DeadLetter(
        source_topic="conveyor.steps.completed",
        partition=3,
        offset=42,
        consumer_group="conveyor.scheduler",
        reason="invalid event: step_id: Input should be a valid string\ndetails here",
        key_b64=base64.b64encode(b"k").decode(),
        value_b64=base64.b64encode(body).decode(),
        headers={"traceparent": "00-abc"},
    )
    assert await record_event(engine, letter, Origin("conveyor.dlq"))
    assert not await record_event(engine, letter, Origin("conveyor.dlq"))
    async with engine.connect() as conn:
        stored = (
            (
                await conn.execute(
                    select(dead_letters).where(dead_letters.c.event_id == letter.event_id)
                )
            )
            .mappings()
            .one()
        )
        error = (
            (await conn.execute(select(errors).where(errors.c.event_id == letter.event_id)))
            .mappings()
            .one()
        )
        logged_run = await conn.scalar(
            select(event_log.c.run_id).where(event_log.c.event_id == letter.event_id)
        )
    assert stored["source_topic"] == "conveyor.steps.completed"
    assert (stored["partition"], stored["offset"]) == (3, 42)
    assert base64.b64decode(stored["value_b64"]) == body
    assert stored["headers"] == {"traceparent": "00-abc"}
    assert error["scope"] == "dead_letter"
    assert error["type"] == "DeadLetter"
    assert error["message"] == "invalid event: step_id: Input should be a valid string"
    assert error["traceback"] == "details here"
    # the body named its run: the dead letter is filed under it and its pipeline
    assert (error["run_id"], error["pipeline"], logged_run) == (run_id, "leads", run_id)


async def test_nul_characters_are_stored_without_them(engine: AsyncEngine) -> None:
    run_id = uuid.uuid4()
    await record_event(
        engine,
        StepCompleted(run_id=run_id, step_id="s\x00", attempt=1, output={"text": "a\x00b"}),
        STEPS_COMPLETED,
    )
    async with engine.connect() as conn:
        row = (
            (await conn.execute(select(step_attempts).where(step_attempts.c.run_id == run_id)))
            .mappings()
            .one()
        )
    assert (row["step_id"], row["output"]) == ("s", {"text": "ab"})


async def test_pipeline_versions_are_recorded_once(engine: AsyncEngine) -> None:
    name = f"p-{uuid.uuid4().hex[:6]}"
    first = PipelineRegistered(name=name, version=1, digest="d1", spec={"steps": []})
    again = PipelineRegistered(name=name, version=1, digest="other", spec={})
    second = PipelineRegistered(name=name, version=2, digest="d2", spec={"steps": [1]})
    await project_all(engine, [first, again, second])
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(pipelines.c.version, pipelines.c.digest)
                .where(pipelines.c.name == name)
                .order_by(pipelines.c.version)
            )
        ).all()
    assert rows == [(1, "d1"), (2, "d2")]


def test_migrations_match_the_table_definitions(migrated: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    sync = create_engine(database_url(migrated))
    try:
        with sync.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"include_schemas": True, "compare_server_default": False}
            )
            diff = [
                d
                for d in compare_metadata(context, metadata)
                if not (d[0] == "remove_table" and d[1].name == "alembic_version")
            ]
    finally:
        sync.dispose()
    assert diff == []


async def test_an_unreachable_database_is_waited_for_then_reported() -> None:
    from sqlalchemy.exc import OperationalError

    from conveyor.cli.stack import free_port

    nowhere = create_db_engine(
        DatabaseSettings(url=f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    )
    event = RunQueued(run_id=uuid.uuid4(), pipeline="p")
    started = asyncio.get_running_loop().time()
    try:
        with pytest.raises(OperationalError):
            await record_event(nowhere, event, RUNS_EVENTS, patience=0.5)
    finally:
        await nowhere.dispose()
    assert asyncio.get_running_loop().time() - started >= 0.5


async def test_the_sql_status_ranks_match_the_python_ones(engine: AsyncEngine) -> None:
    from sqlalchemy import text

    from conveyor.run_recorder._merge import ATTEMPT_STATUS_RANK, RUN_STATUS_RANK

    async with engine.connect() as conn:
        for function, ranks in (
            ("run_rank", RUN_STATUS_RANK),
            ("attempt_rank", ATTEMPT_STATUS_RANK),
        ):
            for status, rank in {**ranks, "bogus": -1}.items():
                got = await conn.scalar(text(f"SELECT recorder.{function}(:s)"), {"s": status})
                assert got == rank, (function, status)
