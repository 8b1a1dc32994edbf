"""A run's step attempts arranged for people: grouped by step, a fan-out step as one line.

The recorder lists every attempt row: for a fan-out step, one per item attempt
(``item_index`` set) and, once the items are done, one for the step itself (``item_index``
null, its output the list of the items' outputs). Fifty items are fifty rows; a person
wants ``each  12/50 items done``. After a retry (``retried_at``), a step that runs again
shows its earlier attempts first, and its fan-out figures count only the re-run's items.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = ["FanOut", "arrange_steps", "parse_time"]

_LIVE = ("scheduled", "running")


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _first_seen(row: dict[str, Any]) -> datetime | None:
    for name in ("scheduled_at", "started_at", "finished_at"):
        when = parse_time(row.get(name))
        if when is not None:
            return when
    return None


@dataclass(frozen=True)
class FanOut:
    """A fan-out step's current state: its own row when there is one, and its items."""

    step_id: str
    summary: dict[str, Any] | None
    items: list[dict[str, Any]] = field(default_factory=list)
    """Every item attempt of the current run of the step, by item, then attempt."""
    earlier_items: list[dict[str, Any]] = field(default_factory=list)
    """Item attempts of the step's runs before the run was retried."""

    @property
    def latest(self) -> dict[int, dict[str, Any]]:
        """Each item's latest attempt."""
        latest: dict[int, dict[str, Any]] = {}
        for row in self.items:
            latest[row["item_index"]] = row  # sorted by attempt: the last one stays
        return latest

    @property
    def counts(self) -> Counter[str]:
        return Counter(str(row.get("status")) for row in self.latest.values())

    @property
    def total(self) -> int:
        output = self.summary.get("output") if self.summary else None
        known = len(output) if isinstance(output, list) else 0
        return max(known, len(self.latest))

    @property
    def kind(self) -> str | None:
        rows = [self.summary] if self.summary else []
        return next((r.get("kind") for r in (*rows, *self.items) if r.get("kind")), None)

    @property
    def attempt(self) -> int | None:
        return self.summary.get("attempt") if self.summary else None

    @property
    def status(self) -> str:
        counts = self.counts
        if self.summary is not None and self.summary.get("status") not in _LIVE:
            return str(self.summary.get("status"))
        if any(counts[s] for s in _LIVE) or not counts:
            return "running" if counts["running"] or counts["succeeded"] else "scheduled"
        if counts["failed"]:
            return "failed"
        if counts["cancelled"]:
            return "cancelled"
        return "running"  # every item done: the step's own result is on its way

    @property
    def duration_ms(self) -> float | None:
        starts = [parse_time(r.get("started_at")) or _first_seen(r) for r in self.items]
        ends = [parse_time(r.get("finished_at")) for r in (*self.items, self.summary or {})]
        begun = [s for s in starts if s is not None]
        ended = [e for e in ends if e is not None]
        if not begun or not ended or self.status in _LIVE:
            return None
        return (max(ended) - min(begun)).total_seconds() * 1000

    def progress(self) -> str:
        """``12/50 items done`` and what else is going on: ``, 2 failed, 3 running``."""
        counts = self.counts
        text = f"{counts['succeeded']}/{self.total} items done"
        for status in ("failed", "cancelled", "skipped", "running", "scheduled"):
            if counts[status]:
                text += f", {counts[status]} {status}"
        return text

    def failed_items(self) -> list[dict[str, Any]]:
        return [r for r in self.latest.values() if r.get("status") == "failed"]


def _by_attempt(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (r.get("attempt") or 0, r.get("item_index") or -1))


def _items(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items = (r for r in rows if r.get("item_index") is not None)
    return sorted(items, key=lambda r: (r["item_index"], r.get("attempt") or 0))


def arrange_steps(
    steps: list[dict[str, Any]], *, retried_at: str | None = None
) -> list[dict[str, Any] | FanOut]:
    """Attempts grouped by step (steps in the order they first appeared), each step's in
    attempt order; a fan-out step's earlier runs as their own rows, then one ``FanOut``."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in steps:
        grouped.setdefault(str(row.get("step_id")), []).append(row)
    fence = parse_time(retried_at)
    arranged: list[dict[str, Any] | FanOut] = []
    for step_id, rows in grouped.items():
        if all(r.get("item_index") is None for r in rows):
            arranged.extend(_by_attempt(rows))
            continue
        current, earlier = rows, []
        if fence is not None:
            rerun = [r for r in rows if (_first_seen(r) or fence) > fence]
            if rerun:
                current = rerun
                earlier = [r for r in rows if r not in rerun]
        arranged.extend(r for r in _by_attempt(earlier) if r.get("item_index") is None)
        summaries = [r for r in _by_attempt(current) if r.get("item_index") is None]
        arranged.append(
            FanOut(
                step_id,
                summaries[-1] if summaries else None,
                items=_items(current),
                earlier_items=_items(earlier),
            )
        )
    return arranged
