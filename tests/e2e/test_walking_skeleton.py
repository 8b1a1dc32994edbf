"""One trigger event runs a pipeline end to end: scheduler, runners and recorder as OS
processes over the real broker and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

HELLO = """
name: {name}
input: {{name: {{type: string, default: world}}}}
steps:
  - id: greet
    type: transform
    with: {{template: "hello {{{{ input.name }}}}"}}
  - id: shout
    type: transform
    with: {{template: "{{{{ steps.greet.output | upper }}}}!"}}
  - id: summary
    type: transform
    needs: [greet, shout]
    with:
      template:
        greeting: "{{{{ steps.shout.output }}}}"
        length: "{{{{ steps.greet.output | length }}}}"
"""


def _hello(stack: Stack) -> str:
    name = f"hello-{uuid.uuid4().hex[:6]}"
    stack.register(HELLO.format(name=name))
    return name


def test_a_plain_kafka_trigger_runs_the_pipeline_and_the_recorder_shows_every_output(
    conveyor_stack: Stack,
) -> None:
    name = _hello(conveyor_stack)
    run_id = conveyor_stack.trigger(name, {"name": "Ada"})
    run = conveyor_stack.wait_for_run(run_id)
    assert run["status"] == "succeeded", run
    assert run["pipeline"] == name
    assert run["version"] == 1
    assert run["input"] == {"name": "Ada"}
    outputs = {step["step_id"]: step["output"] for step in run["steps"]}
    assert outputs == {
        "greet": "hello Ada",
        "shout": "HELLO ADA!",
        "summary": {"greeting": "HELLO ADA!", "length": 9},
    }
    assert run["output"] == {"greeting": "HELLO ADA!", "length": 9}
    assert all(step["status"] == "succeeded" and step["attempt"] == 1 for step in run["steps"])
    assert all(step["started_at"] and step["finished_at"] for step in run["steps"])
    assert run["started_at"]
    assert run["finished_at"]
    events = conveyor_stack.get(f"/runs/{run_id}/events").json()["items"]
    types = [e["type"] for e in events]
    assert types[:2] == ["RunQueued", "RunStarted"]
    assert types.count("StepCompleted") == 3
    assert "RunCompleted" in types


def test_a_bare_trigger_with_only_pipeline_and_input_is_enough(conveyor_stack: Stack) -> None:
    name = _hello(conveyor_stack)
    conveyor_stack.produce(
        conveyor_stack.topics.runs_requested, json.dumps({"pipeline": name}).encode()
    )
    runs = conveyor_stack.wait_for(
        "/runs",
        lambda body: body["items"] and body["items"][0]["status"] == "succeeded",
        pipeline=name,
    )
    [run] = runs["items"]
    detail = conveyor_stack.get(f"/runs/{run['id']}").json()
    assert detail["output"]["greeting"] == "HELLO WORLD!"


def test_a_trigger_for_an_unknown_pipeline_fails_with_a_clear_reason(conveyor_stack: Stack) -> None:
    run_id = conveyor_stack.trigger("no-such-pipeline")
    run = conveyor_stack.wait_for_run(run_id)
    assert run["status"] == "failed"
    assert run["error"]["type"] == "UnknownPipeline"
    assert "no pipeline named 'no-such-pipeline' is registered" in run["error"]["message"]


def test_bad_messages_go_to_the_dlq_and_the_next_trigger_still_completes(
    conveyor_stack: Stack,
) -> None:
    topic = conveyor_stack.topics.runs_requested
    marker = uuid.uuid4().hex
    key = marker.encode()  # one key, one partition: the offsets give the order they were sent
    conveyor_stack.produce(topic, b'{"pipeline": "x", ' + key, key=key)  # malformed JSON
    conveyor_stack.produce(topic, json.dumps({"pipeline": 42, "input": marker}).encode(), key=key)

    def both_recorded(body: dict[str, Any]) -> bool:
        return len([d for d in body["items"] if marker in (d["value"] or "")]) == 2

    letters = conveyor_stack.wait_for("/dead-letters", both_recorded)["items"]
    mine = sorted((d for d in letters if marker in (d["value"] or "")), key=lambda d: d["offset"])
    assert all(d["source_topic"] == topic for d in mine)
    assert "not JSON" in mine[0]["reason"]
    assert "invalid event" in mine[1]["reason"]
    assert "pipeline" in mine[1]["reason"]
    errors = conveyor_stack.get("/errors", limit=100).json()["items"]
    assert sum(1 for e in errors if e["scope"] == "dead_letter") >= 2
    name = _hello(conveyor_stack)
    run = conveyor_stack.wait_for_run(conveyor_stack.trigger(name, {"name": "after"}))
    assert run["status"] == "succeeded"


class _Api(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path == "/boom":
            payload = json.dumps({"error": "exploded"}).encode()
            self.send_response(500)
        else:
            payload = json.dumps({"echo": body, "auth": self.headers.get("authorization")}).encode()
            self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def local_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


HTTP_PIPELINE = """
name: {name}
input: {{company: {{type: string}}}}
steps:
  - id: lookup
    type: http
    with:
      method: POST
      url: "{url}"
      json: {{name: "{{{{ input.company }}}}"}}
  - id: pick
    type: transform
    with: {{template: "{{{{ steps.lookup.output.json.echo.name }}}}"}}
