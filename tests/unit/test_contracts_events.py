"""Events on the wire and templates."""

from __future__ import annotations

import uuid

import pytest

from conveyor.contracts import (
    DeadLetter,
    EventDecodeError,
    RunCompleted,
    RunRequested,
    StepCompleted,
    Topics,
    decode_event,
    run_id_for_request,
)
from conveyor.contracts.templates import TemplateError, is_truthy, referenced_steps, render_value

TOPICS = Topics("x")
FALLBACK = uuid.UUID(int=7)


def test_a_bare_trigger_decodes_with_the_fallback_id_and_a_derived_run_id() -> None:
    event = decode_event(
        TOPICS, TOPICS.runs_requested, b'{"pipeline": "p"}', fallback_event_id=FALLBACK
    )
    assert isinstance(event, RunRequested)
    assert event.event_id == FALLBACK
    assert event.input == {}
    assert event.resolved_run_id() == run_id_for_request(FALLBACK)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    raw = (
        RunCompleted(run_id=uuid.uuid4(), output=1)
        .model_dump_json()
        .replace("{", '{"extra": 1,', 1)
    )
    event = decode_event(TOPICS, TOPICS.runs_events, raw.encode(), fallback_event_id=FALLBACK)
    assert isinstance(event, RunCompleted)


def test_union_topics_decode_by_type() -> None:
    completed = StepCompleted(run_id=uuid.uuid4(), step_id="a", attempt=1, output={"x": 1})
    raw = completed.model_dump_json().encode()
    assert (
        decode_event(TOPICS, TOPICS.steps_completed, raw, fallback_event_id=FALLBACK) == completed
    )


@pytest.mark.parametrize(
    ("topic", "raw", "fragment"),
    [
        pytest.param(TOPICS.runs_requested, b"", "empty", id="empty"),
        pytest.param(TOPICS.runs_requested, b"{not json", "not JSON", id="malformed-json"),
        pytest.param(TOPICS.runs_requested, b"\xff\xfe\x00garbage", "not JSON", id="binary"),
        pytest.param(TOPICS.runs_requested, b"[1, 2]", "expected an object", id="array"),
        pytest.param(
            TOPICS.runs_requested, b'{"input": {}}', "pipeline: Field required", id="missing-field"
        ),
        pytest.param(TOPICS.runs_requested, b'{"pipeline": 5}', "pipeline", id="wrong-type"),
        pytest.param(
            TOPICS.runs_requested,
            b'{"pipeline": "p", "schema_version": 9}',
            "schema_version",
            id="unknown-version",
        ),
        pytest.param(
            TOPICS.steps_completed,
            b'{"type": "Nope", "run_id": "x"}',
            "invalid event",
            id="unknown-type",
        ),
        pytest.param("elsewhere", b"{}", "no event type", id="unknown-topic"),
    ],
)
def test_bad_messages_are_rejected_with_a_reason(topic: str, raw: bytes, fragment: str) -> None:
    with pytest.raises(EventDecodeError, match=fragment):
        decode_event(TOPICS, topic, raw, fallback_event_id=FALLBACK)


def test_dead_letter_round_trips() -> None:
    letter = DeadLetter(
        source_topic="t", partition=1, offset=2, consumer_group="g", reason="r", value_b64="AA=="
    )
    assert (
        decode_event(
            TOPICS, TOPICS.dlq, letter.model_dump_json().encode(), fallback_event_id=FALLBACK
        )
        == letter
    )


def test_ready_topics_name_the_kind() -> None:
    assert TOPICS.ready("media.probe") == "x.steps.ready.media.probe"
    assert TOPICS.kind_of("x.steps.ready.media.probe") == "media.probe"
    assert TOPICS.kind_of("x.runs.events") is None


def test_single_expression_templates_keep_native_types() -> None:
    context = {
        "input": {"items": [1, 2], "n": 3, "name": "Ada"},
        "steps": {"a": {"output": {"k": True}}},
    }
    assert render_value("{{ input.items }}", context) == [1, 2]
    assert render_value("{{ input.n + 1 }}", context) == 4
    assert render_value("hi {{ input.name | upper }}", context) == "hi ADA"
    assert render_value({"x": ["{{ steps.a.output.k }}"]}, context) == {"x": [True]}
    assert render_value("{{ input.items | tojson }}", context) == "[1, 2]"


def test_undefined_names_are_errors_not_empty_strings() -> None:
    with pytest.raises(TemplateError, match="undefined"):
        render_value("{{ input.nope }}", {"input": {}})
    with pytest.raises(TemplateError):
        render_value("x {{ input.nope }}", {"input": {}})


def test_the_sandbox_refuses_unsafe_attribute_access() -> None:
    with pytest.raises(TemplateError):
        render_value("{{ input.__class__.__mro__ }}", {"input": {}})


def test_referenced_steps_sees_attribute_and_item_access() -> None:
    assert referenced_steps("{{ steps.a.output }} {{ steps['b'].output }} {{ input.c }}") == {
        "a",
        "b",
    }


@pytest.mark.parametrize(
    ("value", "truth"),
    [("False", False), ("true", True), ("", False), (0, False), ([1], True), ("no", False)],
)
def test_truthiness_of_rendered_conditions(value: object, truth: bool) -> None:
    assert is_truthy(value) is truth
