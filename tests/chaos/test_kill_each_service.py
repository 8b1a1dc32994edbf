"""Under a steady load of runs, SIGKILL in turn a step-runner, the scheduler, the recorder
and the media service, and restart each. Then nothing may be missing or doubled: every run
ends, both the scheduler and the recorder know every run, no step result is recorded twice,
and the recorder's history is the scheduler's state, step by step and item by item.

Before the kills, one run fans out over twelve items whose even items hang on their first
call: the runner cannot commit past them, so the odd items behind them in a partition,
finished and reported already, run a second time once the runner is killed. Their second
result must change nothing anywhere."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner

from conveyor.contracts import run_id_for_request
from tests.chaos.conftest import (
    ChaosStack,
    Load,
    Scale,
    chaos_scale,
    describe_runs,
    history_mismatches,
    query,
    register_pipeline,
    unfinished,
    wait_until,
)
from tests.e2e.conftest import Stack

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.timeout(chaos_scale().timeout_s)]

VICTIMS = ("step-runner", "scheduler", "run-recorder", "media")
ITEMS = 12

FAN_OUT = """
name: {name}
input: {{items: {{type: array}}}}
steps:
  - id: fan
    type: http
    for_each: "{{{{ input.items }}}}"
    max_parallel: {items}
    with:
      method: POST
      url: "{url}/hold-first"
      timeout: 300
      json: {{key: "{{{{ run.id }}}}/{{{{ item }}}}", hold: "{{{{ item % 2 == 0 }}}}"}}
"""


def _blocking_run_request() -> tuple[uuid.UUID, uuid.UUID]:
    """An event id whose run puts a held (even) item ahead of a finished (odd) one in some
    partition of the ready topic (6 partitions, keyed by run, step and item)."""
    partition_of = DefaultPartitioner()
    partitions = list(range(6))
    while True:
        event_id = uuid.uuid4()
        run_id = run_id_for_request(event_id)
        part = [
            partition_of(f"{run_id}/fan/{i}".encode(), partitions, partitions) for i in range(ITEMS)
        ]
        if any(part[i] == part[j] for i in range(0, ITEMS, 2) for j in range(i + 1, ITEMS, 2)):
            return event_id, run_id


def _start_blocking_run(chaos: ChaosStack) -> uuid.UUID:
    s: Stack = chaos.stack
    name = f"fan-{uuid.uuid4().hex[:6]}"
    s.register(FAN_OUT.format(name=name, url=chaos.step_server.url, items=ITEMS))
    event_id, run_id = _blocking_run_request()
    body = {"pipeline": name, "input": {"items": list(range(ITEMS))}, "event_id": str(event_id)}
    s.produce(s.topics.runs_requested, json.dumps(body).encode(), key=name.encode())

    def odd_items_done() -> bool:
        rows = query(
            chaos.database_url, "SELECT steps FROM scheduler.runs WHERE id = %s", (run_id,)
        )
        items = rows[0]["steps"]["fan"].get("items") if rows else None
        return bool(items) and all(it["status"] == "succeeded" for it in items[1::2])

    wait_until(odd_items_done, timeout=90, what=f"the odd items of run {run_id} finished")
    return run_id


def test_killing_each_service_under_load_loses_and_doubles_nothing(
    chaos_stack: ChaosStack, scale: Scale
) -> None:
    s = chaos_stack.stack
    blocked = _start_blocking_run(chaos_stack)
    name = register_pipeline(s, chaos_stack.step_server.url)
    load = Load(
        bootstrap=s.bootstrap,
        topic=s.topics.runs_requested,
        pipeline=name,
        min_runs=scale.min_runs,
        max_runs=scale.max_runs,
        rate=scale.rate,
    )
    load.start()
    try:
        for _ in range(scale.kill_rounds):
            for victim in VICTIMS:
                time.sleep(scale.kill_spacing_s)
                chaos_stack.kill_and_restart(victim)
                # Held items on a runner that was not killed may finish now.
                chaos_stack.step_server.release.set()
    finally:
        load.stop()
    runs_triggered = len(load.run_ids)
    run_ids = [blocked, *load.run_ids]
    s.output.append(f"[chaos] {runs_triggered} runs triggered at {scale.rate}/s, kills over")

    db = chaos_stack.database_url
    try:
        wait_until(
            lambda: not any(unfinished(db, run_ids).values()),
            timeout=scale.settle_s,
            what=f"all {len(run_ids)} runs ended in both the scheduler and the recorder",
        )
    except AssertionError as exc:
        left = unfinished(db, run_ids)
        story = describe_runs(db, sorted({*left["scheduler"], *left["recorder"]}))
        raise AssertionError(f"{exc}; still open: {left}\n{story}\n{s.tail(80)}") from None

    problems = history_mismatches(db, run_ids)
    assert not problems, "\n".join(problems)
    runs = [s.get(f"/runs/{run_id}").json() for run_id in run_ids]
    assert {r["status"] for r in runs} == {"succeeded"}, [
        (r["id"], r["status"], r["error"]) for r in runs if r["status"] != "succeeded"
    ]
    assert {r["output"] for r in runs[1:]} == {f"n={n} {n} 0.25" for n in range(runs_triggered)}
    calls = chaos_stack.step_server.calls
    rerun = [i for i in range(1, ITEMS, 2) if calls.get(f"{blocked}/{i}", 0) > 1]
    assert rerun, "no finished item ran again: the scenario did not happen"
    for victim in VICTIMS:  # every service came back, and is still up
        assert any(p.alive() for p in s.services[victim]), (victim, s.tail(60))
