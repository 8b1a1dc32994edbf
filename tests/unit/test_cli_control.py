"""``conveyor cancel``, ``retry``, ``run --idempotency-key``, and how ``runs show`` and
``--follow`` present queued, cancelled, retried and fan-out runs: the real CLI against fake
control and recorder APIs on real ports (see test_cli_client for the server plumbing).

The fake control API answers as the scheduler's does: 202 ``{"run_id"}``, 404 for an
unknown run, 409 when the run's state refuses, 422 for an unknown step; a seen
idempotency key gets 200 with ``"duplicate": true``. The fake recorder shows each run as
a script of records, one further per poll; a retry switches the run to its next script.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from conveyor.cli.main import app
from tests.unit.test_cli_client import TRACEBACK, _serve

TERMINAL = {"succeeded", "failed", "cancelled", "skipped"}


def _at(second: float) -> str:
    return f"2025-06-01T10:00:{second:06.3f}Z"


def attempt(
    step_id: str,
    attempt: int = 1,
    status: str = "succeeded",
    *,
    item: int | None = None,
    at: float = 1,
    **extra: Any,
) -> dict[str, Any]:
    row = {
        "step_id": step_id, "attempt": attempt, "item_index": item, "status": status,
        "kind": "transform", "input": None, "output": None, "error": None, "reason": None,
        "worker": "w", "scheduled_at": _at(at), "started_at": _at(at),
        "finished_at": None if status in ("scheduled", "running") else _at(at + 0.5),
        "duration_ms": None if status in ("scheduled", "running") else 500.0,
        "metrics": None,
    }  # fmt: skip
    if status == "succeeded":
        row["output"] = f"out of {step_id}" + ("" if item is None else f"[{item}]")
    return {**row, **extra}


def record(run_id: str, status: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    ended = status in TERMINAL
    return {
        "id": run_id, "pipeline": "article", "version": 1, "status": status,
        "input": {"topic": "otters"}, "output": "done" if status == "succeeded" else None,
        "error": None, "requested_at": _at(0),
        "started_at": None if status == "queued" else _at(0.5),
        "finished_at": _at(30) if ended else None, "duration_ms": 2500.0 if ended else None,
        "tokens": 0, "cost": 0.0, "idempotency_key": None, "retries": 0, "retried_at": None,
        "steps": steps, **extra,
    }  # fmt: skip


@dataclass
class Run:
    scripts: list[list[dict[str, Any]]]
    polls: int = 0

    def current(self) -> dict[str, Any]:
        script = self.scripts[0]
        return script[min(self.polls, len(script) - 1)]

    def poll(self) -> dict[str, Any]:
        shown = self.current()
        self.polls += 1
        return shown


@dataclass
class Fake:
    runs: dict[str, Run] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)

    def add(self, *scripts: list[dict[str, Any]]) -> str:
        run_id = scripts[0][0]["id"]
        self.runs[run_id] = Run(list(scripts))
        return run_id


def _control_app(fake: Fake) -> FastAPI:
    api = FastAPI()

    def unknown(run_id: str) -> JSONResponse:
        return JSONResponse({"detail": f"run {run_id} not found"}, status_code=404)

    @api.post("/runs")
    def trigger(body: dict[str, Any] = Body(...)) -> JSONResponse:  # noqa: B008
        fake.requests.append(("trigger", "", body))
        key = body.get("idempotency_key")
        if key in fake.keys:
            payload = {"run_id": fake.keys[key], "event_id": str(uuid.uuid4()),
                       "pipeline": body["pipeline"], "duplicate": True}  # fmt: skip
            return JSONResponse(payload, status_code=200)
        run_id = str(uuid.uuid4())
        fake.add([record(run_id, "succeeded", [attempt("only")])])
        if key:
            fake.keys[key] = run_id
        payload = {"run_id": run_id, "event_id": str(uuid.uuid4()), "pipeline": body["pipeline"]}
        return JSONResponse(payload, status_code=202)

    @api.post("/runs/{run_id}/cancel")
    def cancel(run_id: str, body: dict[str, Any] = Body(...)) -> JSONResponse:  # noqa: B008
        fake.requests.append(("cancel", run_id, body))
        if run_id not in fake.runs:
            return unknown(run_id)
        status = fake.runs[run_id].current()["status"]
        if status in TERMINAL:
            return JSONResponse({"detail": f"run {run_id} is already {status}"}, status_code=409)
        return JSONResponse({"run_id": run_id}, status_code=202)

    @api.post("/runs/{run_id}/retry")
    def retry(run_id: str, body: dict[str, Any] = Body(...)) -> JSONResponse:  # noqa: B008
        fake.requests.append(("retry", run_id, body))
        if run_id not in fake.runs:
            return unknown(run_id)
        run = fake.runs[run_id]
        current = run.current()
        if current["status"] not in TERMINAL:
            detail = f"run {run_id} is still running; cancel it or wait"
            return JSONResponse({"detail": detail}, status_code=409)
        steps = {s["step_id"] for s in current["steps"]}
        if body.get("from_step") not in (None, *steps):
            detail = f"run {run_id} has no step {body['from_step']!r}"
            return JSONResponse({"detail": detail}, status_code=422)
        if len(run.scripts) > 1:
            run.scripts.pop(0)
            run.polls = 0
        return JSONResponse({"run_id": run_id}, status_code=202)

    return api


def _recorder_app(fake: Fake) -> FastAPI:
    api = FastAPI()

    @api.get("/runs")
    def runs() -> dict[str, Any]:
        items = [
            {k: v for k, v in run.current().items() if k not in ("input", "output", "steps")}
            for run in fake.runs.values()
        ]
        return {"items": items, "next_cursor": None}

    @api.get("/runs/{run_id}")
    def run(run_id: str) -> JSONResponse:
        if run_id not in fake.runs:
            return JSONResponse({"detail": f"run {run_id} not found"}, status_code=404)
        return JSONResponse(fake.runs[run_id].poll())

    return api


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Fake, dict[str, str]]]:
    fake = Fake()
    control, control_thread, api_url = _serve(_control_app(fake))
    recorder, recorder_thread, recorder_url = _serve(_recorder_app(fake))
    env = {"CONVEYOR_API_URL": api_url, "CONVEYOR_RECORDER_URL": recorder_url, "COLUMNS": "200"}
    yield fake, env
    for server, thread in ((control, control_thread), (recorder, recorder_thread)):
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def fake(servers: tuple[Fake, dict[str, str]]) -> Fake:
    return servers[0]


@pytest.fixture
def cli(servers: tuple[Fake, dict[str, str]]) -> Any:
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(app, list(args), env=servers[1])

    return invoke


def new_id() -> str:
    return str(uuid.uuid4())


def one_error_line(result: Any, expected: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: {expected}"]
    assert "Traceback" not in result.output


# --- cancel --------------------------------------------------------------------------------


def test_cancel_sends_the_reason_and_reports_it(cli: Any, fake: Fake) -> None:
    run_id = fake.add([record(new_id(), "running", [attempt("a", status="running")])])
    result = cli("cancel", run_id, "--reason", "wrong input")
    assert result.exit_code == 0, result.output
    assert f"cancelling run {run_id}" in result.stdout
    assert fake.requests[-1] == ("cancel", run_id, {"reason": "wrong input", "requested_by": "cli"})


def test_cancel_of_an_unknown_or_finished_run_is_one_line_and_status_2(
    cli: Any, fake: Fake
) -> None:
    missing = new_id()
    one_error_line(cli("cancel", missing), f"run {missing} not found")
    done = fake.add([record(new_id(), "succeeded", [attempt("a")])])
    one_error_line(cli("cancel", done), f"run {done} is already succeeded")


# --- retry ---------------------------------------------------------------------------------


def test_retry_sends_the_step_and_parsed_edits(cli: Any, fake: Fake) -> None:
    run_id = fake.add([record(new_id(), "failed", [attempt("draft", status="failed")])])
    result = cli(
        "retry", run_id, "--from", "draft",
        "--set", "input.name=Bob", "--set", "input.count=3",
        "--set", "steps.draft.with.prompt=Write about {{ input.name }}",
        "--set", 'steps.draft.with.json.tags=["a", "b"]',
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"retrying run {run_id} from draft" in result.stdout
    assert fake.requests[-1] == (
        "retry",
        run_id,
        {
            "from_step": "draft",
            "set": {
                "input.name": "Bob",
                "input.count": 3,
                "steps.draft.with.prompt": "Write about {{ input.name }}",
                "steps.draft.with.json.tags": ["a", "b"],
            },
            "requested_by": "cli",
        },
    )
    assert cli("retry", run_id).exit_code == 0  # from the first failed step: null
    assert fake.requests[-1][2] == {"from_step": None, "set": {}, "requested_by": "cli"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("name=Bob", "--set 'name=Bob': the path must be input.<key> or steps.<step>.with.<key>"),
        ("input=1", "--set 'input=1': the path must be input.<key> or steps.<step>.with.<key>"),
        ("steps.draft.prompt=x", "--set 'steps.draft.prompt=x': the path must be input.<key>"),
        ("input.name", "--set 'input.name' is not path=value (e.g. --set input.name=Bob)"),
    ],
)
def test_retry_with_a_bad_edit_sends_nothing(cli: Any, fake: Fake, edit: str, message: str) -> None:
    run_id = fake.add([record(new_id(), "failed", [attempt("draft", status="failed")])])
    before = len(fake.requests)
    result = cli("retry", run_id, "--set", edit)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith(f"error: {message}")
    assert len(fake.requests) == before


def test_retry_refusals_are_one_line_and_status_2(cli: Any, fake: Fake) -> None:
    running = fake.add([record(new_id(), "running", [attempt("draft", status="running")])])
    one_error_line(cli("retry", running), f"run {running} is still running; cancel it or wait")
    failed = fake.add([record(new_id(), "failed", [attempt("draft", status="failed")])])
    one_error_line(cli("retry", failed, "--from", "zz"), f"run {failed} has no step 'zz'")
    missing = new_id()
    one_error_line(cli("retry", missing), f"run {missing} not found")
    before = len(fake.requests)
    for command in ("retry", "cancel"):
        one_error_line(
            cli(command, "nope"), "'nope' is not a run id (a UUID, as `conveyor runs list` shows)"
        )
    assert len(fake.requests) == before


def test_retry_follow_waits_for_the_retry_and_shows_only_the_new_attempts(
    cli: Any, fake: Fake
) -> None:
    run_id = new_id()
    boom = {"type": "ValueError", "message": "boom", "traceback": TRACEBACK}
    first = [
        attempt("fetch", at=1),
        attempt("draft", status="failed", error=boom, at=2),
        attempt("notify", status="cancelled", reason="run failed", at=2),
    ]
    ended = record(run_id, "failed", first, error=boom)
    again = {"retries": 1, "retried_at": _at(10)}
    rerun = [
        # the recorder has not read the RunRetried yet: the run still looks failed
        ended,
        ended,
        record(run_id, "running", [*first, attempt("draft", 2, "running", at=11)], **again),
        record(
            run_id, "succeeded",
            [*first, attempt("draft", 2, at=11), attempt("notify", 2, at=12)], **again,
        ),
    ]  # fmt: skip
    fake.add([ended], rerun)
    result = cli("retry", run_id, "--follow", "--set", "input.topic=owls")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "step draft (attempt 2) succeeded" in out
    assert "step notify (attempt 2) succeeded" in out
    assert f"run {run_id} succeeded" in out
    # what the run did before the retry is not news
    assert "(attempt 1)" not in out


def test_retry_follow_of_a_retry_that_never_shows_gives_up(
    cli: Any, fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conveyor.cli import follow

    monkeypatch.setattr(follow, "RETRY_APPEAR_TIMEOUT", 0.5)
    run_id = fake.add([record(new_id(), "failed", [attempt("draft", status="failed")])])
    result = cli("retry", run_id, "--follow")
    assert result.exit_code == 1, result.output
    assert f"the retry of run {run_id} was not recorded within 0s" in result.stderr


# --- run --idempotency-key ------------------------------------------------------------------


def test_a_duplicate_trigger_names_the_existing_run(cli: Any, fake: Fake) -> None:
    key = f"key-{uuid.uuid4().hex[:6]}"
    first = cli("run", "article", "--idempotency-key", key)
    assert first.exit_code == 0, first.output
    assert "duplicate" not in first.stderr
    again = cli("run", "article", "--idempotency-key", key)
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == first.stdout.strip()  # stdout: the run id alone
    assert again.stderr.strip() == (
        f"duplicate: idempotency key '{key}' already started run {first.stdout.strip()}; no new run"
    )


# --- --follow: queued, cancelled ------------------------------------------------------------


def _follow(cli: Any, fake: Fake, script: list[dict[str, Any]]) -> Any:
    """``run --follow`` of a run whose records are ``script``."""
    key = f"key-{uuid.uuid4().hex[:6]}"
    assert cli("run", "article", "--idempotency-key", key).exit_code == 0
    run_id = fake.keys[key]
    fake.runs[run_id] = Run([[{**r, "id": run_id} for r in script]])
    return cli("run", "article", "--idempotency-key", key, "--follow"), run_id


def test_follow_says_a_queued_run_waits_for_a_slot(cli: Any, fake: Fake) -> None:
    script = [
        record("", "queued", []),
        record("", "queued", []),
        record("", "running", [attempt("a", status="running")]),
        record("", "succeeded", [attempt("a")]),
    ]
    result, run_id = _follow(cli, fake, script)
    assert result.exit_code == 0, result.output
    assert f"run {run_id} queued: waiting for a slot" in result.stdout
    assert f"run {run_id} running" in result.stdout


def test_follow_of_a_cancelled_run_exits_1_with_the_reason(cli: Any, fake: Fake) -> None:
    cancelled = {"type": "Cancelled", "message": "user said so", "retryable": False}
    script = [
        record("", "running", [attempt("a", status="running")]),
        record(
            "", "cancelled", [attempt("a", status="cancelled", reason="user said so")],
            error=cancelled,
        ),
    ]  # fmt: skip
    result, run_id = _follow(cli, fake, script)
    assert result.exit_code == 1, result.output
    assert "step a (attempt 1) cancelled in 500 ms: user said so" in result.stdout
    assert f"run {run_id} cancelled" in result.stdout
    assert "reason: user said so" in result.stdout


def test_follow_shows_a_fan_out_as_progress_not_a_line_per_item(cli: Any, fake: Fake) -> None:
    def items(done: int, total: int = 20) -> list[dict[str, Any]]:
        return [
            attempt("each", item=i, status="succeeded" if i < done else "running")
            for i in range(total)
        ]

    summary = attempt("each", output=[f"out of each[{i}]" for i in range(20)], at=5)
    script = [
        record("", "running", items(0)),
        record("", "running", items(7)),
        record("", "running", items(20)),
        record("", "succeeded", [*items(20), summary]),
    ]
    result, _ = _follow(cli, fake, script)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "step each running: 0/20 items done, 20 running" in out
    assert "step each running: 7/20 items done, 13 running" in out
    assert "step each succeeded: 20/20 items done" in out
    assert "each[" not in out


def test_follow_shows_a_long_steps_progress_bar(cli: Any, fake: Fake) -> None:
    def encoding(progress: float | None) -> dict[str, Any]:
        return attempt(
            "encode", status="running", progress=progress, progress_message="transcoding"
        )

    script = [
        record("", "running", [encoding(None)]),
        record("", "running", [encoding(0.12)]),
        record("", "running", [encoding(0.15)]),  # the same tenth: no new line
        record("", "running", [encoding(0.5)]),
        record("", "succeeded", [attempt("encode", progress=1.0, progress_message="x")]),
    ]
    result, _ = _follow(cli, fake, script)
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert "step encode (attempt 1) running transcoding" in lines
    assert "step encode (attempt 1) running ━━━━━━━━━━  12% transcoding" in lines
    assert "step encode (attempt 1) running ━━━━━━━━━━  50% transcoding" in lines
    assert not any("15%" in line for line in lines)
    assert "step encode (attempt 1) succeeded in 500 ms → out of encode" in lines


# --- runs show, runs list ------------------------------------------------------------------


def _fan_out_run() -> dict[str, Any]:
    boom = {"type": "HTTPError", "message": "503", "traceback": TRACEBACK}
    rows = [attempt("fetch")]
    for i in range(50):
        status = "succeeded" if i < 12 else "running" if i < 15 else "scheduled"
        rows.append(attempt("each", item=i, status=status, at=2))
    rows[16] = attempt("each", item=15, status="failed", error=boom, at=2)
    return record(new_id(), "running", rows)


def test_runs_show_folds_a_fan_out_step_into_one_line(cli: Any, fake: Fake) -> None:
    run_id = fake.add([_fan_out_run()])
    shown = cli("runs", "show", run_id)
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    assert "12/50 items done, 1 failed, 3 running, 34 scheduled" in out
    assert "each[3]" not in out  # item rows only with --items
    assert "each[15] attempt 1: HTTPError: 503" in out  # but a failed item's traceback
    assert 'File "step.py", line 3' in out

    with_items = cli("runs", "show", run_id, "--items")
    assert with_items.exit_code == 0, with_items.output
    lines = with_items.stdout.splitlines()
    assert sum("each[" in line for line in lines if "out of each" in line) == 12
    assert any("each[49]" in line and "scheduled" in line for line in lines)

    as_json = json.loads(cli("runs", "show", run_id, "--json").stdout)
    assert len(as_json["steps"]) == 51  # the recorder's rows, untouched


def test_runs_show_groups_a_retried_runs_attempts_by_step(cli: Any, fake: Fake) -> None:
    boom = {"type": "ValueError", "message": "boom"}
    steps = [  # as the recorder lists them: by first appearance
        attempt("fetch", at=1),
        attempt("draft", status="failed", error=boom, at=2),
        attempt("notify", status="cancelled", reason="run failed", at=3),
        attempt("draft", 2, at=11),
        attempt("notify", 2, at=12),
    ]
    retried = {"retries": 1, "retried_at": _at(10)}
    run_id = fake.add([record(new_id(), "succeeded", steps, **retried)])
    shown = cli("runs", "show", run_id)
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    assert "1×, last at 2025-06-01 10:00:10" in out
    rows = [line.split()[:3] for line in out.splitlines() if line.split()[:1] in (
        ["fetch"], ["draft"], ["notify"])]  # fmt: skip
    assert rows == [
        ["fetch", "1", "transform"],
        ["draft", "1", "transform"],
        ["draft", "2", "transform"],
        ["notify", "1", "transform"],
        ["notify", "2", "transform"],
    ]
    [cancelled] = [line for line in out.splitlines() if "run failed" in line]
    assert cancelled.split()[:4] == ["notify", "1", "transform", "cancelled"]

    listed = cli("runs", "list")
    assert listed.exit_code == 0, listed.output
    assert any(run_id in line and "(retried 1×)" in line for line in listed.stdout.splitlines())


def test_resume_of_a_bad_run_id_is_a_one_line_error() -> None:
    from typer.testing import CliRunner

    from conveyor.cli.main import app

    result = CliRunner().invoke(app, ["resume", "not-a-uuid"])
    assert result.exit_code == 2
    assert "is not a run id" in result.output
    assert "Traceback" not in result.output
