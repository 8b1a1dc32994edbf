"""The fake LLM provider through the real `anthropic` SDK: messages, tools, structured
output, streaming, stop sequences and refusals."""

from __future__ import annotations

from typing import Any

import pytest
from anthropic import AsyncAnthropic
from pydantic import BaseModel, Field

from conveyor.testing.fake_llm import FakeLLMServer, Reply, ToolCall

WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city"],
    },
}
CALENDAR_TOOL: Any = {
    "name": "book_meeting",
    "description": "Book a meeting in the calendar",
    "input_schema": {"type": "object", "properties": {"title": {"type": "string"}}},
}


@pytest.fixture
def client(fake_llm: FakeLLMServer) -> AsyncAnthropic:
    return AsyncAnthropic(base_url=fake_llm.anthropic_base_url, api_key="test", max_retries=0)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def test_message_with_system_and_content_blocks(
    fake_llm: FakeLLMServer, client: AsyncAnthropic
) -> None:
    raw = await client.messages.with_raw_response.create(
        model="claude-haiku-4-5",
        max_tokens=256,
        system="You are terse.",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Name three rivers in Peru"}]}
        ],
    )
    message = await raw.parse()

    assert message.type == "message"
    assert message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == "claude-haiku-4-5"
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    [block] = message.content
    assert block.type == "text"
    assert block.text == "[fake claude-haiku-4-5] Name three rivers in Peru"
    assert message.usage.input_tokens == 11  # 8 words x 1.3, rounded up
    assert message.usage.output_tokens == 10  # 7 words x 1.3, rounded up
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "10000"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "9999"
    assert raw.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
    assert raw.headers["anthropic-ratelimit-tokens-remaining"] == str(2_000_000 - 21)
    assert raw.headers["anthropic-ratelimit-input-tokens-limit"]
    assert raw.headers["anthropic-ratelimit-output-tokens-reset"]
    [request] = fake_llm.requests
    assert (request.provider, request.path) == ("anthropic", "/v1/messages")
    credential = request.headers.get("x-api-key") or request.headers["authorization"]
    assert credential.endswith("test")
    assert request.headers["anthropic-version"]


async def test_tool_use_round_trip(fake_llm: FakeLLMServer, client: AsyncAnthropic) -> None:
    messages: list[Any] = user("Book a meeting about the budget")

    first = await client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=256,
        messages=messages,
        tools=[WEATHER_TOOL, CALENDAR_TOOL],
    )

    assert first.stop_reason == "tool_use"
    [tool_use] = first.content
    assert tool_use.type == "tool_use"
    assert tool_use.id.startswith("toolu_")
    assert tool_use.name == "book_meeting"  # the tool whose words match the prompt
    assert tool_use.input == {"title": "Title: Book a meeting about the budget"}

    messages.append({"role": "assistant", "content": [b.model_dump() for b in first.content]})
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": tool_use.id, "content": "Booked 10:00"}
            ],
        }
    )
    final = await client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=256,
        messages=messages,
        tools=[WEATHER_TOOL, CALENDAR_TOOL],
    )

    assert final.stop_reason == "end_turn"
    [block] = final.content
    assert block.type == "text"
    assert block.text == "[fake claude-sonnet-4-6] Based on the tool result: Booked 10:00"


async def test_forced_tool_choice_with_scripted_json_input(
    fake_llm: FakeLLMServer, client: AsyncAnthropic
) -> None:
    fake_llm.script(
        "claude-haiku-4-5",
        Reply(json={"city": "Quito", "days": 2}),
        Reply(text="Let me check.", tool_calls=[ToolCall("get_weather", {"city": "Lima"})]),
    )

    forced = await client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=64,
        messages=user("hi"),
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    scripted = await client.messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=user("hi"), tools=[WEATHER_TOOL]
    )

    [tool_use] = forced.content
    assert tool_use.type == "tool_use"
    assert tool_use.input == {"city": "Quito", "days": 2}
    text, tool_use = scripted.content
    assert text.type == "text"
    assert text.text == "Let me check."
    assert tool_use.type == "tool_use"
    assert tool_use.input == {"city": "Lima"}
    assert scripted.stop_reason == "tool_use"


async def test_structured_output_parses_into_a_pydantic_model(client: AsyncAnthropic) -> None:
    class Captions(BaseModel):
        captions: list[str] = Field(min_length=3)
        mood: str

    message = await client.messages.parse(
        model="claude-haiku-4-5",
        max_tokens=512,
        messages=user("Write three captions for a sunset photo"),
        output_format=Captions,
    )

    parsed = message.parsed_output
    assert isinstance(parsed, Captions)
    assert parsed.captions == [
        "Caption 1: Write three captions for a sunset photo",
        "Caption 2: Write three captions for a sunset photo",
        "Caption 3: Write three captions for a sunset photo",
    ]


async def test_streaming_text_events_and_usage(client: AsyncAnthropic) -> None:
    async with client.messages.stream(
        model="claude-haiku-4-5", max_tokens=256, messages=user("Stream a friendly greeting")
    ) as stream:
        deltas = [text async for text in stream.text_stream]
        message = await stream.get_final_message()

    assert len(deltas) > 3
    assert "".join(deltas) == "[fake claude-haiku-4-5] Stream a friendly greeting"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 6
    assert message.usage.output_tokens == 8


async def test_streaming_raw_event_sequence(client: AsyncAnthropic) -> None:
    stream = await client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=256,
        messages=user("weather in Oslo"),
        tools=[WEATHER_TOOL],
        stream=True,
    )

    events = [event async for event in stream]

    types = [event.type for event in events]
    assert types[0] == "message_start"
    assert types[1] == "content_block_start"
    assert set(types[2:-3]) == {"content_block_delta"}
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[1]
    assert start.type == "content_block_start"
    assert start.content_block.type == "tool_use"
    partial = "".join(
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    )
    assert partial.startswith('{"city": "City: weather in Oslo"')
    delta = events[-2]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "tool_use"
    assert delta.usage.output_tokens > 0


async def test_max_tokens_and_stop_sequences(client: AsyncAnthropic) -> None:
    truncated = await client.messages.create(
        model="claude-haiku-4-5", max_tokens=4, messages=user("one two three four five six")
    )
    stopped = await client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=100,
        messages=user("alpha beta ### gamma"),
        stop_sequences=["###"],
    )

    assert truncated.stop_reason == "max_tokens"
    assert truncated.content[0].type == "text"
    assert truncated.content[0].text == "[fake claude-haiku-4-5] one"
    assert stopped.stop_reason == "stop_sequence"
    assert stopped.stop_sequence == "###"
    assert stopped.content[0].type == "text"
    assert stopped.content[0].text == "[fake claude-haiku-4-5] alpha beta "


async def test_content_filter_is_a_refusal(fake_llm: FakeLLMServer, client: AsyncAnthropic) -> None:
    fake_llm.script(None, Reply(finish_reason="content_filter"), Reply(refusal="I can't help."))

    filtered = await client.messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=user("something bad")
    )
    refused = await client.messages.create(
        model="claude-haiku-4-5", max_tokens=64, messages=user("something bad")
    )

    assert filtered.stop_reason == "refusal"
    assert refused.stop_reason == "refusal"
    assert refused.content[0].type == "text"
    assert refused.content[0].text == "I can't help."


async def test_models_are_listed_in_anthropic_shape(client: AsyncAnthropic) -> None:
    models = [model async for model in client.models.list()]

    assert "claude-haiku-4-5" in [model.id for model in models]
    assert all(model.type == "model" for model in models)
