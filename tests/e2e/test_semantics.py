"""Pipeline semantics end to end: DAG parallelism, skips, fan-out, retries, timeouts,
cancel, retry-from-step, idempotent triggers, the run queue, and a scheduler crash."""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Stack, StepServer

pytestmark = pytest.mark.e2e


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _at(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _steps(run: dict[str, Any], step_id: str) -> list[dict[str, Any]]:
    return [s for s in run["steps"] if s["step_id"] == step_id]


def _sleep_step(step_id: str, url: str, seconds: float, extra: str = "") -> str:
    return f"""
  - id: {step_id}
    type: http{extra}
    with: {{method: POST, url: "{url}/sleep", json: {{seconds: {seconds}, key: "{step_id}"}}}}"""


def test_independent_branches_run_at_the_same_time(
    conveyor_stack: Stack, step_server: StepServer
) -> None:
    name = _name("diamond")
    conveyor_stack.register(
        f"""
name: {name}
steps:
  - {{id: start, type: transform, with: {{template: "go"}}}}"""
        + _sleep_step("left", step_server.url, 1.5, "\n    needs: [start]")
        + _sleep_step("right", step_server.url, 1.5, "\n    needs: [start]")
        + """
  - {id: join, type: transform, needs: [left, right], with: {template: "done"}}
"""
    )
    run = conveyor_stack.wait_for_run(conveyor_stack.trigger(name))
    assert run["status"] == "succeeded", run
    [left] = _steps(run, "left")
    [right] = _steps(run, "right")
    overlap = min(left["output"]["json"]["finished"], right["output"]["json"]["finished"]) - max(
        left["output"]["json"]["started"], right["output"]["json"]["started"]
    )
    assert overlap > 1.0, (left["output"], right["output"])
    [join] = _steps(run, "join")
    assert _at(join["started_at"]) >= max(_at(left["finished_at"]), _at(right["finished_at"]))


def test_a_false_condition_skips_its_branch_and_the_join_still_runs(
    conveyor_stack: Stack,
) -> None:
    name = _name("skip")
    conveyor_stack.register(
        f"""
name: {name}
input: {{mode: {{type: string}}}}
steps:
  - {{id: check, type: transform, with: {{template: "{{{{ input.mode }}}}"}}}}
  - id: fast
    type: transform
    needs: [check]
    when: "{{{{ steps.check.output == 'fast' }}}}"
    with: {{template: "fast path"}}
  - {{id: after_fast, type: transform, needs: [fast], with: {{template: "x"}}}}
  - id: slow
    type: transform
    needs: [check]
    when: "{{{{ steps.check.output == 'slow' }}}}"
    with: {{template: "slow path"}}
  - {{id: join, type: transform, needs: [fast, slow], with: {{template: "joined"}}}}
"""
    )
    run = conveyor_stack.wait_for_run(conveyor_stack.trigger(name, {"mode": "slow"}))
    assert run["status"] == "succeeded", run
    status = {s["step_id"]: s["status"] for s in run["steps"]}
    assert status == {
        "check": "succeeded",
        "fast": "skipped",
        "after_fast": "skipped",
        "slow": "succeeded",
        "join": "succeeded",
    }
    [fast] = _steps(run, "fast")
    assert "when is false" in fast["reason"]
    [after] = _steps(run, "after_fast")
    assert "skipped" in after["reason"]


def test_fan_out_over_fifty_items_never_has_more_than_five_in_flight(
    conveyor_stack: Stack, step_server: StepServer
) -> None:
    name = _name("fan")
    group = uuid.uuid4().hex
    conveyor_stack.register(
        f"""
name: {name}
input: {{items: {{type: array}}}}
steps:
  - id: each
    type: http
    for_each: "{{{{ input.items }}}}"
    max_parallel: 5
    with:
      method: POST
      url: "{step_server.url}/sleep"
      json: {{seconds: 0.1, group: "{group}", echo: "{{{{ item * 2 }}}}"}}
  - id: total
    type: transform
    with:
      template: "{{{{ steps.each.output | map(attribute='json') | map(attribute='echo') | sum }}}}"
"""
    )
    items = list(range(50))
    run = conveyor_stack.wait_for_run(conveyor_stack.trigger(name, {"items": items}), timeout=60)
    assert run["status"] == "succeeded", run
    assert step_server.max_in_flight[group] <= 5
    assert step_server.max_in_flight[group] >= 2  # it did run items side by side
    summary = [s for s in _steps(run, "each") if s["item_index"] is None]
    assert [o["json"]["echo"] for o in summary[0]["output"]] == [i * 2 for i in items]
    assert len([s for s in _steps(run, "each") if s["item_index"] is not None]) == 50
    assert run["output"] == sum(i * 2 for i in items)


def test_a_step_failing_twice_then_succeeding_keeps_three_attempts_in_history(
    conveyor_stack: Stack, step_server: StepServer
) -> None:
    name = _name("flaky")
    key = uuid.uuid4().hex
    conveyor_stack.register(
        f"""
name: {name}
steps:
  - id: call
    type: http
    retry: {{max_attempts: 3, backoff: fixed, initial: 400ms, jitter: false}}
    with: {{method: POST, url: "{step_server.url}/flaky", json: {{key: "{key}", failures: 2}}}}
"""
    )
    run = conveyor_stack.wait_for_run(conveyor_stack.trigger(name))
    assert run["status"] == "succeeded", run
    attempts = sorted(_steps(run, "call"), key=lambda s: s["attempt"])
    assert [(a["attempt"], a["status"]) for a in attempts] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert all(a["error"]["type"] == "HttpStatusError" for a in attempts[:2])
    gaps = [
        _at(later["started_at"]) - _at(earlier["finished_at"])
        for earlier, later in itertools.pairwise(attempts)
    ]
    assert all(gap >= 0.35 for gap in gaps), gaps  # the fixed 400 ms backoff, on a durable timer
    events = [e["type"] for e in conveyor_stack.get(f"/runs/{run['id']}/events").json()["items"]]
    assert events.count("StepRetrying") == 2


def test_a_step_over_its_timeout_is_cut_off_and_reported(
    conveyor_stack: Stack, step_server: StepServer
) -> None:
    name = _name("timeout")
    conveyor_stack.register(
        f"""
name: {name}
steps:{_sleep_step("slow", step_server.url, 10, chr(10) + "    timeout: 1s")}
"""
    )
    began = time.monotonic()
    run = conveyor_stack.wait_for_run(conveyor_stack.trigger(name))
    assert time.monotonic() - began < 8
    assert run["status"] == "failed"
    [slow] = _steps(run, "slow")
    assert slow["error"]["type"] == "StepTimeout"
    assert run["error"]["type"] == "StepTimeout"


def test_cancel_mid_run_stops_the_running_step_and_starts_nothing_new(
    conveyor_stack: Stack, step_server: StepServer
) -> None:
    name = _name("cancel")
    conveyor_stack.register(
        f"""
name: {name}
steps:{_sleep_step("long", step_server.url, 20)}
  - {{id: never, type: transform, with: {{template: "x"}}}}
"""
    )
    run_id = conveyor_stack.trigger(name)
    conveyor_stack.wait_for(
        f"/runs/{run_id}", lambda r: any(s["status"] == "running" for s in r["steps"])
    )
    response = httpx.post(
        f"{conveyor_stack.api_url}/runs/{run_id}/cancel", json={"reason": "changed my mind"}
    )
    assert response.status_code == 202, response.text
    run = conveyor_stack.wait_for_run(run_id, timeout=10)
    assert run["status"] == "cancelled"
    [long] = _steps(run, "long")
    assert long["status"] == "cancelled"
    assert not _steps(run, "never")
    again = httpx.post(f"{conveyor_stack.api_url}/runs/{run_id}/cancel", json={})
    assert again.status_code == 409


def test_retry_from_a_step_with_an_edited_input_reuses_upstream_outputs(
    conveyor_stack: Stack, step_server: StepServer
) -> None:
    name = _name("retry")
    conveyor_stack.register(
        f"""
name: {name}
input: {{value: {{type: string}}}}
steps:
  - {{id: prepare, type: transform, with: {{template: "prepared"}}}}
  - id: check
    type: http
    with: {{method: POST, url: "{step_server.url}/check", json: {{value: "{{{{ input.value }}}}"}}}}
  - id: finish
    type: transform
    with: {{template: "{{{{ steps.prepare.output }}}} and checked"}}
"""
    )
    run_id = conveyor_stack.trigger(name, {"value": "bad"})
    failed = conveyor_stack.wait_for_run(run_id)
    assert failed["status"] == "failed"
    response = httpx.post(
        f"{conveyor_stack.api_url}/runs/{run_id}/retry",
        json={"from_step": "check", "set": {"input.value": "good"}},
    )
    assert response.status_code == 202, response.text
    conveyor_stack.wait_for(f"/runs/{run_id}", lambda r: r.get("retries", 0) >= 1)
    run = conveyor_stack.wait_for_run(run_id)
    assert run["status"] == "succeeded", run
    assert run["input"] == {"value": "good"}
    assert run["output"] == "prepared and checked"
    assert [(s["attempt"], s["status"]) for s in _steps(run, "prepare")] == [(1, "succeeded")]
    check = sorted(_steps(run, "check"), key=lambda s: s["attempt"])
    assert [(s["attempt"], s["status"]) for s in check] == [(1, "failed"), (2, "succeeded")]
    bad = httpx.post(f"{conveyor_stack.api_url}/runs/{run_id}/retry", json={"from_step": "nope"})
    assert bad.status_code == 422


def test_a_duplicate_trigger_maps_to_the_existing_run(conveyor_stack: Stack) -> None:
    name = _name("dup")
    conveyor_stack.register(
        f"""
name: {name}
steps: [{{id: a, type: transform, with: {{template: "once"}}}}]
"""
    )
    key = uuid.uuid4().hex
    first = httpx.post(
        f"{conveyor_stack.api_url}/runs", json={"pipeline": name, "idempotency_key": key}
    )
    assert first.status_code == 202
    import json as _json

    body = _json.dumps({"pipeline": name, "idempotency_key": key}).encode()
    conveyor_stack.produce(conveyor_stack.topics.runs_requested, body)  # any Kafka client
    conveyor_stack.wait_for_run(uuid.UUID(first.json()["run_id"]))
    second = httpx.post(
        f"{conveyor_stack.api_url}/runs", json={"pipeline": name, "idempotency_key": key}
    )
    assert second.status_code == 200
    assert second.json() | {"event_id": None} == first.json() | {
        "event_id": None,
        "duplicate": True,
    }
    time.sleep(1.0)  # give a wrongly created second run time to show up
    assert len(conveyor_stack.get("/runs", pipeline=name).json()["items"]) == 1


def test_runs_beyond_the_concurrency_limit_queue_and_start_in_order(
    conveyor_stack: Stack, step_server: StepServer
) -> None:
    name = _name("queue")
    conveyor_stack.register(
        f"""
name: {name}
max_concurrent_runs: 1
steps:{_sleep_step("work", step_server.url, 0.5)}
"""
    )
    run_ids = []
    for _ in range(3):
        run_ids.append(conveyor_stack.trigger(name))
        time.sleep(0.05)
    conveyor_stack.wait_for(
        "/runs", lambda b: any(r["status"] == "queued" for r in b["items"]), pipeline=name
    )
    runs = [conveyor_stack.wait_for_run(r) for r in run_ids]
    assert all(r["status"] == "succeeded" for r in runs), runs
    windows = sorted((_at(r["started_at"]), _at(r["finished_at"])) for r in runs)
    assert windows == [(_at(r["started_at"]), _at(r["finished_at"])) for r in runs]  # in order
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(windows))


