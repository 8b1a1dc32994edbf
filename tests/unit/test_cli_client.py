"""The CLI and ``ConveyorClient`` against real HTTP servers that speak Conveyor's contracts.

A small in-memory fake of the control API and the run recorder (FastAPI, served by uvicorn
in threads on real ports): pipelines are validated with the real contracts, a triggered
run is unknown to the recorder for its first poll, then advances one step per poll, and
fails when its pipeline's name starts with ``broken``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import Body, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from typer.testing import CliRunner

from conveyor.cli import stack
from conveyor.cli.client import ConveyorClient
from conveyor.cli.errors import NotFound, PipelineRejected, Rejected
from conveyor.cli.main import app
from conveyor.contracts import InputInvalid, PipelineInvalid, load_pipeline, validate_run_input

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TRACEBACK = 'Traceback (most recent call last):\n  File "step.py", line 3\nValueError: boom\n'


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class FakeConveyor:
    """What the fake APIs share: registered versions, runs as scripted snapshots, requests."""

    pipelines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    polls: dict[str, int] = field(default_factory=dict)
    triggers: list[dict[str, Any]] = field(default_factory=list)
    registrations: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, source: str, filename: str | None) -> tuple[int, dict[str, Any]]:
        self.registrations.append({"source": source, "filename": filename})
        try:
            spec = load_pipeline(source, source=filename or "<api>")
        except PipelineInvalid as exc:
            problems = [p.model_dump() for p in exc.problems]
            return 422, {"detail": {"problems": problems}}
        versions = self.pipelines.setdefault(spec.name, [])
        if versions and versions[-1]["digest"] == spec.digest():
            latest = versions[-1]
            return 200, {
                "name": spec.name,
                "version": latest["version"],
                "digest": latest["digest"],
                "created": False,
            }
        version = {
            "version": len(versions) + 1,
            "digest": spec.digest(),
            "registered_at": _now(),
            "spec": spec,
        }
        versions.append(version)
        return 201, {
            "name": spec.name,
            "version": version["version"],
            "digest": version["digest"],
            "created": True,
        }

    def trigger(self, body: dict[str, Any]) -> dict[str, Any]:
        self.triggers.append(body)
        versions = self.pipelines.get(body["pipeline"])
        if not versions:
            raise HTTPException(404, f"no pipeline named {body['pipeline']!r} is registered")
        spec = versions[-1]["spec"]
        try:
            run_input = validate_run_input(spec, body.get("input") or {})
        except InputInvalid as exc:
            raise HTTPException(422, str(exc)) from None
        run_id = str(uuid.uuid4())
        self.runs[run_id] = _script(run_id, spec, versions[-1]["version"], run_input)
        self.polls[run_id] = 0
        return {"run_id": run_id, "event_id": str(uuid.uuid4()), "pipeline": spec.name}

    def poll(self, run_id: str) -> dict[str, Any] | None:
        """First poll of a new run: not recorded yet. Then one snapshot further per poll."""
        with self.lock:
            if run_id not in self.runs:
                return None
            seen = self.polls[run_id]
            self.polls[run_id] = seen + 1
            if seen == 0:
                return None
            snapshots = self.runs[run_id]
            return snapshots[min(seen - 1, len(snapshots) - 1)]

    def latest(self, run_id: str) -> dict[str, Any]:
        return self.runs[run_id][-1]


def _script(run_id: str, spec: Any, version: int, run_input: dict[str, Any]) -> list[dict]:
    fails = spec.name.startswith("broken")
    base = {
        "id": run_id,
        "pipeline": spec.name,
        "version": version,
        "input": run_input,
        "output": None,
        "error": None,
        "requested_at": _now(),
        "started_at": None,
        "finished_at": None,
        "duration_ms": None,
        "tokens": 0,
        "cost": 0.0,
        "steps": [],
    }
    snapshots = [{**base, "status": "queued"}]
    done: list[dict[str, Any]] = []
    for index, step in enumerate(spec.steps):
        last = index == len(spec.steps) - 1
        attempt = {
            "step_id": step.id,
            "attempt": 1,
            "item_index": None,
            "kind": step.type,
            "status": "running",
            "input": {},
            "output": None,
            "error": None,
            "reason": None,
            "worker": "runner-1",
            "scheduled_at": _now(),
            "started_at": _now(),
            "finished_at": None,
            "duration_ms": None,
            "metrics": {},
        }
        snapshots.append(
            {**base, "status": "running", "started_at": _now(), "steps": [*done, attempt]}
        )
        if fails and last:
            error = {
                "type": "ValueError",
                "message": "boom",
                "traceback": TRACEBACK,
                "retryable": False,
            }
            finished = {**attempt, "status": "failed", "error": error, "duration_ms": 7.0}
        else:
            finished = {
                **attempt,
                "status": "succeeded",
                "duration_ms": 5.0,
                "output": {"step": step.id, "text": f"output of {step.id}"},
            }
        done.append(finished)
    final_status = "failed" if fails else "succeeded"
    snapshots.append(
        {
            **base,
            "status": final_status,
            "started_at": _now(),
            "finished_at": _now(),
            "duration_ms": 42.0,
            "steps": done,
            "output": None if fails else {"text": f"output of {spec.steps[-1].id}"},
            "error": done[-1]["error"] if fails else None,
        }
    )
    return snapshots


def _control_app(fake: FakeConveyor) -> FastAPI:
    api = FastAPI()

    @api.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/pipelines")
    def register(body: dict[str, Any] = Body(...)) -> JSONResponse:  # noqa: B008
        status, payload = fake.register(body["source"], body.get("filename"))
        return JSONResponse(payload, status_code=status)

    @api.get("/pipelines")
    def pipelines() -> dict[str, Any]:
        items = [
            {
                "name": name,
                "description": versions[-1]["spec"].description,
                "latest_version": versions[-1]["version"],
                "versions": [
                    {k: v[k] for k in ("version", "digest", "registered_at")} for v in versions
                ],
            }
            for name, versions in fake.pipelines.items()
        ]
        return {"items": items}

    @api.post("/runs", status_code=202)
    def trigger(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        return fake.trigger(body)

    return api


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k not in ("input", "output", "steps")}


def _recorder_app(fake: FakeConveyor) -> FastAPI:
    api = FastAPI()

    @api.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/runs")
    def runs(
        pipeline: str | None = None,
        status: str | None = None,
        limit: int = Query(50),
        cursor: str | None = None,
    ) -> dict[str, Any]:
        items = [_summary(fake.latest(run_id)) for run_id in reversed(list(fake.runs))]
        items = [r for r in items if pipeline in (None, r["pipeline"])]
        items = [r for r in items if status in (None, r["status"])]
        start = int(cursor or 0)
        page = items[start : start + limit]
        more = start + limit < len(items)
        return {"items": page, "next_cursor": str(start + limit) if more else None}

    @api.get("/runs/{run_id}")
    def run(run_id: str) -> dict[str, Any]:
        found = fake.poll(run_id)
        if found is None:
            raise HTTPException(404, f"no run {run_id}")
        return found

    @api.get("/errors")
    def errors(pipeline: str | None = None, limit: int = 50) -> dict[str, Any]:
        items = []
        for run_id in fake.runs:
            final = fake.latest(run_id)
            if final["error"] and pipeline in (None, final["pipeline"]):
                step = final["steps"][-1]
                items.append(
                    {
                        "id": len(items) + 1,
                        "run_id": run_id,
                        "scope": "step",
                        "pipeline": final["pipeline"],
                        "step_id": step["step_id"],
                        "attempt": 1,
                        "occurred_at": _now(),
                        **final["error"],
                    }
                )
        return {"items": items[:limit]}

    return api


def _serve(api: FastAPI) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = stack.free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the fake API did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[FakeConveyor, str, str]]:
    fake = FakeConveyor()
    control, control_thread, api_url = _serve(_control_app(fake))
    recorder, recorder_thread, recorder_url = _serve(_recorder_app(fake))
    yield fake, api_url, recorder_url
    for server, thread in ((control, control_thread), (recorder, recorder_thread)):
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def fake(servers: tuple[FakeConveyor, str, str]) -> FakeConveyor:
    return servers[0]


@pytest.fixture
def cli(servers: tuple[FakeConveyor, str, str]) -> Any:
    _, api_url, recorder_url = servers
    runner = CliRunner()
    env = {"CONVEYOR_API_URL": api_url, "CONVEYOR_RECORDER_URL": recorder_url, "COLUMNS": "200"}

    def invoke(*args: str) -> Any:
        return runner.invoke(app, list(args), env=env)

    return invoke


@pytest.fixture
def client(servers: tuple[FakeConveyor, str, str]) -> Iterator[ConveyorClient]:
    _, api_url, recorder_url = servers
    with ConveyorClient(api_url, recorder_url) as conveyor:
        yield conveyor


BROKEN = """
name: broken-pipe
steps:
  - id: first
    type: transform
    with: {template: "{{ input.x }}"}
  - id: second
    type: transform
    with: {template: "{{ steps.first.output }}"}
