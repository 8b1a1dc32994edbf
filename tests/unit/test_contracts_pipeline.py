"""Pipeline validation: every error names the file, the step and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.contracts import (
    InputInvalid,
    PipelineInvalid,
    Problem,
    load_pipeline,
    load_pipeline_file,
    parse_duration,
    validate_run_input,
)


def _problems(text: str) -> list[Problem]:
    with pytest.raises(PipelineInvalid) as caught:
        load_pipeline(text, source="p.yaml")
    return caught.value.problems


@pytest.mark.parametrize(
    ("text", "step", "field", "fragment"),
    [
        pytest.param(
            "name: p\nsteps:\n  - {id: a, type: teleport}",
            "a",
            "type",
            "unknown step type 'teleport'",
            id="unknown-step-type",
        ),
        pytest.param(
            "name: p\nsteps:\n  - {id: a, type: transform, with: {template: x}}\n"
            "  - {id: a, type: transform, with: {template: y}}",
            "a",
            "id",
            "duplicate step id",
            id="duplicate-step-id",
        ),
        pytest.param(
            "name: p\nsteps:\n  - {id: a, type: transform, needs: [ghost], with: {template: x}}",
            "a",
            "needs",
            "unknown step 'ghost'",
            id="needs-missing-step",
        ),
        pytest.param(
            "name: p\nsteps:\n  - {id: a, type: transform, needs: [b], with: {template: x}}\n"
            "  - {id: b, type: transform, needs: [a], with: {template: y}}",
            "a",
            "needs",
            "cycle: a -> b -> a",
            id="cycle",
        ),
        pytest.param(
            "name: p\nsteps:\n"
            "  - {id: a, type: transform, with: {template: '{{ steps.nope.output }}'}}",
            "a",
            "with.template",
            "unknown step 'nope'",
            id="template-unknown-step",
        ),
        pytest.param(
            "name: p\nsteps:\n  - {id: a, type: transform, with: {template: x}}\n"
            "  - {id: b, type: transform, needs: [], with: {template: '{{ steps.a.output }}'}}",
            "b",
            "with.template",
            "not upstream",
            id="template-reads-non-upstream-step",
        ),
        pytest.param(
            "name: p\nsteps:\n  - {id: a, type: transform, with: {template: '{{ input.x '}}",
            "a",
            "with.template",
            "unexpected end of template",
            id="template-syntax",
        ),
        pytest.param(
            "name: p\nsteps:\n  - {id: a, type: http, with: {method: GET}}",
            "a",
            "with.url",
            "Field required",
            id="kind-config-missing-field",
        ),
        pytest.param(
            "name: p\nsteps:\n  - {id: a, type: transform, wiht: {template: x}}",
            "a",
            "wiht",
            "unknown field",
            id="typo-in-step-field",
        ),
        pytest.param(
            "name: p\nsteps:\n  - {id: a, type: transform, timeout: soon, with: {template: x}}",
            "a",
            "timeout",
            "not a duration",
            id="bad-duration",
        ),
        pytest.param(
            "name: p\nsteps:\n  - {id: 'has space', type: transform, with: {template: x}}",
            "has space",
            "id",
            "pattern",
            id="bad-step-id",
        ),
        pytest.param(
            "name: p\nsteps:\n"
            "  - {id: a, type: transform, when: '{{ steps.zz.output }}', with: {template: x}}",
            "a",
            "when",
            "unknown step 'zz'",
            id="when-unknown-step",
        ),
    ],
)
def test_each_problem_names_file_step_and_field(
    text: str, step: str, field: str, fragment: str
) -> None:
    problems = _problems(text)
    matching = [p for p in problems if p.step == step and p.field == field]
    assert matching, f"no problem for step {step} field {field} in {problems}"
    assert fragment in matching[0].message
    assert str(matching[0]).startswith(f"p.yaml: step '{step}': field '{field}': ")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("name: p\nsteps: [\n  - {id: a", "not valid YAML at line", id="bad-yaml"),
        pytest.param("- just\n- a list", "must be a mapping", id="not-a-mapping"),
        pytest.param("name: p\nsteps: []", "at least 1 item", id="no-steps"),
        pytest.param(
            "name: Bad Name\nsteps: [{id: a, type: transform, with: {template: x}}]",
            "pattern",
            id="bad-name",
        ),
        pytest.param(
            "steps: [{id: a, type: transform, with: {template: x}}]", "Field required", id="no-name"
        ),
    ],
)
def test_file_level_problems_name_the_file(text: str, fragment: str) -> None:
    problems = _problems(text)
    assert any(fragment in p.message for p in problems), problems
    assert all(str(p).startswith("p.yaml") for p in problems)


def test_every_problem_is_reported_not_just_the_first() -> None:
    problems = _problems(
        "name: p\nsteps:\n  - {id: a, type: nope}\n  - {id: b, type: http, with: {}}\n"
        "  - {id: c, type: transform, needs: [zz], with: {template: x}}"
    )
    assert {(p.step, p.field) for p in problems} >= {
        ("a", "type"),
        ("b", "with.url"),
        ("c", "needs"),
    }


def test_a_valid_pipeline_loads_with_defaults_and_a_stable_digest(tmp_path: Path) -> None:
    text = """
name: ok
input: {topic: {type: string}}
defaults: {retry: {max_attempts: 3, initial: 500ms, max: 1m}, timeout: 2m}
steps:
  - id: draft
    type: transform
    with: {template: "about {{ input.topic }}"}
  - id: post
    type: http
    with: {method: POST, url: "http://x/{{ steps.draft.output }}", json: {n: 1}}
"""
    path = tmp_path / "ok.yaml"
    path.write_text(text)
    spec = load_pipeline_file(path)
    assert spec.needs_of("post") == ["draft"]
    assert spec.retry_policy("post").max_attempts == 3
    assert spec.retry_policy("post").initial == 0.5
    assert spec.timeout_of("draft") == 120
    assert spec.digest() == load_pipeline(text).digest()
    assert spec.digest() != load_pipeline(text.replace("about", "on")).digest()


def test_json_definitions_are_accepted() -> None:
    spec = load_pipeline(
        '{"name": "j", "steps": [{"id": "a", "type": "transform", "with": {"template": "x"}}]}'
    )
    assert spec.name == "j"


def test_missing_file_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(PipelineInvalid, match=r"missing\.yaml"):
        load_pipeline_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("500ms", 0.5), ("10s", 10), ("2m", 120), ("1h", 3600), (3, 3.0), ("1.5s", 1.5)],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


def test_run_input_is_checked_against_declared_types_and_defaults_applied() -> None:
    spec = load_pipeline(
        """
name: typed
input:
  topic: {type: string}
  count: {type: integer, default: 3}
  tags: {type: array, required: false}
steps: [{id: a, type: transform, with: {template: x}}]
"""
    )
    assert validate_run_input(spec, {"topic": "t"}) == {"topic": "t", "count": 3, "tags": None}
    with pytest.raises(InputInvalid, match="input 'topic' is required"):
        validate_run_input(spec, {})
    with pytest.raises(InputInvalid, match="input 'count' must be integer, got str"):
        validate_run_input(spec, {"topic": "t", "count": "x"})
    with pytest.raises(InputInvalid, match="must be integer, got bool"):
        validate_run_input(spec, {"topic": "t", "count": True})
