"""Tools of an llm step: http tools against a local server and transform tools, through
the runner harness (so templates render as in production); invalid tools at registration
and at the runner; and the answer cache shared through Redis."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis.asyncio
from faststream.kafka import KafkaBroker

from conveyor.contracts import StepCompleted, StepFailed, StepReady, Topics
from conveyor.contracts.pipeline import PipelineInvalid, load_pipeline
from conveyor.runtime.runner import StepHarness
from conveyor.step_runner.http_step import HttpStep
from conveyor.step_runner.llm.cache import RedisAnswerCache
from conveyor.step_runner.llm.step import LlmStep
from conveyor.testing.fake_llm import FakeLLMServer, Reply, ToolCall
from tests.unit.test_llm_step import llm_settings, make_step

REDIS_URL = os.environ.get("CONVEYOR_REDIS_URL", "redis://127.0.0.1:6379/15")


class _Weather(BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def _answer(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        city = parse_qs(parts.query).get("city", [None])[0] or body.get("city")
        city = city or parts.path.rsplit("/", 1)[-1]
        type(self).seen.append(f"{self.command} {self.path}")
        data = json.dumps({"city": city, "forecast": "sunny", "celsius": 21}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def weather_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Weather)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
async def http_step() -> AsyncIterator[HttpStep]:
    async with httpx.AsyncClient(timeout=5) as client:
        yield HttpStep(client)


def harness(step: LlmStep) -> StepHarness:
    return StepHarness(broker=KafkaBroker(), topics=Topics("t"), executors={"llm": step})


def ready(config: dict[str, Any], context: dict[str, Any] | None = None) -> StepReady:
    return StepReady(
        run_id=uuid.uuid4(), pipeline="p", version=1, step_id="ask", attempt=1, kind="llm",
        config=config, context=context or {}, timeout_s=30,
    )  # fmt: skip


def weather_tool(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "get_weather",
        "description": "The weather forecast of a city",
        "type": "http",
        "with": {"method": "GET", "url": f"{url}/weather", **extra},
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"])
async def test_tool_round_trip(
    fake_llm: FakeLLMServer, http_step: HttpStep, weather_url: str, model: str
) -> None:
    name = model.split("/")[1]
    fake_llm.script(name, Reply(tool_calls=[ToolCall("get_weather", {"city": "Paris"})]))
    step = make_step(fake_llm, http=http_step)
    config = {
        "model": model,
        "prompt": "What is the weather in {{ input.city }}?",
        "tools": [weather_tool(weather_url)],
    }
    result = await harness(step).run_step(ready(config, {"input": {"city": "Paris"}}))
    await step.aclose()
    event = StepCompleted.model_validate_json(result)
    packet = event.output
    [round_] = packet["tool_rounds"]
    [call] = round_["calls"]
    assert call["name"] == "get_weather"
    assert call["arguments"] == {"city": "Paris"}
    assert call["result"]["body"] == {"city": "Paris", "forecast": "sunny", "celsius": 21}
    assert "Based on the tool result" in packet["text"]
    assert len(packet["attempts"]) == 2
    # The second request carries the tool result back in the provider's own format.
    second = fake_llm.requests[1].body["messages"]
    assert "sunny" in json.dumps(second)


async def test_tool_arguments_in_raw_templates(
    fake_llm: FakeLLMServer, http_step: HttpStep, weather_url: str
) -> None:
    fake_llm.script("gpt-4o-mini", Reply(tool_calls=[ToolCall("get_weather", {"city": "Oslo"})]))
    tool = weather_tool(weather_url)
    tool["with"] = {
        "method": "POST",
        "url": weather_url + "/city/{% raw %}{{ args.city }}{% endraw %}",
    }
    step = make_step(fake_llm, http=http_step)
    config = {"model": "openai/gpt-4o-mini", "prompt": "Weather?", "tools": [tool]}
    event = StepCompleted.model_validate_json(await harness(step).run_step(ready(config)))
    await step.aclose()
    assert "POST /city/Oslo" in _Weather.seen
    assert event.output["tool_rounds"][0]["calls"][0]["result"]["body"]["city"] == "Oslo"


async def test_tool_rounds_exceeded(
    fake_llm: FakeLLMServer, http_step: HttpStep, weather_url: str
) -> None:
    calls = [Reply(tool_calls=[ToolCall("get_weather", {"city": f"c{i}"})]) for i in range(3)]
    fake_llm.script("gpt-4o-mini", *calls)
    step = make_step(fake_llm, http=http_step)
    config = {"model": "openai/gpt-4o-mini", "prompt": "Weather?", "max_tool_rounds": 2,
              "tools": [weather_tool(weather_url)]}  # fmt: skip
    event = StepFailed.model_validate_json(await harness(step).run_step(ready(config)))
    await step.aclose()
    assert event.error.type == "ToolRoundsExceeded"
    assert event.error.retryable is False
    assert len(event.error.details["tool_rounds"]) == 2
    # three billed answers: the failure still reports their tokens (they count to a budget)
    assert event.metrics.tokens_in == event.error.details["usage"]["tokens_in"] > 0


async def test_answers_are_cached_in_redis_across_processes(fake_llm: FakeLLMServer) -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:
        pytest.skip(f"no Redis at {REDIS_URL}: {exc!r}")
    finally:
        await client.aclose()
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    settings = llm_settings(
        fake_llm, CONVEYOR_REDIS_URL=REDIS_URL, CONVEYOR_LLM_REDIS_PREFIX=prefix
    )
    config = {"model": "openai/gpt-4o-mini", "prompt": "cache me", "cache": True}
    first_step, second_step = LlmStep(settings), LlmStep(settings)  # two "processes"
    assert isinstance(first_step._cache, RedisAnswerCache)
    first = StepCompleted.model_validate_json(await harness(first_step).run_step(ready(config)))
    second = StepCompleted.model_validate_json(await harness(second_step).run_step(ready(config)))
    await first_step.aclose()
    await second_step.aclose()
    assert first.output["cache_hit"] is False
    assert second.output["cache_hit"] is True
    assert second.metrics.cache_hit is True
    assert second.metrics.cost == 0
    assert second.output["saved_cost"] == pytest.approx(first.metrics.cost)
    assert len(fake_llm.requests) == 1


def add_tool(**extra: Any) -> dict[str, Any]:
    """A transform tool: the harness renders ``input``, the tool ``args``."""
    return {
        "name": "add",
        "description": "Adds two numbers",
        "type": "transform",
        "with": {
            "template": {
                "sum": "{% raw %}{{ args.a + args.b }}{% endraw %}",
                "for": "{{ input.name }}",
            }
        },
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        },
        **extra,
    }


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"])
async def test_transform_tool_round_trip(fake_llm: FakeLLMServer, model: str) -> None:
    name = model.split("/")[1]
    fake_llm.script(name, Reply(tool_calls=[ToolCall("add", {"a": 2, "b": 40})]))
    step = make_step(fake_llm)  # the transform executor needs nothing from the process
    config = {"model": model, "prompt": "What is 2 + 40?", "tools": [add_tool()]}
    result = await harness(step).run_step(ready(config, {"input": {"name": "Ada"}}))
    await step.aclose()
    packet = StepCompleted.model_validate_json(result).output
    [round_] = packet["tool_rounds"]
    assert round_["model"] == model
    assert round_["calls"] == [
        {
            "name": "add",
            "kind": "transform",
            "arguments": {"a": 2, "b": 40},
            "result": {"sum": 42, "for": "Ada"},
        }
    ]
    assert "Based on the tool result" in packet["text"]
    # The model was told about the tool and got its result back in its provider's format.
    first, second = (r.body for r in fake_llm.requests)
    assert "add" in json.dumps(first["tools"])
    assert '"sum": 42' in json.dumps(second["messages"]).replace('\\"', '"')


async def test_http_and_transform_tools_in_one_step(
    fake_llm: FakeLLMServer, http_step: HttpStep, weather_url: str
) -> None:
    both = [ToolCall("get_weather", {"city": "Lima"}), ToolCall("add", {"a": 1, "b": 2})]
    # A failing tool is the model's business: a 200 outside expect, a missing argument.
    failing = [ToolCall("strict_weather", {"city": "Rome"}), ToolCall("add", {"a": 1})]
    fake_llm.script("gpt-4o-mini", Reply(tool_calls=both), Reply(tool_calls=failing))
    strict = {**weather_tool(weather_url, expect=[201]), "name": "strict_weather"}
    step = make_step(fake_llm, http=http_step)
    config = {"model": "openai/gpt-4o-mini", "prompt": "Weather and sums?",
              "tools": [weather_tool(weather_url), add_tool(), strict]}  # fmt: skip
    event = StepCompleted.model_validate_json(
        await harness(step).run_step(ready(config, {"input": {"name": "Bo"}}))
    )
    await step.aclose()
    first, second = event.output["tool_rounds"]
    weather, added = first["calls"]
    assert (weather["kind"], weather["arguments"]) == ("http", {"city": "Lima"})
    assert weather["result"] == {
        "status": 200,
        "body": {"city": "Lima", "forecast": "sunny", "celsius": 21},
    }
    assert (added["kind"], added["result"]) == ("transform", {"sum": 3, "for": "Bo"})
    failed_http, failed_add = second["calls"]
    assert "result" not in failed_http
    assert failed_http["error"]["type"] == "HttpStatusError"
    assert failed_http["error"]["status"] == 200
    assert failed_add["error"]["type"] == "InvalidArguments"
    assert "args.a + args.b" in failed_add["error"]["message"]
    # The errors went back to the model as the tools' results.
    third = json.dumps(fake_llm.requests[2].body["messages"])
    assert "HttpStatusError" in third
    assert "InvalidArguments" in third
    assert len(event.output["attempts"]) == 3


async def test_invalid_tool_config_is_a_clear_error(
    fake_llm: FakeLLMServer, http_step: HttpStep
) -> None:
    bad_http = {"name": "fetch", "type": "http", "with": {"method": "GET"}}  # no url
    bad_template = add_tool(**{"with": {"template": "{% raw %}{{ args.a + }}{% endraw %}"}})
    pipeline = {
        "name": "tools",
        "steps": [
            {"id": "ask", "type": "llm",
             "with": {"model": "openai/gpt-4o-mini", "prompt": "hi", "tools": [bad_http]}},
        ],
    }  # fmt: skip
    with pytest.raises(PipelineInvalid) as caught:
        load_pipeline(pipeline, source="pipelines/tools.yaml")
    [problem] = caught.value.problems
    assert (problem.file, problem.step) == ("pipelines/tools.yaml", "ask")
    assert (problem.field, problem.message) == ("with.tools.0.with.url", "Field required")

    step = make_step(fake_llm, http=http_step)
    for tool, expected in [
        (bad_http, "tools.0.with.url: Field required"),
        (bad_template, "tools[add].with.template"),
    ]:
        config = {"model": "openai/gpt-4o-mini", "prompt": "hi", "tools": [tool]}
        event = StepFailed.model_validate_json(await harness(step).run_step(ready(config)))
        assert event.error.type == "ConfigError"
        assert expected in event.error.message
    await step.aclose()
    assert fake_llm.requests == []  # a configuration error fails before the model is asked


async def test_media_kind_as_a_tool_is_a_registration_error(fake_llm: FakeLLMServer) -> None:
    probe = {"name": "probe", "type": "media.probe", "with": {"source": "a.mp4"}}
    pipeline = {
        "name": "tools",
        "steps": [
            {"id": "ask", "type": "llm",
             "with": {"model": "openai/gpt-4o-mini", "prompt": "hi", "tools": [probe]}},
        ],
    }  # fmt: skip
    with pytest.raises(PipelineInvalid) as caught:
        load_pipeline(pipeline, source="pipelines/tools.yaml")
    [problem] = caught.value.problems
    assert (problem.file, problem.step, problem.field) == (
        "pipelines/tools.yaml",
        "ask",
        "with.tools.0.type",
    )
    assert "'media.probe' steps run in the media service" in problem.message
    assert "a tool's type is one of: transform, http" in problem.message
    assert "pipelines/tools.yaml: step 'ask': field 'with.tools.0.type'" in str(caught.value)
    # And a runner handed one anyway (an old version) fails the step the same way.
    step = make_step(fake_llm)
    config = {"model": "openai/gpt-4o-mini", "prompt": "hi", "tools": [probe]}
    event = StepFailed.model_validate_json(await harness(step).run_step(ready(config)))
    await step.aclose()
    assert event.error.type == "ConfigError"
    assert "tools.0.type" in event.error.message
    assert fake_llm.requests == []
