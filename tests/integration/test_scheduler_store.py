"""The scheduler's use cases against a real PostgreSQL: what one event does to the state
and to the outbox, redelivery, idempotency keys and durable retry timers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from conveyor.contracts import (
    ErrorInfo,
    RunRequested,
    StepCompleted,
    StepFailed,
    Topics,
    load_pipeline,
)
from conveyor.runtime import DatabaseSettings, Undeliverable, create_db_engine, upgrade_schema
from conveyor.scheduler import tables
from conveyor.scheduler.main import MIGRATIONS
from conveyor.scheduler.registry import register_pipeline
from conveyor.scheduler.scheduling import Scheduler

PIPELINE = """
name: two-steps
input: {name: {type: string}}
steps:
  - id: greet
    type: transform
    with: {template: "hi {{ input.name }}"}
  - id: call
    type: http
    retry: {max_attempts: 2, initial: 10ms, max: 10ms, jitter: false}
    with: {url: "http://127.0.0.1:9/{{ steps.greet.output }}"}
"""


@pytest.fixture(scope="module")
def migrated(database_url: str) -> str:
    upgrade_schema(database_url, migrations=Path(MIGRATIONS), schema="scheduler")
    # a second run is a no-op: migrations are applied at every service start
    upgrade_schema(database_url, migrations=Path(MIGRATIONS), schema="scheduler")
    return database_url


@pytest.fixture
async def scheduler(migrated: str) -> AsyncIterator[Scheduler]:
    engine = create_db_engine(DatabaseSettings(url=migrated))
    scheduler = Scheduler(engine=engine, topics=Topics(f"t{uuid.uuid4().hex[:8]}"), relay=None)
    await register_pipeline(scheduler, load_pipeline(PIPELINE), source_file="p.yaml")
    yield scheduler
    await engine.dispose()


async def _outbox(scheduler: Scheduler, run_id: uuid.UUID) -> list[tuple[str, str]]:
    """(topic suffix, event type) staged for ``run_id``, in order."""
    o = tables.outbox
    async with scheduler.engine.connect() as conn:
        rows = (await conn.execute(select(o.c.topic, o.c.payload).order_by(o.c.id))).all()
    found = []
    for row in rows:
        if str(run_id).encode() in row.payload:
            import json

            found.append((row.topic.split(".", 1)[1], json.loads(row.payload)["type"]))
    return found


async def _run_row(scheduler: Scheduler, run_id: uuid.UUID):  # type: ignore[no-untyped-def]
    async with scheduler.engine.connect() as conn:
        return (await conn.execute(select(tables.runs).where(tables.runs.c.id == run_id))).first()


async def test_a_request_creates_the_run_and_stages_its_first_step(scheduler: Scheduler) -> None:
    request = RunRequested(pipeline="two-steps", input={"name": "Ada"})
    await scheduler.run_requested(request)
    run_id = request.resolved_run_id()
    assert await _outbox(scheduler, run_id) == [
        ("runs.events", "RunQueued"),
        ("runs.events", "RunStarted"),
        ("steps.ready.transform", "StepReady"),
    ]
    row = await _run_row(scheduler, run_id)
    assert row.status == "running"
    assert row.version == 1
    assert row.steps["greet"]["status"] == "scheduled"


async def test_a_redelivered_request_changes_nothing(scheduler: Scheduler) -> None:
    request = RunRequested(pipeline="two-steps", input={"name": "Ada"})
    await scheduler.run_requested(request)
    await scheduler.run_requested(request)
    assert len(await _outbox(scheduler, request.resolved_run_id())) == 3


async def test_one_idempotency_key_makes_one_run(scheduler: Scheduler) -> None:
    key = uuid.uuid4().hex
    first = RunRequested(pipeline="two-steps", input={"name": "A"}, idempotency_key=key)
    second = RunRequested(pipeline="two-steps", input={"name": "B"}, idempotency_key=key)
    await asyncio.gather(scheduler.run_requested(first), scheduler.run_requested(second))
    async with scheduler.engine.connect() as conn:
        count = await conn.scalar(select(func.count()).where(tables.runs.c.idempotency_key == key))
    assert count == 1


async def test_an_idempotency_key_frees_up_after_its_window(scheduler: Scheduler) -> None:
    key = uuid.uuid4().hex
    first = RunRequested(pipeline="two-steps", input={"name": "A"}, idempotency_key=key)
    await scheduler.run_requested(first)
    k = tables.idempotency_keys
    async with scheduler.engine.begin() as conn:
        held = await conn.scalar(select(k.c.run_id).where(k.c.key == key))
        assert held == first.resolved_run_id()
        expired = datetime.now(UTC) - timedelta(seconds=1)
        await conn.execute(update(k).where(k.c.key == key).values(expires_at=expired))
    later = RunRequested(pipeline="two-steps", input={"name": "B"}, idempotency_key=key)
    await scheduler.run_requested(later)
    assert await _run_row(scheduler, later.resolved_run_id()) is not None


async def test_unknown_pipeline_fails_the_run_with_a_clear_reason(scheduler: Scheduler) -> None:
    request = RunRequested(pipeline="no-such-pipeline")
    # The run fails, and the request is dead-lettered too (the consumer guard does that).
    with pytest.raises(Undeliverable, match="no pipeline named 'no-such-pipeline'"):
        await scheduler.run_requested(request)
    row = await _run_row(scheduler, request.resolved_run_id())
    assert row.status == "failed"
    assert row.error["type"] == "UnknownPipeline"
    assert "no pipeline named 'no-such-pipeline'" in row.error["message"]
    assert [t for _, t in await _outbox(scheduler, request.resolved_run_id())] == [
        "RunQueued",
        "RunFailed",
    ]


async def test_invalid_input_fails_the_run_naming_the_input(scheduler: Scheduler) -> None:
    request = RunRequested(pipeline="two-steps", input={"name": 42})
    # the failed run is committed, and the request itself goes to the dead-letter topic
    with pytest.raises(Undeliverable, match="input 'name' must be string, got number 42"):
        await scheduler.run_requested(request)
    row = await _run_row(scheduler, request.resolved_run_id())
    assert row.status == "failed"
    assert row.error == {
        "type": "InvalidInput",
        "message": "input 'name' must be string, got number 42",
        "traceback": None,
        "retryable": False,
        "retry_after_s": None,
        "details": None,
    }


async def test_results_advance_the_run_and_a_duplicate_result_is_ignored(
    scheduler: Scheduler,
) -> None:
    request = RunRequested(pipeline="two-steps", input={"name": "Ada"})
    await scheduler.run_requested(request)
    run_id = request.resolved_run_id()
    done = StepCompleted(run_id=run_id, step_id="greet", attempt=1, output="hi Ada")
    await scheduler.step_result(done)
    await scheduler.step_result(done)
    await scheduler.step_result(
        StepCompleted(run_id=run_id, step_id="greet", attempt=1, output="again")
    )
    staged = await _outbox(scheduler, run_id)
    assert staged.count(("steps.ready.http", "StepReady")) == 1
    row = await _run_row(scheduler, run_id)
    greet = row.steps["greet"]
    assert (greet["status"], greet["attempt"], greet["output"]) == ("succeeded", 1, "hi Ada")


async def test_a_retryable_failure_waits_on_a_durable_timer(scheduler: Scheduler) -> None:
    request = RunRequested(pipeline="two-steps", input={"name": "Ada"})
    await scheduler.run_requested(request)
    run_id = request.resolved_run_id()
    await scheduler.step_result(
        StepCompleted(run_id=run_id, step_id="greet", attempt=1, output="x")
    )
    error = ErrorInfo(type="HttpStatusError", message="500", retryable=True)
    await scheduler.step_result(StepFailed(run_id=run_id, step_id="call", attempt=1, error=error))
    async with scheduler.engine.connect() as conn:
        timer = (
            await conn.execute(select(tables.timers).where(tables.timers.c.run_id == run_id))
        ).one()
    assert timer.attempt == 2
    # A fresh scheduler (a restart) finds the timer in the database and fires it.
    restarted = Scheduler(engine=scheduler.engine, topics=scheduler.topics, relay=None)
    async with scheduler.engine.begin() as conn:
        await conn.execute(
            update(tables.timers)
            .where(tables.timers.c.id == timer.id)
            .values(due_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    await restarted.fire_due_timers()
    staged = await _outbox(scheduler, run_id)
    assert staged[-2:] == [
        ("runs.events", "StepRetrying"),
        ("steps.ready.http", "StepReady"),
    ]
    await scheduler.step_result(StepFailed(run_id=run_id, step_id="call", attempt=2, error=error))
    row = await _run_row(scheduler, run_id)
    assert row.status == "failed"
    assert row.finished_at is not None


async def test_a_result_for_a_run_that_does_not_exist_is_undeliverable(
    scheduler: Scheduler,
) -> None:
    with pytest.raises(Undeliverable, match="does not exist"):
        await scheduler.step_result(StepCompleted(run_id=uuid.uuid4(), step_id="a", attempt=1))


async def test_registering_the_same_definition_twice_keeps_one_version(
    scheduler: Scheduler,
) -> None:
    spec = load_pipeline(PIPELINE.replace("two-steps", f"p-{uuid.uuid4().hex[:6]}"))
    first = await register_pipeline(scheduler, spec, source_file=None)
    again = await register_pipeline(scheduler, spec, source_file=None)
    changed = await register_pipeline(
        scheduler,
        load_pipeline(PIPELINE.replace("two-steps", spec.name).replace("hi", "hello")),
        source_file=None,
    )
    assert (first.version, first.created) == (1, True)
    assert (again.version, again.created) == (1, False)
    assert (changed.version, changed.created) == (2, True)


DIAMOND = """
name: diamond
steps:
  - {id: a, type: transform, needs: [], with: {template: "a"}}
  - {id: b, type: transform, needs: [], with: {template: "b"}}
  - {id: join, type: transform, needs: [a, b], with: {template: "j"}}
