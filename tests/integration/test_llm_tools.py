"""Tools of an llm step: http tools against a local server, through the runner harness
(so templates render as in production), and the answer cache shared through Redis."""

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
