"""``auto: {resolve: run_start}``: the synthetic ``auto`` step a run starts with, its
answers in place of the tags, the reserved id, and no model call at registration."""

from __future__ import annotations

import pytest

from conveyor.contracts import (
    AUTO_STEP,
    ErrorInfo,
    PipelineInvalid,
    PipelineSpec,
    load_pipeline,
    spec_for_run,
)
from conveyor.contracts.kinds import KIND_CONFIGS
from conveyor.scheduler import domain
from conveyor.scheduler.auto import resolve_auto

PIPELINE = """
name: tutor
auto: {resolve: run_start, model: anthropic/claude-haiku-4-5}
defaults: {retry: {max_attempts: 2, initial: 10ms, jitter: false}}
steps:
  - id: draft
    type: llm
    with:
      model: openai/gpt-4o-mini
      system: "<AUTO>a system prompt for a friendly tutor</AUTO>"
      prompt: "Explain {{ input.topic }} to a <AUTO>level</AUTO> (<AUTO>a tone</AUTO>)"
  - id: other
    type: transform
    needs: []
    with: {template: "plain"}
  - id: shout
    type: transform
    needs: [draft, other]
    with: {template: "{{ steps.draft.output.text }}"}
"""

ANSWERS = {
    "steps__draft__with__system": "You are a patient tutor.",
    "steps__draft__with__prompt": "beginner",
    "steps__draft__with__prompt__2": "warm {{ not a template }}",
}


def _spec() -> PipelineSpec:
    return spec_for_run(load_pipeline(PIPELINE, source="tutor.yaml"))


def test_the_auto_step_comes_first_and_every_root_needs_it() -> None:
    spec = _spec()
    assert [s.id for s in spec.steps] == [AUTO_STEP, "draft", "other", "shout"]
    assert spec.needs_of("draft") == [AUTO_STEP]
    assert spec.needs_of("other") == [AUTO_STEP]
    assert spec.needs_of("shout") == ["draft", "other"]  # waits through its needs
    assert spec.sinks() == ["shout"]
    auto = spec.step(AUTO_STEP)
    assert auto.type == "llm"
    assert auto.with_["model"] == "anthropic/claude-haiku-4-5"
    assert auto.with_["output_schema"] == dict.fromkeys(ANSWERS, "string")
    assert "a system prompt for a friendly tutor" in auto.with_["prompt"]
    assert "<AUTO>" not in auto.with_["prompt"]
    KIND_CONFIGS["llm"].model_validate(auto.with_)
    assert spec_for_run(spec) == spec  # expanding twice changes nothing


def test_without_run_start_the_spec_is_left_alone() -> None:
    registration = load_pipeline(PIPELINE.replace("resolve: run_start, ", ""))
    assert spec_for_run(registration) is registration
    no_asks = load_pipeline(
        "name: p\nauto: {resolve: run_start}\nsteps: [{id: a, type: transform, "
        "with: {template: x}}]"
    )
    assert spec_for_run(no_asks) is no_asks


def test_auto_is_a_reserved_step_id_with_run_start_asks() -> None:
    with pytest.raises(PipelineInvalid) as caught:
        load_pipeline(
            PIPELINE.replace("id: other", "id: auto").replace("other]", "auto]"),
            source="tutor.yaml",
        )
    assert [(p.file, p.step, p.field) for p in caught.value.problems] == [
        ("tutor.yaml", "auto", "id")
    ]
    assert "reserved" in str(caught.value)
    # with registration-time AUTO a step may be called auto
    load_pipeline(
        PIPELINE.replace("resolve: run_start, ", "")
        .replace("id: other", "id: auto")
        .replace("other]", "auto]")
    )


async def test_registration_asks_no_model() -> None:
    async def answer(model: str, ask: str) -> str:
        raise AssertionError("no model at registration")

    spec = load_pipeline(PIPELINE, source="tutor.yaml")
    assert await resolve_auto(spec, source_file="tutor.yaml", answer=answer) is spec


def _started() -> tuple[PipelineSpec, domain.RunState, list[domain.Command]]:
    spec = _spec()
    state = domain.RunState.new(spec, run_id="r1", version=1, run_input={"topic": "tides"})
    return spec, state, domain.start_run(spec, state)


def test_a_run_asks_first_then_runs_its_steps_with_the_answers() -> None:
    spec, state, commands = _started()
    assert commands == [domain.DispatchStep(AUTO_STEP, 1)]
    draft = spec.step("draft")
    assert state.config_of(draft) == draft.with_  # no answers yet: tags as written
    commands = domain.on_step_completed(
        spec,
        state,
        step_id=AUTO_STEP,
        attempt=1,
        output={"text": "{...}", "json": ANSWERS},
    )
    assert commands == [domain.DispatchStep("draft", 1), domain.DispatchStep("other", 1)]
    assert state.auto_answers == ANSWERS
    assert state.config_of(draft) == {
        "model": "openai/gpt-4o-mini",
        "system": "You are a patient tutor.",
        "prompt": "Explain {{ input.topic }} to a beginner "
        "({% raw %}warm {{ not a template }}{% endraw %})",
    }
    # the auto step's own config is never filled in
    auto = spec.step(AUTO_STEP)
    assert state.config_of(auto) == auto.with_
    # a retry's edit wins over an answer
    state.overrides = {"draft": {"system": "edited"}}
    assert state.config_of(draft)["system"] == "edited"


def test_a_failed_auto_step_is_retried_then_fails_the_run() -> None:
    spec, state, _ = _started()
    error = ErrorInfo(type="server_error", message="boom", retryable=True)
    commands = domain.on_step_failed(spec, state, step_id=AUTO_STEP, attempt=1, error=error)
    assert [type(c) for c in commands] == [domain.RetryStep]
    assert domain.on_retry_due(spec, state, step_id=AUTO_STEP, attempt=2) == [
        domain.DispatchStep(AUTO_STEP, 2)
    ]
    commands = domain.on_step_failed(spec, state, step_id=AUTO_STEP, attempt=2, error=error)
    assert commands == [domain.FailRun(error, AUTO_STEP)]
    assert state.status == "failed"
    assert state.steps["draft"].status == "pending"