"""


async def test_a_join_starts_once_both_parallel_branches_are_done(scheduler: Scheduler) -> None:
    await register_pipeline(scheduler, load_pipeline(DIAMOND), source_file=None)
    request = RunRequested(pipeline="diamond")
    await scheduler.run_requested(request)
    run_id = request.resolved_run_id()
    assert (await _outbox(scheduler, run_id)).count(("steps.ready.transform", "StepReady")) == 2
    await scheduler.step_result(StepCompleted(run_id=run_id, step_id="a", attempt=1, output="A"))
    row = await _run_row(scheduler, run_id)
    assert row.steps["a"]["status"] == "succeeded"
    await scheduler.step_result(StepCompleted(run_id=run_id, step_id="b", attempt=1, output="B"))
    assert (await _outbox(scheduler, run_id)).count(("steps.ready.transform", "StepReady")) == 3


async def test_a_step_with_a_timeout_gets_a_deadline_that_its_result_clears(
    scheduler: Scheduler,
) -> None:
    name = f"deadline-{uuid.uuid4().hex[:6]}"
    await register_pipeline(
        scheduler,
        load_pipeline(
            f"name: {name}\nsteps: [{{id: a, type: http, timeout: 1s, with: {{url: 'http://x'}}}}]"
        ),
        source_file=None,
    )
    request = RunRequested(pipeline=name)
    await scheduler.run_requested(request)
    run_id = request.resolved_run_id()
    t = tables.timers
    async with scheduler.engine.connect() as conn:
        [deadline] = (await conn.execute(select(t).where(t.c.run_id == run_id))).all()
    assert deadline.kind == "deadline"
    # fired before any result: the attempt is dispatched again (its runner vanished)
    async with scheduler.engine.begin() as conn:
        past = datetime.now(UTC) - timedelta(seconds=1)
        await conn.execute(update(t).where(t.c.id == deadline.id).values(due_at=past))
    await scheduler.fire_due_timers()
    staged = await _outbox(scheduler, run_id)
    assert staged.count(("steps.ready.http", "StepReady")) == 2
    await scheduler.step_result(StepCompleted(run_id=run_id, step_id="a", attempt=1, output=1))
    async with scheduler.engine.connect() as conn:
        left = (await conn.execute(select(t).where(t.c.run_id == run_id))).all()
    assert left == []
    assert (await _run_row(scheduler, run_id)).status == "succeeded"


async def test_a_run_over_a_park_budget_waits_for_resume(scheduler: Scheduler) -> None:
    from conveyor.contracts import ResumeRun, StepMetrics

    name = f"budget-{uuid.uuid4().hex[:6]}"
    await register_pipeline(
        scheduler,
        load_pipeline(
            f"""
