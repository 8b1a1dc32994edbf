"""What a model call costs: tokens times a price per million tokens, in USD.

The built-in table holds list prices of common OpenAI and Anthropic models (standard tier,
no batch or cache discounts) and goes stale: ``CONVEYOR_LLM_PRICES`` overrides or extends
it, ``{"openai/gpt-4o-mini": {"input": 0.15, "output": 0.6}}`` or ``[0.15, 0.6]``. A model
is looked up by its exact ``provider/model`` name, then by the longest known prefix, so a
dated snapshot (``gpt-4o-mini-2024-07-18``) costs what its family costs. A model with no
price costs 0, and the step's packet says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BUILTIN_PRICES", "Price", "PriceTable"]


@dataclass(frozen=True, slots=True)
class Price:
    """USD per one million input (prompt) and output (completion) tokens."""

    input: float
    output: float

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input + tokens_out * self.output) / 1_000_000


BUILTIN_PRICES: dict[str, Price] = {
    "openai/gpt-4o-mini": Price(0.15, 0.60),
    "openai/gpt-4o": Price(2.50, 10.00),
    "openai/gpt-4.1": Price(2.00, 8.00),
    "openai/gpt-4.1-mini": Price(0.40, 1.60),
    "openai/gpt-4.1-nano": Price(0.10, 0.40),
    "openai/gpt-5": Price(1.25, 10.00),
    "openai/gpt-5-mini": Price(0.25, 2.00),
    "openai/gpt-5-nano": Price(0.05, 0.40),
    "openai/o3": Price(2.00, 8.00),
    "openai/o4-mini": Price(1.10, 4.40),
    "openai/gpt-3.5-turbo": Price(0.50, 1.50),
    "anthropic/claude-haiku-4-5": Price(1.00, 5.00),
    "anthropic/claude-3-5-haiku": Price(0.80, 4.00),
    "anthropic/claude-3-haiku": Price(0.25, 1.25),
    "anthropic/claude-sonnet-4": Price(3.00, 15.00),
    "anthropic/claude-3-7-sonnet": Price(3.00, 15.00),
    "anthropic/claude-opus-4-5": Price(5.00, 25.00),
    "anthropic/claude-opus-4-6": Price(5.00, 25.00),
    "anthropic/claude-opus-4": Price(15.00, 75.00),
}


def _price(name: str, value: Any) -> Price:
    if isinstance(value, Price):
        return value
    if isinstance(value, Mapping):
        return Price(float(value.get("input", 0.0)), float(value.get("output", 0.0)))
    if isinstance(value, list | tuple) and len(value) == 2:
        return Price(float(value[0]), float(value[1]))
    raise ValueError(
        f"CONVEYOR_LLM_PRICES[{name!r}]: expected {{'input': usd, 'output': usd}} "
        f"per 1M tokens, or [input, output], not {value!r}"
    )


class PriceTable:
    """The built-in prices with the overrides of ``CONVEYOR_LLM_PRICES`` on top."""

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        self._prices = dict(BUILTIN_PRICES)
        for name, value in (overrides or {}).items():
            self._prices[name] = _price(name, value)
        # Longest first, so that gpt-4o-mini wins over gpt-4o for gpt-4o-mini-2024-07-18.
        self._prefixes = sorted(self._prices, key=len, reverse=True)

    def lookup(self, provider: str, model: str) -> Price | None:
        """The price of ``provider/model``, or None when nothing matches."""
        name = f"{provider}/{model}"
        price = self._prices.get(name)
        if price is not None:
            return price
        for known in self._prefixes:
            if name.startswith(known + "-") or name.startswith(known + "@"):
                return self._prices[known]
        return None

    def cost(self, provider: str, model: str, *, tokens_in: int, tokens_out: int) -> float:
        price = self.lookup(provider, model)
        return 0.0 if price is None else round(price.cost(tokens_in, tokens_out), 10)
