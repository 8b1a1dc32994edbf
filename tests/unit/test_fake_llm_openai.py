"""The fake LLM provider through the real `openai` SDK: chat, structured output, tools,
streaming, and what tests script and assert on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel

from conveyor.testing.fake_llm import FakeLLMServer, Reply, ToolCall

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture
def client(fake_llm: FakeLLMServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=fake_llm.openai_base_url, api_key="test", max_retries=0)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def test_chat_completion_answers_from_the_prompt_with_usage(client: AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Summarise the history of the bicycle"},
        ],
        temperature=0.2,
    )
    completion = raw.parse()

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini"
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == "[fake gpt-4o-mini] Summarise the history of the bicycle"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 12  # 9 words x 1.3, rounded up
    assert completion.usage.completion_tokens == 11  # 8 words x 1.3, rounded up
    assert completion.usage.total_tokens == 23
    assert raw.headers["x-ratelimit-limit-requests"] == "10000"
    assert raw.headers["x-ratelimit-remaining-requests"] == "9999"
    assert raw.headers["x-ratelimit-reset-requests"]
    assert raw.headers["x-ratelimit-limit-tokens"] == "2000000"
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(2_000_000 - 23)
    assert raw.headers["x-ratelimit-reset-tokens"]


async def test_scripted_replies_are_consumed_in_order_per_model(
    fake_llm: FakeLLMServer, client: AsyncOpenAI
) -> None:
    fake_llm.script("gpt-4o", Reply(text="first"), "second")
    fake_llm.script(None, Reply(text="for anyone"))

    async def ask(model: str) -> str | None:
        completion = await client.chat.completions.create(model=model, messages=user("hi"))
        return completion.choices[0].message.content

    assert await ask("gpt-4o") == "first"
    assert await ask("gpt-4o-mini") == "for anyone"
    assert await ask("gpt-4o") == "second"
    assert await ask("gpt-4o") == "[fake gpt-4o] hi"
    assert fake_llm.pending("gpt-4o") == 0


async def test_requests_are_recorded_with_body_and_headers(
    fake_llm: FakeLLMServer, client: AsyncOpenAI
) -> None:
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=user("hello"), max_completion_tokens=50, stop=["END"]
    )

    [request] = fake_llm.requests
    assert request.provider == "openai"
    assert request.path == "/v1/chat/completions"
    assert request.model == "gpt-4o-mini"
    assert request.body["max_completion_tokens"] == 50
    assert request.body["stop"] == ["END"]
    assert request.headers["authorization"] == "Bearer test"
    assert not request.stream
    fake_llm.reset()
    assert fake_llm.requests == []


async def test_structured_output_parses_into_a_pydantic_model(
    fake_llm: FakeLLMServer, client: AsyncOpenAI
) -> None:
    class Article(BaseModel):
        title: str
        body: str
        tags: list[str]
        word_count: int

    completion = await client.chat.completions.parse(
        model="gpt-4o-mini",
        messages=user("Write a short article about otters"),
        response_format=Article,
    )

    article = completion.choices[0].message.parsed
    assert isinstance(article, Article)
    assert article.title == "Title: Write a short article about otters"
    assert len(article.tags) == 3
    assert [tag.split(":")[0] for tag in article.tags] == ["Tag 1", "Tag 2", "Tag 3"]
    response_format = fake_llm.requests[0].body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["strict"] is True


async def test_json_object_mode_returns_a_json_object(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=user("Reply in JSON: what is 2 + 2?"),
        response_format={"type": "json_object"},
    )

    content = completion.choices[0].message.content
    assert content is not None
    assert json.loads(content) == {"answer": "Reply in JSON: what is 2 + 2?"}


async def test_scripted_json_is_the_content(fake_llm: FakeLLMServer, client: AsyncOpenAI) -> None:
    fake_llm.script("gpt-4o-mini", Reply(json={"title": "Otters", "body": "They float."}))

    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=user("article please"),
        response_format={"type": "json_object"},
    )

    assert json.loads(completion.choices[0].message.content or "") == {
        "title": "Otters",
        "body": "They float.",
    }


async def test_tool_call_round_trip(fake_llm: FakeLLMServer, client: AsyncOpenAI) -> None:
    messages: list[Any] = user("What is the weather in Paris?")

    first = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL]
    )

    assert first.choices[0].finish_reason == "tool_calls"
    [call] = first.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"}
    assert arguments["unit"] == "c"

    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"})
    final = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, tools=[WEATHER_TOOL]
    )

    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content == (
        "[fake gpt-4o-mini] Based on the tool result: 18 degrees, sunny"
    )
    assert fake_llm.requests[1].body["messages"][2]["tool_call_id"] == call.id


async def test_scripted_tool_calls_and_forced_tool_choice(
    fake_llm: FakeLLMServer, client: AsyncOpenAI
) -> None:
    fake_llm.script(
        "gpt-4o-mini",
        Reply(tool_calls=[ToolCall("get_weather", {"city": "Oslo"}, id="call_scripted")]),
        Reply(json={"city": "Rome", "unit": "f"}),
    )
    forced: Any = {"type": "function", "function": {"name": "get_weather"}}

    scripted = await client.chat.completions.create(
        model="gpt-4o-mini", messages=user("hi"), tools=[WEATHER_TOOL]
    )
    from_json = await client.chat.completions.create(
        model="gpt-4o-mini", messages=user("hi"), tools=[WEATHER_TOOL], tool_choice=forced
    )

    [call] = scripted.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert (call.id, call.function.name) == ("call_scripted", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    [call] = from_json.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert json.loads(call.function.arguments) == {"city": "Rome", "unit": "f"}


async def test_streaming_text_with_usage_in_the_final_chunk(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=user("Tell me about streaming responses"),
        stream=True,
        stream_options={"include_usage": True},
    )

    chunks = [chunk async for chunk in stream]

    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "[fake gpt-4o-mini] Tell me about streaming responses"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 10
    assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_streaming_tool_call_accumulates_with_the_sdk_helper(client: AsyncOpenAI) -> None:
    async with client.chat.completions.stream(
        model="gpt-4o-mini", messages=user("weather in Lima?"), tools=[WEATHER_TOOL]
    ) as stream:
        completion = await stream.get_final_completion()

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["unit"] == "c"


async def test_max_tokens_truncates_with_finish_reason_length(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=user("one two three four five six seven eight nine ten"),
        max_tokens=5,
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content == "[fake gpt-4o-mini] one"
    assert completion.usage is not None
    assert completion.usage.completion_tokens <= 5


async def test_stop_sequence_cuts_the_answer(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=user("alpha beta STOP gamma"), stop="STOP"
    )

    assert completion.choices[0].message.content == "[fake gpt-4o-mini] alpha beta "
    assert completion.choices[0].finish_reason == "stop"


async def test_models_are_listed(client: AsyncOpenAI) -> None:
    models = [model.id async for model in client.models.list()]

    assert "gpt-4o-mini" in models
    assert "claude-haiku-4-5" in models
