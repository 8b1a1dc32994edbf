"""The schedule routes of the control API and ``conveyor schedules`` against them, served
for real (uvicorn on a free port) over a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import select
from typer.testing import CliRunner

from conveyor.cli import stack
from conveyor.cli.commands_schedules import app as schedules_cli
from conveyor.contracts import Topics, load_pipeline
from conveyor.runtime import DatabaseSettings, create_db_engine, upgrade_schema
from conveyor.scheduler import tables
from conveyor.scheduler.cron import sync_schedule
from conveyor.scheduler.cron_api import cron_router
from conveyor.scheduler.main import MIGRATIONS
from conveyor.scheduler.registry import register_pipeline
from conveyor.scheduler.scheduling import Scheduler

TOPICS = Topics(f"t{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def api_url(database_url: str) -> Iterator[str]:
    upgrade_schema(database_url, migrations=Path(MIGRATIONS), schema="scheduler")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_db_engine(DatabaseSettings(url=database_url))
        scheduler = Scheduler(engine=engine, topics=TOPICS, relay=None)
        app.include_router(cron_router(scheduler))
        yield
        await engine.dispose()

    port = stack.free_port()
    server = uvicorn.Server(
        uvicorn.Config(FastAPI(lifespan=lifespan), port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
async def scheduler(database_url: str) -> AsyncIterator[Scheduler]:
    engine = create_db_engine(DatabaseSettings(url=database_url))
    yield Scheduler(engine=engine, topics=TOPICS, relay=None)
    await engine.dispose()


@pytest.fixture
async def scheduled(api_url: str, scheduler: Scheduler) -> str:
    """A registered pipeline with an hourly schedule in Paris; its name."""
    name = f"hourly-{uuid.uuid4().hex[:6]}"
    spec = load_pipeline(
        f"name: {name}\nschedule: {{cron: '0 * * * *', timezone: Europe/Paris}}\n"
        "steps: [{id: a, type: transform, with: {template: x}}]\n"
    )
    await register_pipeline(scheduler, spec, source_file=None)
    async with scheduler.unit_of_work() as uow:
        await sync_schedule(uow.conn, spec, now=datetime.now(UTC))
        await uow.commit()
    return name


def cli(api_url: str, *args: str) -> Any:
    env = {"CONVEYOR_API_URL": api_url, "COLUMNS": "200"}
    # Off the event loop: the CLI is synchronous and the API answers from another thread.
    return asyncio.to_thread(CliRunner().invoke, schedules_cli, list(args), env=env)


async def _schedule_updates(scheduler: Scheduler, name: str) -> list[dict[str, Any]]:
    o = tables.outbox
    async with scheduler.engine.connect() as conn:
        rows = (await conn.execute(select(o.c.topic, o.c.payload).order_by(o.c.id))).all()
    bodies = [json.loads(r.payload) for r in rows if r.topic == TOPICS.pipelines]
    return [b for b in bodies if b["type"] == "ScheduleUpdated" and b["name"] == name]


async def test_list_json_shows_each_schedule(api_url: str, scheduled: str) -> None:
    result = await cli(api_url, "list", "--json")
    assert result.exit_code == 0, result.output
    items = {i["pipeline"]: i for i in json.loads(result.output)["items"]}
    item = items[scheduled]
    assert set(item) == {
        "pipeline",
        "cron",
        "timezone",
        "catch_up",
        "paused",
        "next_fire_at",
        "last_fired_at",
    }
    assert (item["cron"], item["timezone"], item["catch_up"]) == (
        "0 * * * *",
        "Europe/Paris",
        "skip",
    )
    assert item["paused"] is False
    assert item["last_fired_at"] is None
    assert datetime.fromisoformat(item["next_fire_at"]).minute == 0


async def test_pause_and_resume_through_the_cli(
    api_url: str, scheduled: str, scheduler: Scheduler
) -> None:
    result = await cli(api_url, "pause", scheduled, "--by", "ada")
    assert result.exit_code == 0, result.output
    assert f"{scheduled}: paused" in result.output
    table = await cli(api_url, "list")
    line = next(line for line in table.output.splitlines() if line.startswith(scheduled))
    assert "paused" in line
    assert "Europe/Paris" in line

    again = await cli(api_url, "pause", scheduled, "--by", "ada")
    assert again.exit_code == 0
    assert "already paused" in again.output

    resumed = await cli(api_url, "resume", scheduled, "--by", "ada")
    assert resumed.exit_code == 0, resumed.output
    assert f"{scheduled}: resumed, next run at" in resumed.output

    updates = await _schedule_updates(scheduler, scheduled)
    assert [(u["paused"], u["updated_by"]) for u in updates] == [(True, "ada"), (False, "ada")]


async def test_a_pipeline_without_a_schedule_is_one_line_and_status_2(api_url: str) -> None:
    result = await cli(api_url, "pause", "nothing-here")
    assert result.exit_code == 2
    assert result.output.strip() == "error: pipeline 'nothing-here' has no schedule"


async def test_the_api_answers_404_with_the_detail_and_takes_no_body(api_url: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=api_url) as http:
        missing = await http.post("/pipelines/nothing-here/unpause")
        assert missing.status_code == 404
        assert missing.json() == {"detail": "pipeline 'nothing-here' has no schedule"}
        listed = await http.get("/schedules")
        assert listed.status_code == 200
        assert isinstance(listed.json()["items"], list)


async def test_pausing_without_a_body_records_no_author(
    api_url: str, scheduled: str, scheduler: Scheduler
) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=api_url) as http:
        paused = await http.post(f"/pipelines/{scheduled}/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["paused"] is True
    updates = await _schedule_updates(scheduler, scheduled)
    assert [(u["paused"], u["updated_by"]) for u in updates] == [(True, None)]


async def test_unreachable_api_is_one_line_and_status_2() -> None:
    result = await cli(f"http://127.0.0.1:{stack.free_port()}", "list")
    assert result.exit_code == 2
    assert result.output.startswith("error: cannot reach the control API")
