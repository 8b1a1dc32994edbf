"""Unscripted structured answers are valid instances of the requested schema: nested
models, constraints, ``minItems`` and the JSON-schema keywords SDKs generate."""

from __future__ import annotations

import datetime as dt
import enum
import json
import uuid
from typing import Any, Literal

import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from conveyor.testing.fake_llm import FakeLLMServer


class Priority(enum.Enum):
    LOW = "low"
    HIGH = "high"


class Address(BaseModel):
    street: str = Field(min_length=20)
    city: str = Field(max_length=8)
    postcode: str | None


class Contact(BaseModel):
    name: str
    score: int = Field(ge=3, le=7)
    confidence: float = Field(gt=0, lt=1)
    tier: Literal["gold", "silver"]
    priority: Priority
    address: Address
    since: dt.datetime
    id: uuid.UUID


class Report(BaseModel):
    headline: str
    contacts: list[Contact] = Field(min_length=4)
    keywords: list[str]
    flagged: bool


@pytest.fixture
def oai(fake_llm: FakeLLMServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=fake_llm.openai_base_url, api_key="test", max_retries=0)


async def structured(client: AsyncOpenAI, schema: dict[str, Any], prompt: str) -> Any:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": prompt}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "result", "schema": schema, "strict": False},
        },
    )
    return json.loads(completion.choices[0].message.content or "")


async def test_nested_pydantic_models_parse(oai: AsyncOpenAI) -> None:
    completion = await oai.chat.completions.parse(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Report on our best customers"}],
        response_format=Report,
    )

    report = completion.choices[0].message.parsed
    assert isinstance(report, Report)
    assert len(report.contacts) == 4
    assert len(report.keywords) == 3
    assert [c.score for c in report.contacts] == [3, 4, 5, 6]
    assert [c.tier for c in report.contacts] == ["gold", "silver", "gold", "silver"]
    assert len({c.id for c in report.contacts}) == 4
    assert [c.name for c in report.contacts][:2] == [
        "Name 1: Report on our best customers",
        "Name 2: Report on our best customers",
    ]
    assert report.contacts[1].address.street == "Street 2: Report on our best customers"
    assert report.contacts[1].address.city == "City 2:"
    assert report.headline == "Headline: Report on our best customers"


async def test_three_captions_by_default_and_min_items_respected(oai: AsyncOpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "captions": {"type": "array", "items": {"type": "string"}},
            "hashtags": {"type": "array", "items": {"type": "string"}, "minItems": 5},
            "picks": {"type": "array", "items": {"type": "integer"}, "maxItems": 2},
        },
        "required": ["captions", "hashtags", "picks"],
    }

    result = await structured(oai, schema, "Write three captions for a sunset")

    assert result["captions"] == [
        "Caption 1: Write three captions for a sunset",
        "Caption 2: Write three captions for a sunset",
        "Caption 3: Write three captions for a sunset",
    ]
    assert len(result["hashtags"]) == 5
    assert result["hashtags"][0].startswith("Hashtag 1")
    assert result["picks"] == [1, 2]


async def test_refs_combinators_and_keywords(oai: AsyncOpenAI) -> None:
    schema = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "label": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
                "required": ["label"],
            },
        },
        "type": "object",
        "properties": {
            "tree": {"$ref": "#/$defs/Node"},
            "merged": {
                "allOf": [
                    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                    {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
                ]
            },
            "pair": {
                "type": "array",
                "prefixItems": [{"type": "string"}, {"type": "number"}],
                "items": False,
            },
            "maybe": {"type": ["integer", "null"], "exclusiveMinimum": 10, "multipleOf": 5},
            "version": {"const": "v2"},
            "mode": {"enum": ["fast", "slow"]},
            "homepage": {"type": "string", "format": "uri"},
            "email": {"type": "string", "format": "email"},
            "day": {"type": "string", "format": "date"},
            "code": {"type": "string", "minLength": 30, "maxLength": 40},
            "either": {"oneOf": [{"type": "null"}, {"type": "number", "maximum": -2}]},
            "extras": {
                "type": "object",
                "minProperties": 2,
                "additionalProperties": {"type": "integer"},
            },
        },
    }

    result = await structured(oai, schema, "Build a tree")

    assert result["tree"]["label"] == "Label: Build a tree"
    assert isinstance(result["tree"]["children"], list)
    assert result["merged"] == {"a": 1, "b": True}
    assert isinstance(result["pair"][0], str)
    assert isinstance(result["pair"][1], float)
    assert len(result["pair"]) == 2
    assert result["maybe"] == 15
    assert result["version"] == "v2"
    assert result["mode"] == "fast"
    assert result["homepage"] == "https://example.com/homepage"
    assert result["email"] == "email@example.com"
    assert dt.date.fromisoformat(result["day"])
    assert 30 <= len(result["code"]) <= 40
    assert result["either"] == -2
    assert len(result["extras"]) == 2
    assert all(isinstance(v, int) for v in result["extras"].values())


async def test_answers_are_deterministic(oai: AsyncOpenAI) -> None:
    schema = Report.model_json_schema()

    first = await structured(oai, schema, "same prompt")
    second = await structured(oai, schema, "same prompt")

    assert first == second
    assert Report.model_validate(first)


async def test_anthropic_tool_input_is_valid_for_a_nested_schema(
    fake_llm: FakeLLMServer,
) -> None:
    client = AsyncAnthropic(base_url=fake_llm.anthropic_base_url, api_key="test", max_retries=0)
    tool: Any = {
        "name": "save_report",
        "description": "Save a report",
        "input_schema": Report.model_json_schema(),
    }

    message = await client.messages.create(
        model="claude-haiku-4-5",
        max_tokens=1024,
        messages=[{"role": "user", "content": "Save a report on our customers"}],
        tools=[tool],
        tool_choice={"type": "any"},
    )

    [tool_use] = message.content
    assert tool_use.type == "tool_use"
    report = Report.model_validate(tool_use.input)
    assert len(report.contacts) == 4
