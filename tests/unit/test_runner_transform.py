"""The harness's rendering, secrets and config checks, through the transform kind."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from faststream.kafka import KafkaBroker

from conveyor.contracts import StepReady
from conveyor.contracts.kinds import TransformConfig
from conveyor.runtime import KafkaSettings
from conveyor.runtime.runner import Secrets, StepHarness, StepOutput
from conveyor.step_runner.transform import json_or_text, run_transform


def _harness(**executors: Any) -> StepHarness:
    # An unconnected broker: run_step never publishes.
    return StepHarness(
        broker=KafkaBroker("127.0.0.1:1"),
        topics=KafkaSettings(topic_prefix="unit").topics,
        executors={"transform": run_transform, **executors},
        worker="test:1",
    )


def _step(config: dict[str, Any], context: dict[str, Any] | None = None, **kw: Any) -> StepReady:
    return StepReady(
        run_id=uuid.uuid4(),
        pipeline="p",
        version=1,
        step_id="s",
        config=config,
        context=context or {},
        **{"attempt": 1, "kind": "transform", **kw},
    )


async def _run(config: dict[str, Any], context: dict[str, Any] | None = None, **kw: Any) -> Any:
    step = _step(config, context, **kw)
    return json.loads(await _harness().run_step(step))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("[1, 2]", [1, 2]),
        ("42", 42),
        ("4.5", 4.5),
        ("true", True),
        ("null", None),
        ('"quoted"', '"quoted"'),
        ("hello", "hello"),
        ("NaN", "NaN"),
        ("", ""),
        ("{broken", "{broken"),
    ],
)
def test_json_or_text(text: str, expected: Any) -> None:
    assert json_or_text(text) == expected


async def test_text_template_renders_to_text() -> None:
    result = await _run({"template": "Hello {{ input.name | upper }}!"}, {"input": {"name": "ada"}})
    assert result["type"] == "StepCompleted"
    assert result["output"] == "Hello ADA!"
    assert result["input"] == {"template": "Hello ADA!"}
    assert result["worker"] == "test:1"
    assert result["metrics"]["duration_ms"] >= 0


async def test_text_that_is_json_becomes_json() -> None:
    template = '{"email": "{{ input.email | lower }}", "n": {{ input.n }}}'
    result = await _run({"template": template}, {"input": {"email": "A@B.C", "n": 3}})
    assert result["output"] == {"email": "a@b.c", "n": 3}


async def test_single_expression_keeps_native_value() -> None:
    result = await _run({"template": "{{ input.items }}"}, {"input": {"items": [1, 2, 3]}})
    assert result["output"] == [1, 2, 3]
    number = await _run({"template": "{{ input.n * 2 }}"}, {"input": {"n": 21}})
    assert number["output"] == 42


async def test_dict_template_renders_value_by_value() -> None:
    result = await _run(
        {"template": {"title": "{{ steps.a.output.title }}", "tags": ["x", "{{ input.t }}"]}},
        {"input": {"t": "y"}, "steps": {"a": {"output": {"title": "T"}}}},
    )
    assert result["output"] == {"title": "T", "tags": ["x", "y"]}


async def test_undefined_variable_is_a_template_error() -> None:
    result = await _run({"template": "{{ input.missing }}"}, {"input": {}})
    assert result["type"] == "StepFailed"
    assert result["error"]["type"] == "TemplateError"
    assert result["error"]["retryable"] is False
    assert "missing" in result["error"]["message"]
    assert result["input"] == {"template": "{{ input.missing }}"}


async def test_config_that_does_not_fit_the_kind_is_a_config_error() -> None:
    result = await _run({"templat": "typo"})
    assert result["type"] == "StepFailed"
    assert result["error"]["type"] == "ConfigError"
    assert result["error"]["retryable"] is False
    assert "template" in result["error"]["message"]


async def test_secret_is_rendered_and_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_SECRET_API_TOKEN", "s3cr3t-value")
    result = await _run({"template": {"auth": "Bearer {{ secrets.API_TOKEN }}", "n": 1}})
    assert result["type"] == "StepCompleted"
    assert result["output"] == {"auth": "Bearer ***", "n": 1}
    assert result["input"] == {"template": {"auth": "Bearer ***", "n": 1}}
    assert "s3cr3t-value" not in json.dumps(result)


async def test_secret_reaches_the_executor_unmasked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_SECRET_KEY", "k-123")
    seen: list[Any] = []

    async def capture(config: TransformConfig, step: StepReady) -> StepOutput:
        seen.append(config.template)
        return StepOutput(output=len(config.template))

    step = _step({"template": "{{ secrets.KEY }}"})
    result = json.loads(await _harness(transform=capture).run_step(step))
    assert seen == ["k-123"]
    assert result["output"] == 5


async def test_missing_secret_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_SECRET_NOPE", raising=False)
    result = await _run({"template": "x {{ secrets.NOPE }} y"})
    assert result["type"] == "StepFailed"
    assert result["error"]["type"] == "MissingSecret"
    assert result["error"]["retryable"] is False
    assert "CONVEYOR_SECRET_NOPE" in result["error"]["message"]


def test_secrets_never_print_their_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_SECRET_A", "aaa")
    secrets = Secrets()
    assert repr(secrets) == "<secrets>"
    assert secrets["A"] == "aaa"
    assert secrets.mask(["xaaax", {"k": "aaa"}, 3]) == ["x***x", {"k": "***"}, 3]


async def test_unknown_kind_fails_the_step() -> None:
    result = await _run({"template": "x"}, kind="llm")
    assert result["error"]["type"] == "UnknownStepKind"
    assert "transform" in result["error"]["message"]


async def test_item_index_and_attempt_are_carried() -> None:
    result = await _run({"template": "{{ item }}"}, {"item": "b"}, item_index=1, attempt=2)
    assert (result["output"], result["item_index"], result["attempt"]) == ("b", 1, 2)


async def test_a_failed_step_reports_what_its_work_used() -> None:
    from conveyor.contracts import StepFailed, StepMetrics
    from conveyor.runtime.runner import StepError

    async def billed_failure(config: Any, step: StepReady) -> Any:
        raise StepError("the model answered nonsense", metrics=StepMetrics(tokens_in=7, cost=0.5))

    raw = await _harness(transform=billed_failure).run_step(_step({"template": "x"}))
    failed = StepFailed.model_validate_json(raw)
    assert failed.error.message == "the model answered nonsense"
    assert (failed.metrics.tokens_in, failed.metrics.cost) == (7, 0.5)
    assert failed.metrics.duration_ms >= 0