"""


def _apply_examples(cli: Any) -> Any:
    return cli("pipelines", "apply", str(EXAMPLES / "hello.yaml"), str(EXAMPLES / "fan-in.yaml"))


# --- pipelines apply / list ---------------------------------------------------------------


def test_apply_registers_each_file_then_reports_unchanged(cli: Any, fake: FakeConveyor) -> None:
    first = _apply_examples(cli)
    assert first.exit_code == 0, first.output
    assert "hello" in first.stdout
    assert "fan-in" in first.stdout
    sent = {r["filename"] for r in fake.registrations}
    assert {str(EXAMPLES / "hello.yaml"), str(EXAMPLES / "fan-in.yaml")} <= sent
    assert fake.registrations[-1]["source"] == (EXAMPLES / "fan-in.yaml").read_text()

    again = _apply_examples(cli)
    assert again.exit_code == 0, again.output
    assert "unchanged" in again.stdout
    assert "created" not in again.stdout
    assert [v["version"] for v in fake.pipelines["hello"]] == [1]


def test_apply_sends_nothing_when_any_file_is_invalid(
    cli: Any, fake: FakeConveyor, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsteps:\n  - id: a\n    type: nope\n")
    before = len(fake.registrations)
    result = cli("pipelines", "apply", str(EXAMPLES / "hello.yaml"), str(bad))
    assert result.exit_code == 2
    assert len(fake.registrations) == before
    assert f"{bad}: step 'a': field 'type': unknown step type 'nope'" in result.stderr
    assert "Traceback" not in result.output


def test_pipelines_list_table_and_json(cli: Any) -> None:
    assert _apply_examples(cli).exit_code == 0
    table = cli("pipelines", "list")
    assert table.exit_code == 0, table.output
    assert "hello" in table.stdout
    assert "v1" in table.stdout
    as_json = cli("pipelines", "list", "--json")
    names = {item["name"] for item in json.loads(as_json.stdout)["items"]}
    assert {"hello", "fan-in"} <= names


# --- run / run --follow -------------------------------------------------------------------


def test_run_prints_the_run_id_and_sends_parsed_input(cli: Any, fake: FakeConveyor) -> None:
    assert _apply_examples(cli).exit_code == 0
    # hello declares only `name`: an undeclared key would be refused (-i parsing of
    # numbers and lists is covered in test_cli_input)
    result = cli("run", "hello", "-i", "name=Ada", "--idempotency-key", "k1")
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip()
    assert run_id in fake.runs
    assert fake.triggers[-1] == {
        "pipeline": "hello",
        "input": {"name": "Ada"},
        "idempotency_key": "k1",
        "requested_by": "cli",
    }


def test_follow_exits_0_when_the_run_succeeds(cli: Any) -> None:
    assert _apply_examples(cli).exit_code == 0
    result = cli("run", "hello", "--follow", "-i", "name=Ada")
    assert result.exit_code == 0, result.output
    for step in ("greet", "shout", "summary"):
        assert f"step {step} (attempt 1) succeeded" in result.stdout
    assert "succeeded in 42 ms" in result.stdout


def test_follow_exits_1_when_the_run_fails(cli: Any, tmp_path: Path) -> None:
    definition = tmp_path / "broken.yaml"
    definition.write_text(BROKEN)
    assert cli("pipelines", "apply", str(definition)).exit_code == 0
    result = cli("run", "broken-pipe", "-i", "x=1", "--follow")
    assert result.exit_code == 1, result.output
    assert "step second (attempt 1) failed" in result.stdout
    assert "ValueError: boom" in result.stdout


def test_follow_gives_up_after_its_timeout_with_status_1(cli: Any) -> None:
    assert _apply_examples(cli).exit_code == 0
    result = cli("run", "hello", "--follow", "--timeout", "0")
    assert result.exit_code == 1, result.output
    assert "did not finish within 0s (status: not recorded yet)" in result.stderr


def test_run_of_an_unknown_pipeline_is_one_line_and_status_2(cli: Any) -> None:
    result = cli("run", "no-such-pipeline")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: no pipeline named 'no-such-pipeline' is registered"
    ]


def test_run_with_input_the_pipeline_rejects_is_status_2(cli: Any) -> None:
    assert _apply_examples(cli).exit_code == 0
    result = cli("run", "hello", "-i", "name=5")
    assert result.exit_code == 2
    assert "input 'name' must be string" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- runs list / show, errors ------------------------------------------------------------


def test_runs_list_json_is_the_recorders_page(cli: Any, fake: FakeConveyor) -> None:
    assert _apply_examples(cli).exit_code == 0
    run_id = cli("run", "fan-in").stdout.strip()
    result = cli("runs", "list", "--pipeline", "fan-in", "--json", "--limit", "500")
    assert result.exit_code == 0, result.output
    page = json.loads(result.stdout)
    assert set(page) == {"items", "next_cursor"}
    assert run_id in [item["id"] for item in page["items"]]
    assert {item["pipeline"] for item in page["items"]} == {"fan-in"}

    table = cli("runs", "list", "--status", "succeeded")
    assert table.exit_code == 0
    assert run_id in table.stdout
    bad = cli("runs", "list", "--status", "done")
    assert bad.exit_code == 2
    assert "--status 'done' is not one of" in bad.stderr


def test_runs_show_prints_every_attempt_and_the_traceback(cli: Any, tmp_path: Path) -> None:
    definition = tmp_path / "broken.yaml"
    definition.write_text(BROKEN)
    assert cli("pipelines", "apply", str(definition)).exit_code == 0
    run_id = cli("run", "broken-pipe", "-i", "x=1").stdout.strip()
    assert cli("run", "broken-pipe", "-i", "x=1", "--follow").exit_code == 1
    for _ in range(10):  # advance the scripted run to its end
        cli("runs", "show", run_id)

    shown = cli("runs", "show", run_id)
    assert shown.exit_code == 0, shown.output
    assert run_id in shown.stdout
    assert "failed" in shown.stdout
    assert "first" in shown.stdout
    assert "output of first" in shown.stdout
    assert "ValueError: boom" in shown.stdout
    assert 'File "step.py", line 3' in shown.stdout

    as_json = json.loads(cli("runs", "show", run_id, "--json").stdout)
    assert [s["step_id"] for s in as_json["steps"]] == ["first", "second"]

    errors = cli("errors", "--pipeline", "broken-pipe", "--traceback")
    assert errors.exit_code == 0, errors.output
    assert "ValueError: boom" in errors.stdout
    assert 'File "step.py"' in errors.stdout


def test_runs_show_of_an_unknown_run_is_one_line_and_status_2(cli: Any) -> None:
    result = cli("runs", "show", "0000")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["error: no run with id '0000' is recorded"]


# --- the Python client ---------------------------------------------------------------------


def test_client_waits_for_a_run_that_is_not_recorded_yet(client: ConveyorClient) -> None:
    client.register_pipeline((EXAMPLES / "hello.yaml").read_text(), filename="hello.yaml")
    accepted = client.trigger("hello", {"name": "Ada"})
    seen: list[str] = []
    final = client.wait_for_run(
        accepted["run_id"], poll_interval=0.01, on_update=lambda r: seen.append(r["status"])
    )
    assert final["status"] == "succeeded"
    assert seen[0] == "queued"
    assert "running" in seen


def test_client_raises_typed_errors(client: ConveyorClient) -> None:
    with pytest.raises(PipelineRejected) as rejected:
        client.register_pipeline("name: x\nsteps: []\n", filename="x.yaml")
    assert rejected.value.problems[0]["file"] == "x.yaml"
    assert rejected.value.problems[0]["field"] == "steps"
    with pytest.raises(NotFound, match="no run with id 'nope'"):
        client.get_run("nope")
    client.register_pipeline((EXAMPLES / "hello.yaml").read_text())
    with pytest.raises(Rejected, match="must be string"):
        client.trigger("hello", {"name": 1})
    assert client.api_healthy()
    assert client.recorder_healthy()
