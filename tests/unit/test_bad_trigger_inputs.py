"""Malformed trigger inputs, one row per mistake: against a pipeline declaring an input of
every type, on a RunRequested read off the topic, and in the CLI's ``-i`` parsing.

Each is refused with a message naming the input (or the field of the request) and what is
wrong with it. What a refused trigger leaves behind (no run, nothing published) is checked
against the real scheduler in tests/integration/test_bad_triggers.py.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, NamedTuple

import pytest

from conveyor.cli.commands_runs import parse_input, parse_input_value
from conveyor.cli.errors import BadInput
from conveyor.contracts import (
    EventDecodeError,
    InputInvalid,
    Topics,
    decode_event,
    load_pipeline,
    validate_run_input,
)
from conveyor.contracts._limits import MAX_RUN_INPUT_BYTES

TYPED = load_pipeline(
    """
name: typed
input:
  text: {type: string}
  count: {type: integer}
  ratio: {type: number, default: 0.5}
  flag: {type: boolean, default: false}
  tags: {type: array, default: []}
  meta: {type: object, required: false}
  anything: {type: any, required: false}
steps:
  - {id: echo, type: transform, with: {template: "{{ input.text }}"}}
"""
)
GOOD: dict[str, Any] = {"text": "hi", "count": 2}


class BadInputRow(NamedTuple):
    run_input: Any
    names: tuple[str, ...]
    """The inputs the problems name ("" for the input as a whole)."""
    fragment: str


def _with(**changes: Any) -> dict[str, Any]:
    return {**GOOD, **changes}


NAN = float("nan")
BAD_INPUTS = {
    # required, missing or null
    "missing-required": BadInputRow(
        {"count": 1}, ("text",), "input 'text' is required (not given)"
    ),
    "missing-every-required": BadInputRow({}, ("count", "text"), "is required"),
    "required-is-null": BadInputRow(_with(text=None), ("text",), "input 'text' is required (null)"),
    # a wrong type for each declared type
    "string-gets-number": BadInputRow(_with(text=3), ("text",), "must be string, got number 3"),
    "string-gets-boolean": BadInputRow(_with(text=True), ("text",), "got boolean true"),
    "string-gets-array": BadInputRow(_with(text=["a"]), ("text",), 'got array ["a"]'),
    "string-gets-object": BadInputRow(_with(text={"a": 1}), ("text",), "got object"),
    "integer-gets-text": BadInputRow(
        _with(count="3"), ("count",), 'must be integer, got string "3"'
    ),
    "integer-gets-fraction": BadInputRow(_with(count=2.5), ("count",), "got number 2.5"),
    "integer-gets-boolean": BadInputRow(_with(count=False), ("count",), "got boolean false"),
    "integer-gets-array": BadInputRow(_with(count=[1]), ("count",), "must be integer, got array"),
    "number-gets-text": BadInputRow(_with(ratio="half"), ("ratio",), "must be number, got string"),
    "number-gets-boolean": BadInputRow(
        _with(ratio=True), ("ratio",), "must be number, got boolean"
    ),
    "boolean-gets-text": BadInputRow(
        _with(flag="yes"), ("flag",), 'must be boolean, got string "yes"'
    ),
    "boolean-gets-number": BadInputRow(_with(flag=1), ("flag",), "must be boolean, got number 1"),
    "array-gets-text": BadInputRow(_with(tags="a,b"), ("tags",), "must be array, got string"),
    "array-gets-object": BadInputRow(_with(tags={"a": 1}), ("tags",), "must be array, got object"),
    "object-gets-array": BadInputRow(_with(meta=[1]), ("meta",), "must be object, got array"),
    "object-gets-text": BadInputRow(_with(meta="{}"), ("meta",), "must be object, got string"),
    "long-value-is-cut-short": BadInputRow(_with(count="x" * 500), ("count",), 'got string "xxx'),
    # names the pipeline does not declare
    "unknown-name": BadInputRow(
        _with(colour="red"), ("colour",), "input 'colour' is not declared by pipeline 'typed'"
    ),
    "misspelt-name": BadInputRow(
        {"txt": "hi", "count": 1}, ("text", "txt"), "(declared: anything, count, flag"
    ),
    # values JSON or PostgreSQL cannot hold
    "not-a-number": BadInputRow(
        _with(count=NAN), ("count",), "input 'count' is nan, not a finite number"
    ),
    "infinity": BadInputRow(_with(ratio=float("inf")), ("ratio",), "is inf, not a finite number"),
    "nul-in-text": BadInputRow(_with(text="a\x00b"), ("text",), "contains a NUL character"),
    "nul-in-nested-key": BadInputRow(
        _with(meta={"a\x00": 1}), ("meta.a\x00",), "the key contains a NUL"
    ),
    "nested-nan": BadInputRow(
        _with(meta={"scores": [1, NAN]}), ("meta.scores.1",), "not a finite number"
    ),
    "nested-nul-in-any": BadInputRow(
        _with(anything=[{"x": "\x00"}]), ("anything.0.x",), "NUL character"
    ),
    # the input as a whole
    "oversized": BadInputRow(
        _with(text="x" * MAX_RUN_INPUT_BYTES), ("",), f"the limit is {MAX_RUN_INPUT_BYTES}"
    ),
    "not-an-object": BadInputRow(
        ["hi", 2], ("",), "the input must be a JSON object of name: value, got array"
    ),
    "a-string": BadInputRow("hi", ("",), "must be a JSON object of name: value, got string"),
    "null": BadInputRow(None, ("",), "must be a JSON object of name: value, got null"),
}


@pytest.mark.parametrize("row", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_a_malformed_input_names_the_input_and_what_is_wrong(row: BadInputRow) -> None:
    with pytest.raises(InputInvalid) as caught:
        validate_run_input(TYPED, row.run_input)
    problems = caught.value.problems
    assert tuple(sorted(name for name, _ in problems)) == row.names, problems
    assert any(row.fragment in message for _, message in problems), problems
    for name, message in problems:  # the message alone names the input, for a CLI line
        assert not name or f"input '{name}'" in message
    assert "\n" not in str(caught.value)


def test_a_good_input_gets_its_defaults_and_null_counts_as_not_given() -> None:
    run_input = validate_run_input(TYPED, {**GOOD, "ratio": None, "meta": {"n": 1}})
    assert run_input == {
        **GOOD,
        "ratio": 0.5,
        "flag": False,
        "tags": [],
        "meta": {"n": 1},
        "anything": None,
    }


def test_a_pipeline_declaring_no_input_takes_any_object() -> None:
    free = load_pipeline("name: free\nsteps:\n  - {id: a, type: transform, with: {template: x}}")
    assert validate_run_input(free, {"whatever": [1, {"x": None}]}) == {
        "whatever": [1, {"x": None}]
    }
    with pytest.raises(InputInvalid, match="not a finite number"):
        validate_run_input(free, {"x": NAN})


# --- a RunRequested produced straight onto the topic ---------------------------------------
# These cannot be stored or are not a request at all: decoding refuses them, so the
# scheduler's consumer dead-letters them. (A well-formed request whose input does not fit
# the pipeline becomes a failed run instead: tests/integration/test_bad_triggers.py.)

TOPICS = Topics("unit")


def _request(**fields: Any) -> bytes:
    return json.dumps({"pipeline": "typed", **fields}).encode()


BAD_EVENTS = {
    "not-json": (b'{"pipeline": "typed", ', "body is not JSON"),
    "not-an-object": (b'["typed"]', "body is JSON list, expected an object"),
    "empty-body": (b"", "empty message body"),
    "no-pipeline": (b'{"input": {}}', "pipeline: Field required"),
    "pipeline-not-text": (b'{"pipeline": 7}', "pipeline: Input should be a valid string"),
    "input-not-an-object": (_request(input=["a"]), "input: Input should be a valid dictionary"),
    "version-zero": (_request(version=0), "version: Input should be greater than or equal to 1"),
    "version-not-a-number": (
        _request(version="latest"),
        "version: Input should be a valid integer",
    ),
    "empty-idempotency-key": (
        _request(idempotency_key=""),
        "idempotency_key: String should have at least 1",
    ),
    "idempotency-key-control-character": (
        _request(idempotency_key="a\nb"),
        "idempotency_key: an idempotency key is one line",
    ),
    "idempotency-key-too-long": (
        _request(idempotency_key="k" * 300),
        "idempotency_key: String should have at most 256",
    ),
    "nan-in-input": (
        b'{"pipeline": "typed", "input": {"count": NaN}}',
        "input.count is nan, not a finite number",
    ),
    "nul-in-input": (_request(input={"text": "a\x00"}), "input.text contains a NUL character"),
    "nul-in-pipeline": (_request(pipeline="typ\x00ed"), "pipeline contains a NUL character"),
    "oversized-input": (
        _request(input={"text": "x" * MAX_RUN_INPUT_BYTES}),
        f"the limit is {MAX_RUN_INPUT_BYTES}",
    ),
}


@pytest.mark.parametrize(("raw", "fragment"), list(BAD_EVENTS.values()), ids=list(BAD_EVENTS))
def test_a_request_that_cannot_be_a_run_is_refused_by_the_decoder(
    raw: bytes, fragment: str
) -> None:
    with pytest.raises(EventDecodeError) as caught:
        decode_event(TOPICS, TOPICS.runs_requested, raw, fallback_event_id=uuid.uuid4())
    assert fragment in str(caught.value)


# --- the CLI's -i and --input-json -----------------------------------------------------------


@pytest.mark.parametrize(
    ("pairs", "input_json", "message"),
    [
        pytest.param(["text"], None, "-i 'text' is not key=value", id="no-equals"),
        pytest.param(["=hi"], None, "-i '=hi' is not key=value", id="no-key"),
        pytest.param(["  =hi"], None, "-i '  =hi' is not key=value", id="blank-key"),
        pytest.param([], "{text: hi}", "--input-json is not valid JSON", id="json-not-json"),
        pytest.param(
            [], '"hi"', "--input-json must be a JSON object, got a string", id="json-text"
        ),
        pytest.param([], "null", "--input-json must be a JSON object, got null", id="json-null"),
        pytest.param([], '{"count": NaN}', "NaN is not JSON", id="json-nan"),
    ],
)
def test_bad_cli_input_is_refused_before_anything_is_sent(
    pairs: list[str], input_json: str | None, message: str
) -> None:
    with pytest.raises(BadInput) as caught:
        parse_input(pairs, input_json)
    assert message in str(caught.value)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "[1, NaN]"])
def test_non_json_numbers_stay_text(text: str) -> None:
    """Python's JSON reader takes them as floats; JSON and the API do not."""
    assert parse_input_value(text) == text


def test_the_tables_cover_at_least_35_inputs() -> None:
    assert len(BAD_INPUTS) + len(BAD_EVENTS) >= 35
