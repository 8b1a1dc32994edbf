"""Malformed definitions sent to the control API against a real PostgreSQL: each is a 422
naming the step and the field, and leaves nothing behind. No pipeline version, no outbox
row, no schedule; the version registered before stays current and still runs.

The definitions are a sample of the table in tests/unit/test_bad_pipelines.py, renamed to
the pipeline already registered here: the sample covers each layer that can refuse
(YAML reader, the value walk, the schema, the graph, templates, kind configs, the declared
input) and the ones that, unchecked, would have reached the database (NUL, NaN).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from conveyor.contracts import Topics, decode_event
from conveyor.runtime import DatabaseSettings, create_db_engine, upgrade_schema
from conveyor.scheduler import tables
from conveyor.scheduler.api import create_api
from conveyor.scheduler.main import MIGRATIONS
from conveyor.scheduler.scheduling import Scheduler
from tests.unit.test_bad_pipelines import BAD_PIPELINES, Bad

NAME = f"bad-reg-{uuid.uuid4().hex[:6]}"
GOOD = f"""
name: {NAME}
input: {{text: {{type: string}}}}
steps:
  - id: echo
    type: transform
    with: {{template: "{{{{ input.text }}}}"}}
"""
SAMPLE = [
    "yaml-syntax",
    "nul-escape-in-json",
    "not-a-number",
    "over-size-limit",
    "too-many-steps",
    "unknown-top-level-field",
    "input-default-wrong-type",
    "schedule-input-misses-required",
    "duplicate-step-id",
    "unknown-kind",
    "cycle-of-three",
    "when-plain-text",
    "template-undeclared-input",
    "http-unknown-method",
    "llm-schema-unknown-type",
]


def _renamed(bad: Bad) -> str:
    assert isinstance(bad.text, str)
    text = bad.text.replace("name: p\n", f"name: {NAME}\n", 1)
    return text.replace('"name": "p"', f'"name": "{NAME}"', 1)


@pytest.fixture(scope="module")
def migrated(database_url: str) -> str:
    upgrade_schema(database_url, migrations=Path(MIGRATIONS), schema="scheduler")
    return database_url


@pytest.fixture(scope="module")
async def scheduler(migrated: str) -> AsyncIterator[Scheduler]:
    engine = create_db_engine(DatabaseSettings(url=migrated))
    yield Scheduler(engine=engine, topics=Topics(f"t{uuid.uuid4().hex[:8]}"), relay=None)
    await engine.dispose()


@pytest.fixture(scope="module")
async def api(scheduler: Scheduler) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_api(scheduler))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        first = await client.post("/pipelines", json={"source": GOOD, "filename": "good.yaml"})
        assert first.status_code == 200, first.text
        assert first.json()["version"] == 1
        yield client


async def _state(scheduler: Scheduler) -> dict[str, Any]:
    """Everything a registration could have written."""
    async with scheduler.engine.connect() as conn:
        p = tables.pipelines
        return {
            "versions": (
                await conn.execute(select(p.c.version).where(p.c.name == NAME))
            ).scalars().all(),
            "outbox": await conn.scalar(select(func.count()).select_from(tables.outbox)),
            "schedules": await conn.scalar(select(func.count()).select_from(tables.schedules)),
            "runs": await conn.scalar(select(func.count()).select_from(tables.runs)),
        }  # fmt: skip


@pytest.mark.parametrize("row", SAMPLE)
async def test_a_malformed_definition_is_a_422_and_leaves_nothing_behind(
    row: str, api: httpx.AsyncClient, scheduler: Scheduler
) -> None:
    bad = BAD_PIPELINES[row]
    before = await _state(scheduler)
    response = await api.post("/pipelines", json={"source": _renamed(bad), "filename": "b.yaml"})
    assert response.status_code == 422, response.text
    problems = response.json()["detail"]["problems"]
    assert all(p["file"] == "b.yaml" for p in problems)
    assert any(
        (p["step"], p["field"]) == (bad.step, bad.field) and bad.fragment in p["message"]
        for p in problems
    ), problems
    assert await _state(scheduler) == before
    listed = (await api.get("/pipelines")).json()["items"]
    assert [p["latest_version"] for p in listed if p["name"] == NAME] == [1]


async def test_one_definition_with_many_problems_reports_all_of_them_at_once(
    api: httpx.AsyncClient, scheduler: Scheduler
) -> None:
    source = f"""
name: {NAME}
input: {{text: {{type: string}}, n: {{type: integer, default: lots}}}}
schedule: {{cron: '*/5 * * * *', input: {{text: 3}}}}
steps:
  - id: fetch
    type: http
    timeout: 0
    with: {{url: "ftp://example/x", method: FETCH}}
  - id: fetch
    type: transform
    with: {{template: x}}
  - id: ask
    type: llm
    needs: [fetch]
    with: {{model: gpt-4o, prompt: hi, temperature: 9, output_schema: {{title: strng}}}}
"""
    before = await _state(scheduler)
    response = await api.post("/pipelines", json={"source": source, "filename": "many.yaml"})
    assert response.status_code == 422
    found = {(p["step"], p["field"]) for p in response.json()["detail"]["problems"]}
    assert found == {
        ("fetch", "id"),
        ("fetch", "timeout"),
        ("fetch", "with.url"),
        ("fetch", "with.method"),
        ("ask", "with.model"),
        ("ask", "with.temperature"),
        ("ask", "with.output_schema"),
        (None, "input.n.default"),
        (None, "schedule.input.text"),
    }
    assert await _state(scheduler) == before


async def test_after_every_refusal_the_registered_version_still_runs(
    api: httpx.AsyncClient, scheduler: Scheduler
) -> None:
    """Runs last in the module: the refusals above changed nothing, so version 1 is
    current and a request for it starts a run of version 1."""
    again = await api.post("/pipelines", json={"source": GOOD, "filename": "good.yaml"})
    assert (again.json()["version"], again.json()["created"]) == (1, False)
    response = await api.post("/runs", json={"pipeline": NAME, "input": {"text": "still here"}})
    assert response.status_code == 202, response.text
    o = tables.outbox
    async with scheduler.engine.connect() as conn:
        row = (await conn.execute(select(o.c.topic, o.c.payload).order_by(o.c.id.desc()))).first()
    assert row is not None
    request = decode_event(scheduler.topics, row.topic, row.payload, fallback_event_id=uuid.uuid4())
    await scheduler.handle(request)
    async with scheduler.engine.connect() as conn:
        run = (
            await conn.execute(
                select(tables.runs).where(tables.runs.c.id == response.json()["run_id"])
            )
        ).one()
    assert (run.pipeline, run.version, run.status) == (NAME, 1, "running")
    assert run.input == {"text": "still here"}
