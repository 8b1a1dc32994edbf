"""``auto: {resolve: run_start}`` against a real PostgreSQL: a run dispatches its ``auto``
step first, and its steps get the answered config once that step completed; registering
asks no model."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from conveyor.contracts import (
    ErrorInfo,
    RunRequested,
    StepCompleted,
    StepFailed,
    Topics,
    load_pipeline,
)
from conveyor.runtime import DatabaseSettings, create_db_engine, upgrade_schema
from conveyor.scheduler import tables
from conveyor.scheduler.auto import AutoSettings
from conveyor.scheduler.main import MIGRATIONS
from conveyor.scheduler.registry import register_pipeline
from conveyor.scheduler.scheduling import Scheduler

NAME = f"auto-run-{uuid.uuid4().hex[:6]}"
PIPELINE = f"""
name: {NAME}
auto: {{resolve: run_start}}
input: {{topic: {{type: string}}}}
defaults: {{retry: {{max_attempts: 1}}}}
steps:
  - id: draft
    type: llm
    with:
      model: openai/gpt-4o-mini
      system: "<AUTO>a system prompt for a friendly tutor</AUTO>"
      prompt: "Explain {{{{ input.topic }}}}"
  - id: shout
    type: transform
    with: {{template: "{{{{ steps.draft.output.text | upper }}}}"}}
"""
ANSWER = {"steps__draft__with__system": "You are a patient tutor."}


@pytest.fixture(scope="module")
def migrated(database_url: str) -> str:
    upgrade_schema(database_url, migrations=Path(MIGRATIONS), schema="scheduler")
    return database_url


@pytest.fixture
async def scheduler(migrated: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Scheduler]:
    # no provider at all: registering must not need one
    for var in AutoSettings.model_fields:
        monkeypatch.delenv(var.upper(), raising=False)
    engine = create_db_engine(DatabaseSettings(url=migrated))
    scheduler = Scheduler(engine=engine, topics=Topics(f"t{uuid.uuid4().hex[:8]}"), relay=None)
    await register_pipeline(scheduler, load_pipeline(PIPELINE), source_file="p.yaml")
    yield scheduler
    await engine.dispose()


async def _ready(scheduler: Scheduler, run_id: uuid.UUID) -> list[dict[str, Any]]:
    """The StepReady events staged for ``run_id``, in order."""
    o = tables.outbox
    async with scheduler.engine.connect() as conn:
        rows = (await conn.execute(select(o.c.topic, o.c.payload).order_by(o.c.id))).all()
    events = [json.loads(row.payload) for row in rows if str(run_id).encode() in row.payload]
    return [e for e in events if e["type"] == "StepReady"]


async def _run_row(scheduler: Scheduler, run_id: uuid.UUID) -> Any:
    async with scheduler.engine.connect() as conn:
        return (await conn.execute(select(tables.runs).where(tables.runs.c.id == run_id))).first()


async def test_the_auto_step_runs_first_and_its_answers_fill_the_next_config(
    scheduler: Scheduler,
) -> None:
    async with scheduler.engine.connect() as conn:
        stored = await conn.scalar(
            select(tables.pipelines.c.spec).where(tables.pipelines.c.name == NAME)
        )
    assert [s["id"] for s in stored["steps"]] == ["draft", "shout"]  # stored as written

    request = RunRequested(pipeline=NAME, input={"topic": "tides"})
    await scheduler.run_requested(request)
    run_id = request.resolved_run_id()
    ready = await _ready(scheduler, run_id)
    assert [(e["step_id"], e["kind"]) for e in ready] == [("auto", "llm")]
    assert ready[0]["config"]["output_schema"] == {"steps__draft__with__system": "string"}
    assert "a system prompt for a friendly tutor" in ready[0]["config"]["prompt"]

    await scheduler.step_result(
        StepCompleted(run_id=run_id, step_id="auto", attempt=1, output={"json": ANSWER})
    )
    ready = await _ready(scheduler, run_id)
    assert [e["step_id"] for e in ready] == ["auto", "draft"]
    assert ready[1]["config"] == {
        "model": "openai/gpt-4o-mini",
        "system": "You are a patient tutor.",
        "prompt": "Explain {{ input.topic }}",
    }
    assert "auto" in ready[1]["context"]["steps"]
    row = await _run_row(scheduler, run_id)
    assert row.steps["auto"]["status"] == "succeeded"
    assert row.steps["auto"]["output"] == {"json": ANSWER}

    await scheduler.step_result(
        StepCompleted(run_id=run_id, step_id="draft", attempt=1, output={"text": "ok"})
    )
    await scheduler.step_result(
        StepCompleted(run_id=run_id, step_id="shout", attempt=1, output="OK")
    )
    row = await _run_row(scheduler, run_id)
    assert (row.status, row.output) == ("succeeded", "OK")


async def test_a_failed_auto_step_fails_the_run(scheduler: Scheduler) -> None:
    request = RunRequested(pipeline=NAME, input={"topic": "tides"})
    await scheduler.run_requested(request)
    run_id = request.resolved_run_id()
    error = ErrorInfo(type="auth_error", message="bad key", retryable=False)
    await scheduler.step_result(StepFailed(run_id=run_id, step_id="auto", attempt=1, error=error))
    row = await _run_row(scheduler, run_id)
    assert row.status == "failed"
    assert row.error["type"] == "auth_error"
    assert [e["step_id"] for e in await _ready(scheduler, run_id)] == ["auto"]