"""


def test_an_http_step_calls_a_real_server_and_its_packet_feeds_the_next_step(
    conveyor_stack: Stack, local_api: str
) -> None:
    name = f"http-{uuid.uuid4().hex[:6]}"
    conveyor_stack.register(HTTP_PIPELINE.format(name=name, url=f"{local_api}/lookup"))
    run = conveyor_stack.wait_for_run(conveyor_stack.trigger(name, {"company": "Acme"}))
    assert run["status"] == "succeeded", run
    lookup = next(s for s in run["steps"] if s["step_id"] == "lookup")
    assert lookup["output"]["status"] == 200
    assert lookup["output"]["json"]["echo"] == {"name": "Acme"}
    assert lookup["input"]["json"] == {"name": "Acme"}
    assert run["output"] == "Acme"


def test_an_http_500_is_recorded_as_a_step_error_and_fails_the_run(
    conveyor_stack: Stack, local_api: str
) -> None:
    name = f"http-boom-{uuid.uuid4().hex[:6]}"
    conveyor_stack.register(HTTP_PIPELINE.format(name=name, url=f"{local_api}/boom"))
    run = conveyor_stack.wait_for_run(conveyor_stack.trigger(name, {"company": "Acme"}))
    assert run["status"] == "failed"
    [lookup] = [s for s in run["steps"] if s["step_id"] == "lookup"]
    assert lookup["status"] == "failed"
    assert lookup["error"]["type"] == "HttpStatusError"
    assert "500" in lookup["error"]["message"]
    assert lookup["error"]["retryable"] is True
    assert not [s for s in run["steps"] if s["step_id"] == "pick"]
    errors = conveyor_stack.get("/errors", pipeline=name).json()["items"]
    assert {e["scope"] for e in errors} == {"step", "run"}
    assert all(e["type"] == "HttpStatusError" for e in errors)


def test_a_run_is_one_trace_across_every_service(conveyor_stack: Stack) -> None:
    name = _hello(conveyor_stack)
    run_id = conveyor_stack.trigger(name, {"name": "Trace"})
    run = conveyor_stack.wait_for_run(run_id)
    trace_id = run["trace_id"]
    assert trace_id
    assert len(trace_id) == 32
    events = conveyor_stack.get(f"/runs/{run_id}/events").json()["items"]
    assert {e["trace_id"] for e in events} == {trace_id}

    def services_in_trace() -> set[str]:
        spans = [json.loads(line) for line in conveyor_stack.trace_file.read_text().splitlines()]
        return {s["service"] for s in spans if s["trace_id"] == trace_id}

    expected = {"conveyor-scheduler", "conveyor-step-runner", "conveyor-run-recorder"}
    deadline = time.monotonic() + 10
    while services_in_trace() != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert services_in_trace() == expected
    # each service's consumer span is in it: the step-runner's for the StepReady it took,
    # the scheduler's for the result it advanced on
    spans = [json.loads(line) for line in conveyor_stack.trace_file.read_text().splitlines()]
    consumed = {
        (s["service"], s["name"].split(".", 1)[1])
        for s in spans
        if s["trace_id"] == trace_id and s["name"].endswith(" process")
    }
    assert ("conveyor-step-runner", "steps.ready.transform process") in consumed
    assert ("conveyor-scheduler", "steps.completed process") in consumed


PROBE = """
name: {name}
input: {{file: {{type: string}}}}
steps:
  - id: probe
    type: media.probe
    with: {{source: "{{{{ input.file }}}}"}}
  - id: describe
    type: transform
    with: {{template: "{{{{ steps.probe.output.streams | length }}}} streams"}}
