"""Malformed pipeline definitions, one row per kind of mistake a user makes.

Each row is rejected whole with a ``PipelineInvalid`` whose problem names the step and the
field that is wrong, and whose message carries a fragment chosen to say *what* is wrong
(a vague "invalid" fails the row). ``BAD_PIPELINES`` is shared with the integration test
that sends a sample of them through the control API.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from conveyor.contracts import PipelineInvalid, Problem, load_pipeline, load_pipeline_file
from conveyor.contracts._limits import MAX_DEFINITION_BYTES, MAX_STEPS


class Bad(NamedTuple):
    text: str | bytes
    step: str | None
    """The step the problem names; None for the pipeline's own fields."""
    field: str | None
    fragment: str


def _steps(*lines: str, head: str = "name: p\n") -> str:
    return head + "steps:\n" + "".join(f"  - {line}\n" for line in lines)


OK = "{id: ok, type: transform, with: {template: fine}}"
LLM = "{id: ask, type: llm, with: {model: openai/gpt-4o-mini, prompt: hi, %s}}"


def _alias_bomb() -> str:
    """Each level repeats the one before ten times: 10**6 values from a few lines."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 6):
        ref = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([ref] * 10)}]")
    return "\n".join(lines) + "\n" + _steps("{id: big, type: transform, with: {template: *a5}}")


BAD_PIPELINES = {
    # --- the text itself ------------------------------------------------------------------
    "yaml-syntax": Bad("name: p\nsteps: [\n", None, None, "not valid YAML at line 3"),
    "yaml-tab-indent": Bad("name: p\n\tsteps: []\n", None, None, "not valid YAML at line 2"),
    "not-a-mapping": Bad(
        "- name: p\n- steps: []\n", None, None, "must be a mapping with name and steps, got array"
    ),
    "empty-file": Bad("", None, None, "the definition is empty"),
    "duplicate-yaml-key": Bad(
        "name: p\n" + _steps(OK, head="name: q\n"), None, None, "'name' appears twice"
    ),
    "nul-character": Bad("name: p\x00\nsteps: []\n", None, None, "U+0000 is not allowed"),
    "nul-escape-in-json": Bad(
        '{"name": "p", "description": "a\\u0000b", "steps": '
        '[{"id": "ok", "type": "transform", "with": {"template": "x"}}]}',
        None,
        "description",
        "NUL character",
    ),
    "not-a-number": Bad(
        _steps(OK, head="name: p\nbudget: {max_cost: .nan}\n"),
        None,
        "budget.max_cost",
        "not a finite number",
    ),
    "yaml-date-in-config": Bad(
        _steps("{id: day, type: transform, with: {template: 2024-01-31}}"),
        "day",
        "with.template",
        "YAML date",
    ),
    "alias-bomb": Bad(_alias_bomb(), None, None, "expands to more than"),
    "over-size-limit": Bad(
        _steps(OK, head=f"name: p\ndescription: '{'x' * MAX_DEFINITION_BYTES}'\n"),
        None,
        None,
        f"the limit is {MAX_DEFINITION_BYTES}",
    ),
    "too-many-steps": Bad(
        _steps(*(f"{{id: s{i}, type: transform, with: {{template: x}}}}" for i in range(501))),
        None,
        "steps",
        f"at most {MAX_STEPS} items",
    ),
    "not-utf8": Bad(b"name: caf\xe9\nsteps: []\n", None, None, "not UTF-8 text: byte 0xe9"),
    # --- the pipeline's own fields --------------------------------------------------------
    "missing-name": Bad("steps:\n  - " + OK + "\n", None, "name", "Field required"),
    "missing-steps": Bad("name: p\n", None, "steps", "Field required"),
    "bad-name-chars": Bad(_steps(OK, head="name: My Pipe!\n"), None, "name", "lowercase"),
    "empty-steps": Bad("name: p\nsteps: []\n", None, "steps", "at least 1 item"),
    "unknown-top-level-field": Bad(
        _steps(OK, head="name: p\nstep: []\n"), None, "step", "unknown field"
    ),
    "input-unknown-type": Bad(
        _steps(OK, head="name: p\ninput: {n: {type: int}}\n"), None, "input.n.type", "'integer'"
    ),
    "input-default-wrong-type": Bad(
        _steps(OK, head="name: p\ninput: {n: {type: integer, default: many}}\n"),
        None,
        "input.n.default",
        'must be integer, got string "many"',
    ),
    "input-name-not-identifier": Bad(
        _steps(OK, head="name: p\ninput: {first name: {type: string}}\n"),
        None,
        "input.first name",
        "letters, digits and _",
    ),
    "cron-not-cron": Bad(
        _steps(OK, head="name: p\nschedule: {cron: every day}\n"),
        None,
        "schedule.cron",
        "'every day' is not a cron expression",
    ),
    "cron-unknown-timezone": Bad(
        _steps(OK, head="name: p\nschedule: {cron: '0 * * * *', timezone: Mars/Base}\n"),
        None,
        "schedule.timezone",
        "unknown time zone 'Mars/Base'",
    ),
    "schedule-input-misses-required": Bad(
        _steps(OK, head="name: p\ninput: {n: {type: integer}}\nschedule: {cron: '0 * * * *'}\n"),
        None,
        "schedule.input.n",
        "input 'n' is required",
    ),
    "defaults-retry-backoff-inverted": Bad(
        _steps(OK, head="name: p\ndefaults: {retry: {initial: 2m, max: 10s}}\n"),
        None,
        "defaults.retry.initial",
        "longer than retry.max",
    ),
    "auto-model-without-provider": Bad(
        _steps(OK, head="name: p\nauto: {model: gpt-4o}\n"),
        None,
        "auto.model",
        "not provider/model",
    ),
    "budget-negative": Bad(
        _steps(OK, head="name: p\nbudget: {max_cost: -1}\n"),
        None,
        "budget.max_cost",
        "greater than or equal to 0",
    ),
    # --- a step's engine fields -----------------------------------------------------------
    "step-not-a-mapping": Bad(_steps("just text"), "#1", None, "valid dictionary"),
    "step-missing-id": Bad(
        _steps("{type: transform, with: {template: x}}"), "#1", "id", "Field required"
    ),
    "step-bad-id": Bad(
        _steps("{id: 2nd-step, type: transform, with: {template: x}}"),
        "2nd-step",
        "id",
        "not starting with a digit",
    ),
    "duplicate-step-id": Bad(_steps(OK, OK), "ok", "id", "duplicate step id"),
    "unknown-kind": Bad(_steps("{id: g, type: gate}"), "g", "type", "unknown step type 'gate'"),
    "unknown-step-field": Bad(
        _steps("{id: a, type: transform, need: [x], with: {template: x}}"),
        "a",
        "need",
        "unknown field",
    ),
    "needs-not-a-list": Bad(
        _steps(OK, "{id: b, type: transform, needs: ok, with: {template: x}}"),
        "b",
        "needs",
        "valid list",
    ),
    "needs-unknown-step": Bad(
        _steps("{id: a, type: transform, needs: [ghost], with: {template: x}}"),
        "a",
        "needs",
        "unknown step 'ghost'",
    ),
    "needs-itself": Bad(
        _steps("{id: a, type: transform, needs: [a], with: {template: x}}"),
        "a",
        "needs",
        "cannot need itself",
    ),
    "cycle-of-two": Bad(
        _steps(
            "{id: a, type: transform, needs: [b], with: {template: x}}",
            "{id: b, type: transform, needs: [a], with: {template: x}}",
        ),
        "a",
        "needs",
        "cycle: a -> b -> a",
    ),
    "cycle-of-three": Bad(
        _steps(
            "{id: a, type: transform, needs: [c], with: {template: x}}",
            "{id: b, type: transform, needs: [a], with: {template: x}}",
            "{id: c, type: transform, needs: [b], with: {template: x}}",
        ),
        "a",
        "needs",
        "cycle: a -> c -> b -> a",
    ),
    "when-plain-text": Bad(
        _steps(OK, "{id: b, type: transform, when: steps.ok.output, with: {template: x}}"),
        "b",
        "when",
        "plain text, which is always true",
    ),
    "when-unknown-step": Bad(
        _steps("{id: a, type: transform, when: '{{ steps.zz.output }}', with: {template: x}}"),
        "a",
        "when",
        "unknown step 'zz'",
    ),
    "for-each-literal-list": Bad(
        _steps("{id: a, type: transform, for_each: [1, 2], with: {template: x}}"),
        "a",
        "for_each",
        "not a list itself",
    ),
    "for-each-plain-text": Bad(
        _steps("{id: a, type: transform, for_each: input.items, with: {template: x}}"),
        "a",
        "for_each",
        "plain text: write a template that gives a list",
    ),
    "max-parallel-zero": Bad(
        _steps(
            "{id: a, type: transform, for_each: '{{ input.xs }}', max_parallel: 0, "
            "with: {template: x}}"
        ),
        "a",
        "max_parallel",
        "greater than or equal to 1",
    ),
    "max-parallel-without-fan-out": Bad(
        _steps("{id: a, type: transform, max_parallel: 4, with: {template: x}}"),
        "a",
        "max_parallel",
        "has no for_each",
    ),
    "item-outside-fan-out": Bad(
        _steps("{id: a, type: transform, with: {template: '{{ item }}'}}"),
        "a",
        "with.template",
        "only a fan-out step's with has",
    ),
    "retry-negative-attempts": Bad(
        _steps("{id: a, type: transform, retry: {max_attempts: -1}, with: {template: x}}"),
        "a",
        "retry.max_attempts",
        "greater than or equal to 1",
    ),
    "retry-unknown-backoff": Bad(
        _steps("{id: a, type: transform, retry: {backoff: linear}, with: {template: x}}"),
        "a",
        "retry.backoff",
        "'exponential' or 'fixed'",
    ),
    "timeout-not-a-duration": Bad(
        _steps("{id: a, type: transform, timeout: forever, with: {template: x}}"),
        "a",
        "timeout",
        "'forever' is not a duration",
    ),
    "timeout-zero": Bad(
        _steps("{id: a, type: transform, timeout: 0, with: {template: x}}"),
        "a",
        "timeout",
        "must be more than 0",
    ),
    "on-failure-unknown": Bad(
        _steps("{id: a, type: transform, on_failure: ignore, with: {template: x}}"),
        "a",
        "on_failure",
        "'fail_run', 'continue', 'skip_run' or 'succeed_run'",
    ),
    "on-failure-contradicts-continue": Bad(
        _steps(
            "{id: a, type: transform, continue_on_error: true, on_failure: fail_run, "
            "with: {template: x}}"
        ),
        "a",
        "on_failure",
        "contradicts continue_on_error",
    ),
    # --- templates ------------------------------------------------------------------------
    "template-syntax-error": Bad(
        _steps("{id: a, type: transform, with: {template: '{{ input.x '}}"),
        "a",
        "with.template",
        "unexpected end of template",
    ),
    "template-unknown-step": Bad(
        _steps("{id: a, type: transform, with: {template: '{{ steps.ghost.output }}'}}"),
        "a",
        "with.template",
        "unknown step 'ghost'",
    ),
    "template-step-not-upstream": Bad(
        _steps(
            OK, "{id: b, type: transform, needs: [], with: {template: '{{ steps.ok.output }}'}}"
        ),
        "b",
        "with.template",
        "not upstream of this step (add it to needs)",
    ),
    "template-undeclared-input": Bad(
        _steps(
            "{id: a, type: transform, with: {template: '{{ input.topik }}'}}",
            head="name: p\ninput: {topic: {type: string}}\n",
        ),
        "a",
        "with.template",
        "reads input 'topik', which the pipeline does not declare (declared: topic)",
    ),
    "template-misspelt-name": Bad(
        _steps("{id: a, type: transform, with: {template: '{{ inputs.topic }}'}}"),
        "a",
        "with.template",
        "reads 'inputs', which no run has",
    ),
    # --- a kind's own config (with) ------------------------------------------------------
    "with-unknown-field": Bad(
        _steps("{id: a, type: transform, with: {template: x, tmpl: y}}"),
        "a",
        "with.tmpl",
        "unknown field",
    ),
    "with-missing-field": Bad(
        _steps("{id: a, type: transform, with: {}}"), "a", "with.template", "Field required"
    ),
    "with-not-a-mapping": Bad(
        _steps("{id: a, type: transform, with: [x]}"), "a", "with", "valid dictionary"
    ),
    "http-unknown-method": Bad(
        _steps("{id: a, type: http, with: {method: FETCH, url: 'https://x'}}"),
        "a",
        "with.method",
        "'FETCH' is not an HTTP method",
    ),
    "http-url-without-scheme": Bad(
        _steps("{id: a, type: http, with: {url: api.example/x}}"),
        "a",
        "with.url",
        "not an http:// or https:// URL",
    ),
    "http-header-not-text": Bad(
        _steps("{id: a, type: http, with: {url: 'https://x', headers: {x-n: 1}}}"),
        "a",
        "with.headers.x-n",
        "valid string",
    ),
    "http-expect-not-a-status": Bad(
        _steps("{id: a, type: http, with: {url: 'https://x', expect: [200, 999]}}"),
        "a",
        "with.expect",
        "999 is not an HTTP status",
    ),
    "llm-without-prompt": Bad(
        _steps("{id: ask, type: llm, with: {model: openai/gpt-4o-mini}}"),
        "ask",
        "with",
        "needs a prompt or messages",
    ),
    "llm-model-without-provider": Bad(
        _steps("{id: ask, type: llm, with: {model: gpt-4o, prompt: hi}}"),
        "ask",
        "with.model",
        "not provider/model",
    ),
    "llm-fallback-without-provider": Bad(
        _steps(LLM % "fallback: [claude]"), "ask", "with.fallback", "'claude' is not provider/model"
    ),
    "llm-temperature-out-of-range": Bad(
        _steps(LLM % "temperature: 7"), "ask", "with.temperature", "at most 2"
    ),
    "llm-max-tokens-zero": Bad(
        _steps(LLM % "max_tokens: 0"), "ask", "with.max_tokens", "at least 1"
    ),
    "llm-schema-unknown-type": Bad(
        _steps(LLM % "output_schema: {title: strng}"),
        "ask",
        "with.output_schema",
        "output_schema.title: unknown type 'strng'",
    ),
    "llm-json-schema-bad-type": Bad(
        _steps(LLM % "output_schema: {type: object, properties: {n: {type: int}}}"),
        "ask",
        "with.output_schema",
        "type 'int' is not a JSON Schema type",
    ),
    "llm-json-schema-required-unknown": Bad(
        _steps(
            LLM % "output_schema: {type: object, properties: {a: {type: string}}, required: [b]}"
        ),
        "ask",
        "with.output_schema",
        "names 'b', which is not in properties",
    ),
    "llm-message-role": Bad(
        _steps(
            "{id: ask, type: llm, with: {model: openai/x, messages: [{role: bot, content: hi}]}}"
        ),
        "ask",
        "with.messages.0.role",
        "'system', 'user' or 'assistant'",
    ),
    "llm-duplicate-tools": Bad(
        _steps(
            LLM
            % "tools: [{name: t, with: {url: 'https://a'}}, {name: t, with: {url: 'https://b'}}]"
        ),
        "ask",
        "with.tools",
        "two tools are named 't'",
    ),
    "llm-tool-parameters-not-object": Bad(
        _steps(LLM % "tools: [{name: t, with: {url: 'https://a'}, parameters: {type: string}}]"),
        "ask",
        "with.tools.0.parameters",
        "JSON Schema of an object",
    ),
    "llm-prompt-ref-unknown": Bad(
        _steps("{id: ask, type: llm, with: {model: openai/x, prompt_ref: summarise}}"),
        "ask",
        "with.prompt_ref",
        "unknown prompt 'summarise'",
    ),
    "media-source-empty": Bad(
        _steps("{id: m, type: media.probe, with: {source: ''}}"),
        "m",
        "with.source",
        "at least 1 character",
    ),
    "media-unknown-option": Bad(
        _steps("{id: m, type: media.probe, with: {source: a.mp4, fast: true}}"),
        "m",
        "with.fast",
        "unknown field",
    ),
}


def _load(bad: Bad, tmp_path: Path) -> list[Problem]:
    if isinstance(bad.text, bytes):  # bytes come from a file: read as the CLI reads it
        path = tmp_path / "bad.yaml"
        path.write_bytes(bad.text)
        with pytest.raises(PipelineInvalid) as caught:
            load_pipeline_file(path)
    else:
        with pytest.raises(PipelineInvalid) as caught:
            load_pipeline(bad.text, source="bad.yaml")
    return caught.value.problems


@pytest.mark.parametrize("bad", list(BAD_PIPELINES.values()), ids=list(BAD_PIPELINES))
def test_a_malformed_definition_names_the_step_the_field_and_the_mistake(
    bad: Bad, tmp_path: Path
) -> None:
    problems = _load(bad, tmp_path)
    matching = [p for p in problems if (p.step, p.field) == (bad.step, bad.field)]
    assert matching, f"no problem at step {bad.step!r}, field {bad.field!r}: {problems}"
    assert any(bad.fragment in p.message for p in matching), [str(p) for p in problems]
    # every line names the file, as `conveyor validate` prints it, and is one line
    assert all(str(p).startswith(p.file) and "\n" not in str(p) for p in problems)


def test_the_table_covers_at_least_35_mistakes() -> None:
    assert len(BAD_PIPELINES) >= 35


def test_one_definition_with_many_mistakes_reports_them_all_at_once() -> None:
    text = _steps(
        "{id: fetch, type: http, timeout: 0, with: {url: 'ftp://x', method: FETCH}}",
        "{id: fetch, type: transform, with: {template: x}}",
        "{id: ask, type: llm, needs: [fetch], with: {model: openai/x, prompt: hi, temperature: 9}}",
        head="name: p\ninput: {n: {type: integer, default: many}}\n",
    )
    with pytest.raises(PipelineInvalid) as caught:
        load_pipeline(text, source="many.yaml")
    found = {(p.step, p.field) for p in caught.value.problems}
    assert found >= {
        ("fetch", "with.url"),
        ("fetch", "with.method"),
        ("fetch", "id"),
        ("fetch", "timeout"),
        ("ask", "with.temperature"),
        (None, "input.n.default"),
    }, caught.value.problems


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            _steps("{id: a, type: transform, with: {template: '{{ input.anything }}'}}"),
            id="undeclared-input-reads-anything",
        ),
        pytest.param(
            _steps(
                "{id: a, type: transform, for_each: '{{ input.xs }}', "
                "with: {template: '{{ item }} {{ item_index }} {{ run.id }}'}}"
            ),
            id="fan-out-reads-item",
        ),
        pytest.param(
            _steps(
                "{id: a, type: transform, with: {template: "
                "'{% for x in input.xs %}{{ loop.index }}{{ x }}{% endfor %}"
                "{% set y = 2 %}{{ y }}{{ range(3) | list }}'}}"
            ),
            id="names-the-template-sets-itself",
        ),
        pytest.param(
            _steps(
                "{id: a, type: http, with: &base {method: POST, url: 'https://x'}}",
                "{id: b, type: http, with: {<<: *base, url: 'https://y'}}",
            ),
            id="yaml-merge-key-overrides",
        ),
        pytest.param(
            _steps(
                "{id: a, type: http, with: {url: '{{ secrets.BASE }}/x', method: "
                "'{{ input.m }}', timeout: 10s}}"
            ),
            id="templates-stand-for-checked-values",
        ),
        pytest.param(
            _steps(LLM % "output_schema: {title: string, tags: [string], note: 'string?'}"),
            id="schema-shorthand",
        ),
    ],
)
def test_near_misses_that_are_valid_stay_valid(text: str) -> None:
    """The checks above must not refuse what is right: each of these is fine."""
    load_pipeline(text, source="fine.yaml")
