"""Answer ``<AUTO>ask</AUTO>`` values with a model, once, as a pipeline version is registered.

(``auto: {resolve: run_start}`` asks are left alone here: each run answers them with its
synthetic ``auto`` step, see ``conveyor.contracts.pipeline.spec_for_run``.)

The answers replace the asks in the version that is stored, and each is recorded in the
spec's ``auto_resolved`` (``steps.x.with.system`` -> ask, answer, model), so every run of
that version sees the same values and the history says where they came from. The model
is ``auto.model`` of the pipeline (default ``openai/gpt-4o-mini``), called through the
provider's own SDK with the usual variables: ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL``
(any OpenAI-compatible server, e.g. Ollama) and ``ANTHROPIC_API_KEY`` /
``ANTHROPIC_BASE_URL``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.contracts import (
    AUTO_TAG,
    AutoResolution,
    PipelineInvalid,
    PipelineSpec,
    Problem,
    auto_asks,
    load_pipeline,
)

__all__ = ["AutoResolutionFailed", "AutoSettings", "resolve_auto"]

Answer = Callable[[str, str], Awaitable[str]]
"""``(model, ask) -> answer``: how an ask reaches a model (a seam for tests)."""

_SYSTEM = (
    "You write one configuration value for a step of an AI pipeline. Reply with the value "
    "itself and nothing else: no preamble, no quotes, no explanation."
)
_TIMEOUT = 60.0
_TEMPLATE_MARKS = re.compile(r"\{\{|\{%|\{#")


class AutoSettings(BaseSettings):
    """The providers' own variables, as the step runner reads them."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", env_ignore_empty=True)

    openai_api_key: str | None = None
    openai_base_url: str | None = None
    anthropic_api_key: str | None = None
    anthropic_base_url: str | None = None


class AutoResolutionFailed(RuntimeError):
    """The model was configured but could not answer (network, provider error)."""


async def resolve_auto(
    spec: PipelineSpec,
    *,
    source_file: str | None,
    settings: AutoSettings | None = None,
    answer: Answer | None = None,
) -> PipelineSpec:
    """The spec with every AUTO ask answered and recorded; unchanged when it has none.

    Raises ``PipelineInvalid`` when no model is configured for the asks (or the answers
    make the spec invalid), ``AutoResolutionFailed`` when the model call fails.
    """
    if spec.auto.resolve == "run_start":
        return spec  # answered at each run start, by the run's ``auto`` step
    source = source_file or "<request>"
    asks = [
        (step, path, ask)
        for step in spec.steps
        for path, ask in dict.fromkeys(auto_asks(step.with_, "with"))
    ]
    if not asks:
        return spec
    first_step, first_path, _ = asks[0]
    if answer is None:
        provider = _provider_answer(spec.auto.model, settings or AutoSettings(), source=source)
        if isinstance(provider, Problem):
            raise PipelineInvalid(
                [provider.model_copy(update={"step": first_step.id, "field": first_path})]
            )
        answer = provider
    answers: dict[str, str] = {}
    for step, path, ask in asks:
        if ask not in answers:
            try:
                answers[ask] = (await answer(spec.auto.model, ask)).strip()
            except AutoResolutionFailed:
                raise
            except Exception as exc:
                raise AutoResolutionFailed(
                    f"{source}: step '{step.id}' field '{path}': {spec.auto.model} could not "
                    f"answer the <AUTO> ask: {exc}"
                ) from exc

    records: dict[str, AutoResolution] = {}
    steps = []
    for step in spec.steps:
        config = _answered(step.with_, f"steps.{step.id}.with", answers, spec.auto.model, records)
        steps.append(step.model_copy(update={"with_": config}))
    resolved = spec.model_copy(update={"steps": steps, "auto_resolved": records})
    # the answers are the model's text: check the version as it will be stored
    return load_pipeline(resolved.canonical(), source=source)


def _answered(
    value: Any, path: str, answers: dict[str, str], model: str, records: dict[str, AutoResolution]
) -> Any:
    if isinstance(value, str):
        count = 0

        def replace(match: re.Match[str]) -> str:
            nonlocal count
            count += 1
            ask = match["ask"].strip()
            key = path if count == 1 else f"{path}#{count}"
            records[key] = AutoResolution(ask=ask, value=answers[ask], model=model)
            return _literal_text(answers[ask])

        return AUTO_TAG.sub(replace, value)
    if isinstance(value, dict):
        return {k: _answered(v, f"{path}.{k}", answers, model, records) for k, v in value.items()}
    if isinstance(value, list):
        return [_answered(v, f"{path}[{i}]", answers, model, records) for i, v in enumerate(value)]
    return value


def _literal_text(text: str) -> str:
    """Step configs are templates: an answer that happens to contain ``{{`` stays text."""
    if _TEMPLATE_MARKS.search(text):
        return "{% raw %}" + text.replace("{% endraw %}", "") + "{% endraw %}"
    return text


def _provider_answer(model: str, settings: AutoSettings, *, source: str) -> Answer | Problem:
    provider, _, name = model.partition("/")
    if not name:
        provider, name = "openai", model
    if provider == "openai":
        if not (settings.openai_api_key or settings.openai_base_url):
            return _unconfigured(source, model, "OPENAI_API_KEY or OPENAI_BASE_URL")
        return _openai_answer(settings, name)
    if provider == "anthropic":
        if not (settings.anthropic_api_key or settings.anthropic_base_url):
            return _unconfigured(source, model, "ANTHROPIC_API_KEY or ANTHROPIC_BASE_URL")
        return _anthropic_answer(settings, name)
    return Problem(
        file=source,
        field="auto.model",
        message=f"unknown provider {provider!r} in {model!r} (use openai/... or anthropic/...)",
    )


def _unconfigured(source: str, model: str, variables: str) -> Problem:
    return Problem(
        file=source,
        message=(
            f"an <AUTO> ask is answered by {model} at registration, but the scheduler has "
            f"no provider for it: set {variables} in the scheduler's environment (or choose "
            f"another auto.model)"
        ),
    )


def _openai_answer(settings: AutoSettings, name: str) -> Answer:
    async def answer(model: str, ask: str) -> str:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(
            api_key=settings.openai_api_key or "unused",  # a local server may need none
            base_url=settings.openai_base_url,
            timeout=_TIMEOUT,
        )
        async with client:
            completion = await client.chat.completions.create(
                model=name,
                messages=[
                    {"role": "system", "content": _SYSTEM},
                    {"role": "user", "content": ask},
                ],
            )
        text = completion.choices[0].message.content if completion.choices else None
        if not text:
            raise AutoResolutionFailed(f"{model} returned no text for the <AUTO> ask {ask!r}")
        return text

    return answer


def _anthropic_answer(settings: AutoSettings, name: str) -> Answer:
    async def answer(model: str, ask: str) -> str:
        from anthropic import AsyncAnthropic

        client = AsyncAnthropic(
            api_key=settings.anthropic_api_key or "unused",
            base_url=settings.anthropic_base_url,
            timeout=_TIMEOUT,
        )
        async with client:
            message = await client.messages.create(
                model=name,
                max_tokens=1024,
                system=_SYSTEM,
                messages=[{"role": "user", "content": ask}],
            )
        text = "".join(block.text for block in message.content if block.type == "text")
        if not text:
            raise AutoResolutionFailed(f"{model} returned no text for the <AUTO> ask {ask!r}")
        return text

    return answer