"""


def test_a_media_probe_step_runs_on_the_media_service_with_real_ffmpeg(
    conveyor_stack: Stack,
) -> None:
    import subprocess

    import imageio_ffmpeg

    clip = conveyor_stack.media_root / "clip.mp4"
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", "testsrc=duration=2:size=320x240:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
            "-shortest", "-pix_fmt", "yuv420p", str(clip),
        ],
        check=True,
    )  # fmt: skip
    name = f"probe-{uuid.uuid4().hex[:6]}"
    conveyor_stack.register(PROBE.format(name=name))
    run = conveyor_stack.wait_for_run(conveyor_stack.trigger(name, {"file": "clip.mp4"}))
    assert run["status"] == "succeeded", run
    probe = next(s for s in run["steps"] if s["step_id"] == "probe")["output"]
    assert abs(probe["duration"] - 2.0) < 0.2
    video = next(s for s in probe["streams"] if s["type"] == "video")
    assert (video["width"], video["height"]) == (320, 240)
    assert {s["type"] for s in probe["streams"]} == {"video", "audio"}
    assert run["output"] == "2 streams"

    escape = conveyor_stack.wait_for_run(conveyor_stack.trigger(name, {"file": "../../etc/passwd"}))
    assert escape["status"] == "failed"
    [step] = escape["steps"]
    assert step["error"]["type"] == "PathOutsideRoot"


def test_every_example_pipeline_runs_to_success(conveyor_stack: Stack, repo_root: Path) -> None:
    from conveyor.cli._prompts import PromptLibrary

    library = PromptLibrary.load(repo_root / "prompts")
    examples = sorted((repo_root / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        source = path.read_text()
        prompts, problems = library.for_pipeline(source)
        assert not problems
        registered = conveyor_stack.register(source, filename=path.name, prompts=prompts)
        run = conveyor_stack.wait_for_run(conveyor_stack.trigger(registered["name"]))
        assert run["status"] == "succeeded", (path.name, run)
        assert all(step["status"] == "succeeded" for step in run["steps"]), run["steps"]


def test_an_invalid_definition_is_rejected_whole_and_nothing_is_registered(
    conveyor_stack: Stack,
) -> None:
    import httpx

    name = f"broken-{uuid.uuid4().hex[:6]}"
    source = f"""
name: {name}
steps:
  - {{id: fine, type: transform, with: {{template: "ok"}}}}
  - {{id: bad, type: teleport}}
  - {{id: worse, type: transform, needs: [ghost], with: {{template: "x"}}}}
"""
    response = httpx.post(
        f"{conveyor_stack.api_url}/pipelines", json={"source": source, "filename": "broken.yaml"}
    )
    assert response.status_code == 422
    problems = response.json()["detail"]["problems"]
    assert {(p["file"], p["step"], p["field"]) for p in problems} >= {
        ("broken.yaml", "bad", "type"),
        ("broken.yaml", "worse", "needs"),
    }
    listed = httpx.get(f"{conveyor_stack.api_url}/pipelines").json()["items"]
    assert name not in {p["name"] for p in listed}
    trigger = httpx.post(f"{conveyor_stack.api_url}/runs", json={"pipeline": name})
    assert trigger.status_code == 404
    assert f"no pipeline named '{name}'" in trigger.json()["detail"]
