"""The prompt library: ``prompt_ref`` resolved at registration, every mistake named there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from conveyor.cli._prompts import PromptLibrary, find_prompts_dir, prompt_refs
from conveyor.cli.commands_pipelines import load_files
from conveyor.cli.main import app
from conveyor.contracts import (
    PipelineInvalid,
    Problem,
    auto_asks,
    load_pipeline,
    parse_prompt,
)
from conveyor.contracts.templates import render_text, render_value

SUMMARIZE: dict[str, Any] = {
    "name": "summarize",
    "variables": {"text": {"type": "string"}, "words": {"type": "integer", "default": 50}},
    "system": "You summarize for {{ words }}-word slots.",
    "template": "Summarize in {{ words }} words: {{ text }}",
}
PROMPTS = {"summarize": SUMMARIZE}


def _pipeline(with_: str, *, step_type: str = "llm") -> str:
    return (
        "name: p\nsteps:\n"
        '  - {id: fetch, type: transform, with: {template: \'{"text": "otters"}\'}}\n'
        f"  - {{id: sum, type: {step_type}, with: {with_}}}\n"
    )


def _problems(text: str, prompts: dict[str, Any] | None = PROMPTS) -> list[Problem]:
    with pytest.raises(PipelineInvalid) as caught:
        load_pipeline(text, source="p.yaml", prompts=prompts)
    return caught.value.problems


def test_prompt_ref_becomes_the_prompt_text_and_renders_at_run_time() -> None:
    spec = load_pipeline(
        _pipeline(
            "{model: openai/gpt-4o-mini, prompt_ref: summarize, "
            "prompt_vars: {text: '{{ steps.fetch.output.text }}'}}"
        ),
        prompts=PROMPTS,
    )
    config = spec.step("sum").with_
    assert "prompt_ref" not in config
    assert "prompt_vars" not in config
    rendered = render_value(config, {"steps": {"fetch": {"output": {"text": "sea otters"}}}})
    assert rendered["prompt"] == "Summarize in 50 words: sea otters"
    assert rendered["system"] == "You summarize for 50-word slots."


def test_values_keep_their_types_and_filters_apply_to_the_run_data() -> None:
    prompts = {
        "list": {
            "variables": {"items": {"type": "array"}, "who": {"type": "string"}},
            "template": "{{ items | join(', ') }} for {{ who | upper }}",
        }
    }
    spec = load_pipeline(
        _pipeline(
            "{model: m/x, prompt_ref: list, "
            "prompt_vars: {items: '{{ input.items }}', who: 'dear {{ input.name }}'}}"
        ),
        prompts=prompts,
    )
    prompt = spec.step("sum").with_["prompt"]
    context = {"input": {"items": ["a", "b"], "name": "Ada"}, "steps": {}}
    assert render_text(prompt, context) == "a, b for DEAR ADA"


def test_static_text_is_data_not_a_template() -> None:
    spec = load_pipeline(
        _pipeline('{model: m/x, prompt_ref: summarize, prompt_vars: {text: "say \\"hi\\"\\n"}}'),
        prompts=PROMPTS,
    )
    assert render_text(spec.step("sum").with_["prompt"], {}) == 'Summarize in 50 words: say "hi"\n'


def test_the_step_system_wins_over_the_prompt_system() -> None:
    spec = load_pipeline(
        _pipeline("{model: m/x, system: mine, prompt_ref: summarize, prompt_vars: {text: t}}"),
        prompts=PROMPTS,
    )
    assert spec.step("sum").with_["system"] == "mine"


@pytest.mark.parametrize(
    ("with_", "field", "fragment"),
    [
        pytest.param(
            "{model: m/x, prompt_ref: summarize}",
            "with.prompt_vars.text",
            "required by prompt 'summarize'",
            id="missing-variable",
        ),
        pytest.param(
            "{model: m/x, prompt_ref: summarize, prompt_vars: {text: t, tone: dry}}",
            "with.prompt_vars.tone",
            "declares no variable 'tone' (declared: text, words)",
            id="unknown-variable",
        ),
        pytest.param(
            "{model: m/x, prompt_ref: summarise, prompt_vars: {text: t}}",
            "with.prompt_ref",
            "unknown prompt 'summarise' (known: summarize)",
            id="unknown-prompt",
        ),
        pytest.param(
            "{model: m/x, prompt_ref: summarize, prompt_vars: {text: t, words: many}}",
            "with.prompt_vars.words",
            "must be integer, got str",
            id="wrong-type",
        ),
        pytest.param(
            "{model: m/x, prompt: hi, prompt_ref: summarize, prompt_vars: {text: t}}",
            "with.prompt_ref",
            "cannot be combined with 'prompt'",
            id="prompt-and-prompt-ref",
        ),
        pytest.param(
            "{model: m/x, prompt_vars: {text: t}}",
            "with.prompt_vars",
            "needs prompt_ref",
            id="vars-without-ref",
        ),
        pytest.param(
            "{model: m/x, prompt_ref: summarize, prompt_vars: [t]}",
            "with.prompt_vars",
            "must be a mapping",
            id="vars-not-a-mapping",
        ),
        pytest.param(
            "{model: m/x, prompt_ref: summarize, prompt_vars: {text: '{{ steps.later.output }}'}}",
            "with.prompt",
            "unknown step 'later'",
            id="variable-reads-unknown-step",
        ),
    ],
)
def test_registration_errors_name_file_step_and_field(
    with_: str, field: str, fragment: str
) -> None:
    problems = _problems(_pipeline(with_))
    assert any(
        p.file == "p.yaml" and p.step == "sum" and p.field == field and fragment in p.message
        for p in problems
    ), problems


def test_unknown_prompt_without_a_library_says_none_were_sent() -> None:
    (problem,) = _problems(_pipeline("{model: m/x, prompt_ref: summarize}"), prompts=None)
    assert problem.field == "with.prompt_ref"
    assert "prompts/" in problem.message


def test_prompt_ref_is_for_llm_steps_only() -> None:
    problems = _problems(_pipeline("{template: x, prompt_ref: summarize}", step_type="transform"))
    assert [(p.step, p.field) for p in problems] == [("sum", "with")]
    assert "llm steps" in problems[0].message


def test_an_invalid_prompt_is_named_by_the_step_that_uses_it() -> None:
    broken = {"summarize": {**SUMMARIZE, "template": "{{ text }} {{ secret }}"}}
    (problem,) = _problems(_pipeline("{model: m/x, prompt_ref: summarize}"), prompts=broken)
    assert problem.field == "with.prompt_ref"
    assert "undeclared variable 'secret'" in problem.message


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [
        ({"template": "{{ x }}"}, "template", "undeclared variable 'x'"),
        ({"template": "{{ x "}, "template", "does not parse"),
        ({"variables": {"steps": {}}, "template": "a"}, "variables.steps", "reserved"),
        ({"variables": {"n": {"type": "integer", "default": "x"}}, "template": "a"}, None, None),
        ({"template": "a", "colour": "red"}, "colour", "unknown field"),
        ({"name": "other", "template": "a"}, "name", "filed as 'p'"),
    ],
)
def test_parse_prompt_reports_each_problem(
    raw: dict[str, Any], field: str | None, fragment: str | None
) -> None:
    prompt, problems = parse_prompt("p", raw)
    assert prompt is None
    if field is not None:
        assert any(f == field and fragment in m for f, m in problems), problems


def test_auto_asks_walks_the_config() -> None:
    config = {"system": "<AUTO>a tutor</AUTO>", "messages": [{"content": "x <AUTO>b</AUTO>"}]}
    assert list(auto_asks(config, "with")) == [
        ("with.system", "a tutor"),
        ("with.messages[0].content", "b"),
    ]


# --- the library on disk, as the CLI reads it ------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_cli_finds_prompts_upward_and_sends_only_those_used(tmp_path: Path) -> None:
    _write(tmp_path / "prompts" / "summarize.yaml", "template: '{{ text }}'\nvariables: {text: {}}")
    _write(tmp_path / "prompts" / "other.yaml", "template: other")
    pipeline = _write(
        tmp_path / "pipelines" / "p.yaml",
        _pipeline("{model: m/x, prompt_ref: summarize, prompt_vars: {text: t}}"),
    )
    assert find_prompts_dir(pipeline) == tmp_path / "prompts"
    assert prompt_refs(pipeline.read_text()) == ["summarize"]
    (loaded,), problems = load_files([pipeline])
    assert problems == []
    assert list(loaded.prompts) == ["summarize"]
    assert loaded.spec.step("sum").with_["prompt"].endswith("{{ text }}")


def test_a_broken_prompt_file_is_named_when_a_pipeline_uses_it(tmp_path: Path) -> None:
    _write(tmp_path / "prompts" / "summarize.yaml", "template: '{{ nope }}'")
    library = PromptLibrary.load(tmp_path / "prompts")
    _, problems = library.for_pipeline(_pipeline("{model: m/x, prompt_ref: summarize}"))
    assert [(Path(p.file).name, p.field) for p in problems] == [("summarize.yaml", "template")]


def test_validate_with_prompts_option(tmp_path: Path) -> None:
    library = tmp_path / "lib"
    _write(library / "summarize.yaml", "template: '{{ text }}'\nvariables: {text: {}}")
    pipeline = _write(tmp_path / "p.yaml", _pipeline("{model: m/x, prompt_ref: summarize}"))
    result = CliRunner().invoke(
        app, ["pipelines", "validate", str(pipeline), "--prompts", str(library)]
    )
    assert result.exit_code == 2
    assert "step 'sum': field 'with.prompt_vars.text'" in result.output
    assert "required by prompt 'summarize'" in result.output


def test_the_examples_and_the_repository_prompts_are_valid() -> None:
    root = Path(__file__).parents[2]
    library = PromptLibrary.load(root / "prompts")
    assert library.problems == {}
    assert {"summarize", "social-brief"} <= set(library.prompts)
    loaded, problems = load_files([root / "examples"])
    assert problems == []
    assert "brief" in {p.spec.name for p in loaded}