def test_a_run_survives_its_scheduler_being_killed_mid_run(
    conveyor_stack: Stack, step_server: StepServer
) -> None:
    name = _name("crash")
    conveyor_stack.register(
        f"""
name: {name}
steps:{_sleep_step("slow", step_server.url, 2)}
  - {{id: after, type: transform, with: {{template: "survived"}}}}
"""
    )
    run_id = conveyor_stack.trigger(name)
    conveyor_stack.wait_for(
        f"/runs/{run_id}", lambda r: any(s["status"] == "running" for s in r["steps"])
    )
    [scheduler] = [p for p in conveyor_stack.services["scheduler"] if p.alive()]
    scheduler.kill()  # SIGKILL: no goodbye, offsets and outbox as they were
    time.sleep(2.5)  # the step finishes while no scheduler runs
    conveyor_stack.start("scheduler")
    run = conveyor_stack.wait_for_run(run_id, timeout=40)
    assert run["status"] == "succeeded", run
    assert run["output"] == "survived"
    assert [s["attempt"] for s in _steps(run, "after")] == [1]


def test_a_running_run_keeps_its_version_when_a_new_one_is_applied(
    conveyor_stack: Stack, step_server: StepServer
) -> None:
    name = _name("versions")
    template = """
name: {name}
steps:{sleep}
  - {{id: label, type: transform, with: {{template: "{label}"}}}}
"""
    sleep = _sleep_step("wait", step_server.url, 1.5)
    first = conveyor_stack.register(template.format(name=name, sleep=sleep, label="one"))
    run_id = conveyor_stack.trigger(name)
    conveyor_stack.wait_for(
        f"/runs/{run_id}", lambda r: any(s["status"] == "running" for s in r["steps"])
    )
    second = conveyor_stack.register(template.format(name=name, sleep=sleep, label="two"))
    assert (first["version"], second["version"]) == (1, 2)
    old = conveyor_stack.wait_for_run(run_id)
    new = conveyor_stack.wait_for_run(conveyor_stack.trigger(name))
    assert (old["version"], old["output"]) == (1, "one")
    assert (new["version"], new["output"]) == (2, "two")
    listed = httpx.get(f"{conveyor_stack.api_url}/pipelines").json()["items"]
    [mine] = [p for p in listed if p["name"] == name]
    assert [v["version"] for v in mine["versions"]] == [1, 2]


