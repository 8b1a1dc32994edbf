"""The bookkeeping of one llm step: every provider attempt, tool round and cost, and the
data packet the step answers with.

The packet::

    {"text": str | None,            # the answer text (the raw JSON with output_schema)
     "json": Any | None,            # the validated answer, with output_schema
     "model": "provider/model",     # the model that answered
     "finish_reason": "stop" | "length" | ...,
     "attempts": [{"provider", "model", "latency_ms", "tokens_in", "tokens_out",
                   "cost", "error": None | {"type", "message"}}],
     "tool_rounds": [{"model", "calls": [{"name", "arguments", "result"}]}],
     "usage": {"tokens_in", "tokens_out", "cost"},   # summed over every attempt
     "cache_hit": bool, "saved_cost": float | None,  # a cache hit: what it would have cost
     "notes": [str]}                # e.g. a model without a price
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conveyor.contracts import StepMetrics
from conveyor.runtime.runner import StepOutput
from conveyor.step_runner.llm.errors import Failure
from conveyor.step_runner.llm.prices import PriceTable
from conveyor.step_runner.llm.providers import Completion

__all__ = ["StepLedger", "cached_output"]


@dataclass
class StepLedger:
    """What one execution of an llm step did, in order."""

    prices: PriceTable
    attempts: list[dict[str, Any]] = field(default_factory=list)
    tool_rounds: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def record(
        self,
        *,
        provider: str,
        model: str,
        latency_ms: float,
        tokens: tuple[int, int],
        failure: Failure | None = None,
    ) -> dict[str, Any]:
        """Add one provider attempt, priced; returns it (a later check may mark it failed)."""
        tokens_in, tokens_out = tokens
        if (tokens_in or tokens_out) and self.prices.lookup(provider, model) is None:
            self.note(f"no price for {provider}/{model}: counted as 0 (set CONVEYOR_LLM_PRICES)")
        attempt = {
            "provider": provider,
            "model": model,
            "latency_ms": round(latency_ms, 3),
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "cost": self.prices.cost(provider, model, tokens_in=tokens_in, tokens_out=tokens_out),
            "error": failure.as_record() if failure is not None else None,
        }
        self.attempts.append(attempt)
        return attempt

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def usage(self) -> dict[str, Any]:
        return {
            "tokens_in": sum(a["tokens_in"] for a in self.attempts),
            "tokens_out": sum(a["tokens_out"] for a in self.attempts),
            "cost": round(sum(a["cost"] for a in self.attempts), 10),
        }

    def metrics(self) -> StepMetrics:
        """Tokens and cost of every attempt so far, billed failures included."""
        usage = self.usage()
        return StepMetrics(
            tokens_in=usage["tokens_in"], tokens_out=usage["tokens_out"], cost=usage["cost"]
        )

    def details(self) -> dict[str, Any]:
        """What a failed step reports about its attempts (in the error's ``details``)."""
        details: dict[str, Any] = {"attempts": self.attempts, "usage": self.usage()}
        if self.tool_rounds:
            details["tool_rounds"] = self.tool_rounds
        if self.notes:
            details["notes"] = self.notes
        return details

    def output(
        self, *, target: str, completion: Completion, value: Any, structured: bool
    ) -> StepOutput:
        usage = self.usage()
        packet = {
            "text": completion.text,
            "json": value if structured else None,
            "model": target,
            "finish_reason": completion.finish_reason,
            "attempts": self.attempts,
            "tool_rounds": self.tool_rounds,
            "usage": usage,
            "cache_hit": False,
            "saved_cost": None,
            "notes": self.notes,
        }
        metrics = StepMetrics(
            tokens_in=usage["tokens_in"],
            tokens_out=usage["tokens_out"],
            cost=usage["cost"],
            cache_hit=False,
        )
        return StepOutput(output=packet, metrics=metrics)


def cached_output(packet: dict[str, Any]) -> StepOutput:
    """A stored packet served again: nothing spent, and what that saved."""
    saved = float((packet.get("usage") or {}).get("cost") or 0.0)
    packet = {**packet, "cache_hit": True, "saved_cost": saved}
    return StepOutput(output=packet, metrics=StepMetrics(cache_hit=True))
