"""How big a definition or a run's input may be, and which values can be stored at all.

Definitions and inputs ride in Kafka events (1 MB a message by default) and land in
PostgreSQL JSONB, which refuses NUL characters and non-finite numbers. A value either of
them would refuse is turned away at the door with a message naming where it is, instead
of failing later as a poison message in the outbox or a 500 from the database.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "MAX_DEFINITION_BYTES",
    "MAX_DEFINITION_VALUES",
    "MAX_IDEMPOTENCY_KEY_CHARS",
    "MAX_RUN_INPUT_BYTES",
    "MAX_STEPS",
    "Location",
    "json_type_name",
    "json_value_problem",
]

MAX_DEFINITION_BYTES = 1 << 20
"""A pipeline definition's text (YAML or JSON), in UTF-8 bytes."""
MAX_DEFINITION_VALUES = 100_000
"""Values in a parsed definition, counting each use of a YAML alias: an alias of an alias
of a list grows exponentially (the "billion laughs"), and every value is walked."""
MAX_STEPS = 500
"""Steps in one pipeline: the run's state is one row, and each step-ready event carries
the outputs of every step upstream."""
MAX_RUN_INPUT_BYTES = 256 << 10
"""A run's input as compact JSON: it rides in RunRequested, RunQueued and every step's
context; larger data belongs in an artifact or behind a URL."""
MAX_IDEMPOTENCY_KEY_CHARS = 256

Location = tuple[str | int, ...]


def json_type_name(value: Any) -> str:
    """The JSON name of a Python value's type, as users know it from their input."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def json_value_problem(
    value: Any, *, at: Location = (), max_values: int | None = None
) -> tuple[Location, str] | None:
    """The first part of ``value`` that JSON and JSONB cannot hold as it is, with its
    location, or None. YAML gives dates, byte strings and non-text keys too: each is named
    with the fix (quote it)."""
    stack: list[tuple[Location, Any]] = [(at, value)]
    seen = 0
    while stack:
        loc, item = stack.pop()
        seen += 1
        if max_values is not None and seen > max_values:
            return at, (
                f"expands to more than {max_values} values (YAML aliases of aliases?); "
                "split the definition or repeat less"
            )
        if isinstance(item, str):
            if "\x00" in item:
                return loc, "contains a NUL character (\\u0000), which cannot be stored"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return loc, f"is {item}, not a finite number"
        elif isinstance(item, dict):
            for key, sub in item.items():
                if not isinstance(key, str):
                    return (*loc, str(key)), (
                        f"the key {key!r} is a YAML {json_type_name(key)}, not text: quote it"
                    )
                if "\x00" in key:
                    return (*loc, key), "the key contains a NUL character (\\u0000)"
                stack.append(((*loc, key), sub))
        elif isinstance(item, list):
            stack.extend(((*loc, i), sub) for i, sub in enumerate(item))
        elif item is not None and not isinstance(item, bool | int):
            return loc, (
                f"is a YAML {type(item).__name__} ({item!r:.40}), not a JSON value: quote it "
                "to keep it as text"
            )
    return None
