"""AUTO asks answered once by a model, through the real OpenAI and Anthropic SDKs talking
to the fake provider; without a provider, a registration error naming the variables."""

from __future__ import annotations

import pytest

from conveyor.contracts import PipelineInvalid, load_pipeline
from conveyor.contracts.templates import render_value
from conveyor.scheduler.auto import AutoResolutionFailed, AutoSettings, resolve_auto
from conveyor.testing.fake_llm import FakeLLMServer, Reply

PIPELINE = """
name: tutor
{auto}
steps:
  - id: teach
    type: llm
    with:
      model: openai/gpt-4o-mini
      system: "<AUTO>a system prompt for a friendly tutor</AUTO>"
      prompt: "Explain {{{{ input.topic }}}} (<AUTO>one word for a learner's level</AUTO>)"
"""


def _spec(auto: str = ""):  # type: ignore[no-untyped-def]
    return load_pipeline(PIPELINE.format(auto=auto), source="tutor.yaml")


def _no_provider() -> AutoSettings:
    """Whatever this machine's environment holds."""
    return AutoSettings(
        openai_api_key=None, openai_base_url=None, anthropic_api_key=None, anthropic_base_url=None
    )


def _openai(llm: FakeLLMServer) -> AutoSettings:
    return AutoSettings(openai_base_url=llm.openai_base_url, openai_api_key="test")


async def test_asks_are_answered_once_and_recorded(fake_llm: FakeLLMServer) -> None:
    fake_llm.script("gpt-4o-mini", Reply(text="  You are a patient tutor.\n"), "beginner")
    spec = await resolve_auto(_spec(), source_file="tutor.yaml", settings=_openai(fake_llm))

    config = spec.step("teach").with_
    assert config["system"] == "You are a patient tutor."
    assert config["prompt"] == "Explain {{ input.topic }} (beginner)"
    assert spec.auto_resolved["steps.teach.with.system"].model_dump() == {
        "ask": "a system prompt for a friendly tutor",
        "value": "You are a patient tutor.",
        "model": "openai/gpt-4o-mini",
    }
    assert spec.auto_resolved["steps.teach.with.prompt"].value == "beginner"
    asked = [r for r in fake_llm.requests if r.path.endswith("/chat/completions")]
    assert len(asked) == 2
    assert asked[0].body["messages"][-1]["content"] == "a system prompt for a friendly tutor"
    # the stored form round-trips
    assert load_pipeline(spec.canonical()).auto_resolved == spec.auto_resolved


async def test_anthropic_model_through_its_sdk(fake_llm: FakeLLMServer) -> None:
    fake_llm.script("claude-haiku-4-5", "Be kind.", "novice")
    settings = AutoSettings(anthropic_base_url=fake_llm.anthropic_base_url, anthropic_api_key="t")
    spec = await resolve_auto(
        _spec("auto: {model: anthropic/claude-haiku-4-5}"),
        source_file="tutor.yaml",
        settings=settings,
    )
    assert spec.step("teach").with_["system"] == "Be kind."
    assert spec.auto_resolved["steps.teach.with.system"].model == "anthropic/claude-haiku-4-5"
    assert {r.provider for r in fake_llm.requests} == {"anthropic"}


async def test_an_answer_with_braces_stays_text(fake_llm: FakeLLMServer) -> None:
    fake_llm.script(None, "Use {{ placeholders }} freely.", "x")
    spec = await resolve_auto(_spec(), source_file=None, settings=_openai(fake_llm))
    rendered = render_value(spec.step("teach").with_, {"input": {"topic": "t"}})
    assert rendered["system"] == "Use {{ placeholders }} freely."


async def test_a_spec_without_asks_is_returned_untouched() -> None:
    spec = load_pipeline("name: p\nsteps:\n  - {id: a, type: transform, with: {template: x}}")
    assert await resolve_auto(spec, source_file=None, settings=_no_provider()) is spec


async def test_without_a_provider_registration_names_the_variables() -> None:
    with pytest.raises(PipelineInvalid) as caught:
        await resolve_auto(_spec(), source_file="tutor.yaml", settings=_no_provider())
    (problem,) = caught.value.problems
    assert (problem.file, problem.step, problem.field) == ("tutor.yaml", "teach", "with.system")
    assert "OPENAI_API_KEY or OPENAI_BASE_URL" in problem.message


async def test_anthropic_without_a_provider_names_its_variables() -> None:
    with pytest.raises(PipelineInvalid, match="ANTHROPIC_API_KEY or ANTHROPIC_BASE_URL"):
        await resolve_auto(
            _spec("auto: {model: anthropic/claude-haiku-4-5}"),
            source_file=None,
            settings=_no_provider(),
        )


async def test_an_unknown_provider_is_named() -> None:
    with pytest.raises(PipelineInvalid) as caught:
        await resolve_auto(
            _spec("auto: {model: mistral/small}"), source_file=None, settings=_no_provider()
        )
    assert caught.value.problems[0].field == "with.system"
    assert "unknown provider 'mistral'" in caught.value.problems[0].message


def test_an_unknown_resolve_is_refused() -> None:
    with pytest.raises(PipelineInvalid) as caught:
        _spec("auto: {resolve: never}")
    assert caught.value.problems[0].field == "auto.resolve"


async def test_run_start_asks_are_left_for_each_run() -> None:
    spec = _spec("auto: {resolve: run_start}")
    assert await resolve_auto(spec, source_file=None, settings=_no_provider()) is spec


async def test_a_provider_error_fails_the_registration(fake_llm: FakeLLMServer) -> None:
    fake_llm.script(None, Reply(status=400, message="bad model"))
    with pytest.raises(AutoResolutionFailed, match=r"step 'teach' field 'with\.system'"):
        await resolve_auto(_spec(), source_file="tutor.yaml", settings=_openai(fake_llm))


async def test_settings_read_the_providers_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant")
    settings = AutoSettings()
    assert settings.openai_base_url == "http://127.0.0.1:11434/v1"
    assert settings.anthropic_api_key == "sk-ant"
