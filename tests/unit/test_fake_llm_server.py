"""The fake LLM server as a thing to run: lifecycle, its own process, concurrency, and
requests a real provider would refuse."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from conveyor.testing.fake_llm import FakeLLMServer, Reply


@pytest.fixture
def process_url() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "conveyor.testing.fake_llm", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def user(text: str = "hello") -> list[Any]:
    return [{"role": "user", "content": text}]


async def test_server_lifecycle_and_addresses() -> None:
    server = FakeLLMServer()
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.url

    with server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.openai_base_url == f"{server.url}/v1"
        assert server.anthropic_base_url == server.url
        client = AsyncOpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0)
        completion = await client.chat.completions.create(model="m", messages=user())
        assert completion.choices[0].message.content == "[fake m] hello"
        await client.close()

    client = AsyncOpenAI(base_url=server.openai_base_url, api_key="k", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=user())
    await client.close()


async def test_a_taken_port_fails_to_start(fake_llm: FakeLLMServer) -> None:
    with pytest.raises(OSError):  # noqa: PT011 - the errno differs between platforms
        FakeLLMServer(port=fake_llm.port).start()


async def test_runs_as_a_process_and_prints_its_url(process_url: str) -> None:
    assert process_url.startswith("http://127.0.0.1:")
    oai = AsyncOpenAI(base_url=f"{process_url}/v1", api_key="test", max_retries=0)
    claude = AsyncAnthropic(base_url=process_url, api_key="test", max_retries=0)

    completion = await oai.chat.completions.create(model="gpt-4o-mini", messages=user("demo"))
    message = await claude.messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=user("demo")
    )

    assert completion.choices[0].message.content == "[fake gpt-4o-mini] demo"
    assert message.content[0].type == "text"
    assert message.content[0].text == "[fake claude-haiku-4-5] demo"
    await oai.close()
    await claude.close()


async def test_concurrent_requests_consume_each_reply_once(fake_llm: FakeLLMServer) -> None:
    client = AsyncOpenAI(base_url=fake_llm.openai_base_url, api_key="test", max_retries=0)
    scripting = [
        threading.Thread(target=fake_llm.script, args=(None, *[f"t{t}-{i}" for i in range(10)]))
        for t in range(4)
    ]
    for thread in scripting:
        thread.start()
    for thread in scripting:
        thread.join()

    completions = await asyncio.gather(
        *[client.chat.completions.create(model="gpt-4o-mini", messages=user()) for _ in range(40)]
    )

    answers = sorted(c.choices[0].message.content or "" for c in completions)
    assert answers == sorted(f"t{t}-{i}" for t in range(4) for i in range(10))
    assert len(fake_llm.requests) == 40
    assert fake_llm.pending() == 0
    await client.close()


async def test_streamed_requests_are_recorded_as_such(fake_llm: FakeLLMServer) -> None:
    client = AsyncAnthropic(base_url=fake_llm.anthropic_base_url, api_key="test", max_retries=0)
    fake_llm.script("claude-haiku-4-5", Reply(text="scripted stream", headers={"x-fake": "1"}))

    async with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=64, messages=user()
    ) as stream:
        text = await stream.get_final_text()
        assert stream.response.headers["x-fake"] == "1"

    assert text == "scripted stream"
    [request] = fake_llm.requests
    assert request.stream
    assert request.body["max_tokens"] == 64


async def test_scripted_usage_overrides_the_word_count(fake_llm: FakeLLMServer) -> None:
    client = AsyncOpenAI(base_url=fake_llm.openai_base_url, api_key="test", max_retries=0)
    fake_llm.script(None, Reply(text="x", usage=(1000, 250)))

    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=user())

    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (1000, 250)


async def test_invalid_requests_are_refused_in_provider_shape(fake_llm: FakeLLMServer) -> None:
    oai = AsyncOpenAI(base_url=fake_llm.openai_base_url, api_key="test", max_retries=0)
    claude = AsyncAnthropic(base_url=fake_llm.anthropic_base_url, api_key="test", max_retries=0)
    fake_llm.script(None, Reply(text="never used"))

    with pytest.raises(openai.BadRequestError) as no_messages:
        await oai.chat.completions.create(model="gpt-4o-mini", messages=[])
    with pytest.raises(anthropic.BadRequestError) as no_turns:
        await claude.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=[])

    assert no_messages.value.param == "messages"
    assert no_messages.value.type == "invalid_request_error"
    assert isinstance(no_turns.value.body, dict)
    assert no_turns.value.body["error"]["type"] == "invalid_request_error"
    assert fake_llm.pending() == 1  # a refused request never reaches the model


async def test_anthropic_token_count(fake_llm: FakeLLMServer) -> None:
    client = AsyncAnthropic(base_url=fake_llm.anthropic_base_url, api_key="test", max_retries=0)

    counted = await client.messages.count_tokens(
        model="claude-haiku-4-5", messages=user("count these five words please")
    )

    assert counted.input_tokens > 0