name: {name}
budget: {{max_cost: 0.01, on_exceed: park}}
steps:
  - {{id: a, type: transform, with: {{template: "a"}}}}
  - {{id: b, type: transform, with: {{template: "b"}}}}
"""
        ),
        source_file=None,
    )
    request = RunRequested(pipeline=name)
    await scheduler.run_requested(request)
    run_id = request.resolved_run_id()
    expensive = StepMetrics(cost=0.05, tokens_in=10, tokens_out=10)
    await scheduler.step_result(
        StepCompleted(run_id=run_id, step_id="a", attempt=1, output="A", metrics=expensive)
    )
    row = await _run_row(scheduler, run_id)
    assert (row.status, row.cost) == ("parked", 0.05)
    assert (await _outbox(scheduler, run_id))[-1] == ("runs.events", "RunParked")
    await scheduler.resume(ResumeRun(run_id=run_id))
    staged = await _outbox(scheduler, run_id)
    assert staged[-2:] == [
        ("runs.events", "RunResumed"),
        ("steps.ready.transform", "StepReady"),
    ]
    assert (await _run_row(scheduler, run_id)).budget_grants == 2


async def test_a_step_whose_input_is_over_a_message_fails_instead_of_wedging_the_outbox(
    scheduler: Scheduler,
) -> None:
    """A StepReady the broker would refuse is never staged (the relay keeps the outbox's
    order, so it would hold every run's events behind it): the attempt fails as if a runner
    said so, not retryable, and the run fails naming the step and the sizes."""
    from conveyor.scheduler.effects import MAX_DISPATCH_BYTES

    request = RunRequested(pipeline="two-steps", input={"name": "Ada"})
    await scheduler.run_requested(request)
    run_id = request.resolved_run_id()
    huge = "x" * (MAX_DISPATCH_BYTES + 1)  # the next step's context carries it
    await scheduler.step_result(
        StepCompleted(run_id=run_id, step_id="greet", attempt=1, output=huge)
    )

    staged = await _outbox(scheduler, run_id)
    assert ("steps.ready.http", "StepReady") not in staged
    assert staged[-1] == ("steps.completed", "StepFailed")
    o = tables.outbox
    async with scheduler.engine.connect() as conn:
        payloads = (await conn.execute(select(o.c.payload).order_by(o.c.id))).scalars().all()
    assert max(len(p) for p in payloads if str(run_id).encode() in p) < 10_000
    failed = StepFailed.model_validate_json(payloads[-1])
    assert (failed.step_id, failed.attempt, failed.kind) == ("call", 1, "http")
    assert failed.error.type == "InputTooLarge"
    assert not failed.error.retryable
    assert "'call'" in failed.error.message
    assert str(MAX_DISPATCH_BYTES) in failed.error.message

    await scheduler.step_result(failed)  # what the scheduler reads back from the topic
    row = await _run_row(scheduler, run_id)
    assert row.status == "failed"
    assert row.steps["call"]["status"] == "failed"
