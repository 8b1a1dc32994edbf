"""Cron schedules end to end: two scheduler processes (replicas over one database), a
pipeline that fires every second, exactly one run per tick, then paused."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from conveyor.runtime.settings import database_url as sqlalchemy_url
from tests.e2e.conftest import Stack, launch_stack

pytestmark = pytest.mark.e2e

S = timedelta(seconds=1)


@pytest.fixture(scope="module")
def two_scheduler_stack(
    kafka_bootstrap: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """Every service as a process, with a second scheduler replica (no control API)."""
    with launch_stack(
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        work=tmp_path_factory.mktemp("cron-stack"),
        schedulers=2,
        runners=("step-runner",),
    ) as s:
        yield s


def _cron_keys(url: str, pipeline: str) -> list[str]:
    """Idempotency keys of the pipeline's runs, in the scheduler's own database."""
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT idempotency_key FROM scheduler.runs WHERE pipeline = :p"),
                {"p": pipeline},
            ).all()
    finally:
        engine.dispose()
    return [row[0] for row in rows]


def _runs(s: Stack, pipeline: str) -> list[dict[str, Any]]:
    response = s.get("/runs", pipeline=pipeline, limit=100)
    assert response.status_code == 200, response.text
    return list(response.json()["items"])


def _settled(s: Stack, pipeline: str, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """The recorder's runs of ``pipeline`` once ``count`` of them have ended."""
    deadline = time.monotonic() + timeout
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        runs = _runs(s, pipeline)
        if len(runs) >= count and all(r["status"] not in ("queued", "running") for r in runs):
            return runs
        time.sleep(0.2)
    raise AssertionError(f"runs of {pipeline} never settled: {runs}\n{s.tail(60)}")


def test_every_tick_is_one_run_across_two_schedulers_until_paused(
    two_scheduler_stack: Stack, database_url: str
) -> None:
    s = two_scheduler_stack
    name = f"every-second-{uuid.uuid4().hex[:6]}"
    registered_at = datetime.now(UTC)
    s.register(
        f"name: {name}\n"
        "schedule: {cron: '* * * * * *', input: {who: clockwork}}\n"
        "steps:\n"
        "  - {id: greet, type: transform, with: {template: 'hi {{ input.who }}'}}\n"
    )
    time.sleep(4.5)
    paused = httpx.post(f"{s.api_url}/pipelines/{name}/pause", json={"by": "e2e"}, timeout=10)
    assert paused.status_code == 200, paused.text
    paused_at = datetime.now(UTC)
    assert paused.json()["paused"] is True

    # Fired requests still travel through outbox and broker; then nothing more comes.
    time.sleep(2.0)
    keys = _cron_keys(database_url, name)
    time.sleep(1.5)
    assert sorted(_cron_keys(database_url, name)) == sorted(keys), "a paused schedule fired"

    assert len(keys) == len(set(keys)), f"a tick fired twice: {sorted(keys)}"
    assert all(k.startswith(f"cron:{name}:") for k in keys), keys
    ticks = sorted(datetime.fromisoformat(k.removeprefix(f"cron:{name}:")) for k in keys)
    assert 3 <= len(ticks) <= 6, ticks
    assert all(later - earlier == S for earlier, later in itertools.pairwise(ticks)), (
        f"a tick went missing: {ticks}"
    )
    assert registered_at < ticks[0] <= registered_at + 2 * S
    assert ticks[-1] <= paused_at

    runs = _settled(s, name, len(ticks))
    assert len(runs) == len(ticks), runs  # one run per tick, none for a duplicate request
    assert {r["status"] for r in runs} == {"succeeded"}, runs
    one = s.get(f"/runs/{runs[0]['id']}").json()
    assert one["input"] == {"who": "clockwork"}
    assert one["output"] == {"greet": "hi clockwork"} or one["output"] == "hi clockwork"

    listed = httpx.get(f"{s.api_url}/schedules", timeout=10).json()["items"]
    mine = next(item for item in listed if item["pipeline"] == name)
    assert mine["paused"] is True
    assert datetime.fromisoformat(mine["last_fired_at"]) <= paused_at