def test_two_schedulers_share_the_work_without_scheduling_anything_twice(
    conveyor_stack: Stack,
) -> None:
    # A second scheduler joins the group (no API of its own): the partitions of triggers
    # and results are split between the two.
    conveyor_stack.start("scheduler", extra_env={"CONVEYOR_API_PORT": "0"})
    time.sleep(3)  # let the group rebalance
    name = _name("pair")
    conveyor_stack.register(
        f"""
name: {name}
steps:
  - {{id: a, type: transform, with: {{template: "a"}}}}
  - {{id: b, type: transform, needs: [], with: {{template: "b"}}}}
  - {{id: c, type: transform, needs: [a, b], with: {{template: "c"}}}}
"""
    )
    run_ids = [conveyor_stack.trigger(name) for _ in range(20)]
    runs = [conveyor_stack.wait_for_run(r) for r in run_ids]
    assert all(r["status"] == "succeeded" for r in runs)
    for run in runs:
        assert sorted((s["step_id"], s["attempt"]) for s in run["steps"]) == [
            ("a", 1),
            ("b", 1),
            ("c", 1),
        ]
        events = conveyor_stack.get(f"/runs/{run['id']}/events").json()["items"]
        results = [e["payload"]["step_id"] for e in events if e["type"] == "StepCompleted"]
        assert sorted(results) == ["a", "b", "c"]
    # each step was dispatched once: one StepReady per step of each run
    mine = {str(r) for r in run_ids}
    ready = conveyor_stack.read_all(conveyor_stack.topics.ready("transform"))
    dispatched = Counter((e["run_id"], e["step_id"]) for e in ready if e["run_id"] in mine)
    assert sorted(dispatched.values()) == [1] * 3 * len(run_ids), dispatched
    alive = [p for p in conveyor_stack.services["scheduler"] if p.alive()]
    assert len(alive) == 2
