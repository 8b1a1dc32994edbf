"""``POST /pipelines`` with library prompts and AUTO asks, against a real PostgreSQL: the
stored version is self-contained, answers are recorded, and re-applying asks nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from conveyor.contracts import Topics
from conveyor.runtime import DatabaseSettings, create_db_engine, upgrade_schema
from conveyor.scheduler import tables
from conveyor.scheduler.api import create_api
from conveyor.scheduler.main import MIGRATIONS
from conveyor.scheduler.scheduling import Scheduler
from conveyor.testing.fake_llm import FakeLLMServer

_PROVIDER_VARIABLES = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
)

SOURCE = """
name: {name}
steps:
  - id: fetch
    type: transform
    with: {{template: "otters"}}
  - id: sum
    type: llm
    with:
      model: openai/gpt-4o-mini
      prompt_ref: summarize
      prompt_vars: {{text: "{{{{ steps.fetch.output }}}}"}}
"""
PROMPTS: dict[str, Any] = {
    "summarize": {
        "variables": {"text": {"type": "string"}, "words": {"type": "integer", "default": 20}},
        "system": "<AUTO>a one-line persona for a summarizer</AUTO>",
        "template": "Summarize in {{ words }} words: {{ text }}",
    }
}


@pytest.fixture(scope="module")
def migrated(database_url: str) -> str:
    upgrade_schema(database_url, migrations=Path(MIGRATIONS), schema="scheduler")
    return database_url


@pytest.fixture
async def scheduler(migrated: str) -> AsyncIterator[Scheduler]:
    engine = create_db_engine(DatabaseSettings(url=migrated))
    yield Scheduler(engine=engine, topics=Topics(f"t{uuid.uuid4().hex[:8]}"), relay=None)
    await engine.dispose()


@pytest.fixture
async def api(scheduler: Scheduler) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_api(scheduler))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client


def _body(name: str, prompts: dict[str, Any] | None = PROMPTS) -> dict[str, Any]:
    return {"source": SOURCE.format(name=name), "filename": "p.yaml", "prompts": prompts}


async def _stored_spec(scheduler: Scheduler, name: str) -> dict[str, Any]:
    async with scheduler.engine.connect() as conn:
        spec = await conn.scalar(
            select(tables.pipelines.c.spec).where(tables.pipelines.c.name == name)
        )
    assert spec is not None
    return dict(spec)


async def test_prompts_and_auto_are_resolved_into_the_stored_version(
    api: httpx.AsyncClient,
    scheduler: Scheduler,
    fake_llm: FakeLLMServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake_llm.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    fake_llm.script("gpt-4o-mini", "You are a terse librarian.")
    name = f"auto-{uuid.uuid4().hex[:6]}"

    first = await api.post("/pipelines", json=_body(name))
    assert first.status_code == 200, first.text
    assert first.json()["created"] is True
    spec = await _stored_spec(scheduler, name)
    config = spec["steps"][1]["with"]
    assert "prompt_ref" not in config
    assert config["system"] == "You are a terse librarian."
    assert "Summarize in {{ words }} words" in config["prompt"]
    assert spec["auto_resolved"]["steps.sum.with.system"] == {
        "ask": "a one-line persona for a summarizer",
        "value": "You are a terse librarian.",
        "model": "openai/gpt-4o-mini",
    }

    again = await api.post("/pipelines", json=_body(name))
    assert again.json() == {**first.json(), "created": False}
    assert len(fake_llm.requests) == 1, "re-applying the same definition asked the model again"


async def test_unknown_prompt_is_a_422_naming_step_and_field(api: httpx.AsyncClient) -> None:
    response = await api.post("/pipelines", json=_body("no-prompts", prompts=None))
    assert response.status_code == 422
    (problem,) = response.json()["detail"]["problems"]
    assert problem["file"] == "p.yaml"
    assert (problem["step"], problem["field"]) == ("sum", "with.prompt_ref")


async def test_auto_without_a_provider_is_a_422_naming_the_variables(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in _PROVIDER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    response = await api.post("/pipelines", json=_body(f"nokey-{uuid.uuid4().hex[:6]}"))
    assert response.status_code == 422
    (problem,) = response.json()["detail"]["problems"]
    assert (problem["step"], problem["field"]) == ("sum", "with.system")
    assert "OPENAI_API_KEY or OPENAI_BASE_URL" in problem["message"]
