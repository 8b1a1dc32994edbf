"""Where a ``provider/model`` goes, and whether calls may go there right now.

``ProviderRegistry`` turns ``openai/gpt-4o-mini`` into the process's one client for the
provider (created at first use, closed at shutdown): ``openai`` and ``anthropic`` with
their usual env vars, or an OpenAI-compatible endpoint named in ``CONVEYOR_LLM_ENDPOINTS``.

``CircuitBreaker`` skips a provider that keeps failing: after ``failures`` server errors
or timeouts in a row its circuit opens and calls fail at once (as ``server_error``, so the
next model is tried) for ``cooldown_s``; then one call is let through (half-open), and its
outcome closes the circuit or opens it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from conveyor.step_runner.llm.errors import ProviderNotConfigured
from conveyor.step_runner.llm.providers import AnthropicProvider, OpenAIProvider, Provider
from conveyor.step_runner.settings import LlmSettings

__all__ = ["CircuitBreaker", "ProviderRegistry", "Route"]

_KEYLESS = "not-needed"
"""The SDKs insist on a key; a keyless endpoint (a local Ollama) gets this one."""


@dataclass(frozen=True)
class Route:
    provider: Provider
    name: str
    model: str
    api_key: str | None


class ProviderRegistry:
    """One client per provider per process, created lazily."""

    def __init__(self, settings: LlmSettings) -> None:
        self._settings = settings
        self._providers: dict[str, Provider] = {}

    def route(self, target: str) -> Route:
        """The provider and model of ``provider/model``; raises when it is not configured."""
        name, sep, model = target.partition("/")
        if not sep or not name or not model:
            raise ProviderNotConfigured(
                f"model {target!r} is not provider/model (e.g. openai/gpt-4o-mini)",
                details={"model": target},
            )
        provider = self._providers.get(name)
        api_key = self._api_key(name)
        if provider is None:
            provider = self._providers[name] = self._create(name, api_key)
        return Route(provider=provider, name=name, model=model, api_key=api_key)

    def _api_key(self, name: str) -> str | None:
        s = self._settings
        if name == "openai":
            return s.openai_api_key
        if name == "anthropic":
            return s.anthropic_api_key
        endpoint = s.endpoints.get(name)
        return endpoint.api_key if endpoint else None

    def _create(self, name: str, api_key: str | None) -> Provider:
        s = self._settings
        if name in ("openai", "anthropic"):
            base_url = s.openai_base_url if name == "openai" else s.anthropic_base_url
            if not api_key and not base_url:
                env = "OPENAI_API_KEY" if name == "openai" else "ANTHROPIC_API_KEY"
                raise ProviderNotConfigured(
                    f"{name} is not configured: set {env} on the step-runner "
                    f"(or {name.upper()}_BASE_URL for a local server)",
                    details={"provider": name, "env": env},
                )
            cls = OpenAIProvider if name == "openai" else AnthropicProvider
            return cls(name, api_key=api_key or _KEYLESS, base_url=base_url)
        endpoint = s.endpoints.get(name)
        if endpoint is None:
            known = ", ".join(["openai", "anthropic", *sorted(s.endpoints)])
            raise ProviderNotConfigured(
                f"unknown provider {name!r} (known: {known}); add OpenAI-compatible "
                f'endpoints as CONVEYOR_LLM_ENDPOINTS=\'{{"{name}": {{"base_url": "..."}}}}\'',
                details={"provider": name, "env": "CONVEYOR_LLM_ENDPOINTS"},
            )
        return OpenAIProvider(name, api_key=api_key or _KEYLESS, base_url=endpoint.base_url)

    async def aclose(self) -> None:
        providers, self._providers = list(self._providers.values()), {}
        await asyncio.gather(*(p.aclose() for p in providers), return_exceptions=True)


State = Literal["closed", "open", "half_open"]


@dataclass
class _Circuit:
    failures: int = 0
    opened_at: float | None = None
    trial_running: bool = False


class CircuitBreaker:
    """Per-provider circuits, in this process. ``clock`` is the test seam."""

    def __init__(
        self,
        *,
        failures: int = 5,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failures
        self._cooldown = cooldown_s
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def state(self, provider: str) -> State:
        circuit = self._circuits.get(provider)
        if circuit is None or circuit.opened_at is None:
            return "closed"
        if self._clock() - circuit.opened_at < self._cooldown:
            return "open"
        return "half_open"

    def allow(self, provider: str) -> bool:
        """Whether a call may go now; in half-open, only one trial call at a time."""
        state = self.state(provider)
        if state == "closed":
            return True
        if state == "open":
            return False
        circuit = self._circuits[provider]
        if circuit.trial_running:
            return False
        circuit.trial_running = True
        return True

    def record_success(self, provider: str) -> None:
        self._circuits.pop(provider, None)

    def record_failure(self, provider: str, *, counts: bool) -> None:
        """A failed call; only server errors and timeouts (``counts``) trip the circuit.

        Any other failure still ends a half-open trial: the provider answered, so it is up.
        """
        circuit = self._circuits.setdefault(provider, _Circuit())
        was_trial = circuit.trial_running
        circuit.trial_running = False
        if not counts:
            if was_trial or circuit.opened_at is None:
                self._circuits.pop(provider, None)
            return
        circuit.failures += 1
        if was_trial or circuit.failures >= self._threshold:
            circuit.opened_at = self._clock()

    def remaining_s(self, provider: str) -> float:
        """Seconds until an open circuit lets a trial call through."""
        circuit = self._circuits.get(provider)
        if circuit is None or circuit.opened_at is None:
            return 0.0
        return max(0.0, circuit.opened_at + self._cooldown - self._clock())
