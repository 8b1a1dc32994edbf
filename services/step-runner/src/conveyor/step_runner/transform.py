"""The ``transform`` kind: the rendered template is the step's output.

The harness has already rendered ``with.template`` against the run's context. A dict or
list template rendered value by value; a template that is one expression kept its native
value (a list stays a list). Text that parses as a JSON object, array, number, boolean or
null becomes that JSON value; any other text stays text.
"""

from __future__ import annotations

import json
from typing import Any

from conveyor.contracts import StepReady
from conveyor.contracts.kinds import TransformConfig

__all__ = ["json_or_text", "run_transform"]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_or_text(text: str) -> Any:
    """The JSON value ``text`` spells, unless that is a bare string; else ``text`` itself."""
    stripped = text.strip()
    if not stripped or stripped[0] == '"':
        return text
    try:
        value = json.loads(stripped, parse_constant=_reject_constant)
    except ValueError:
        return text
    return value


async def run_transform(config: TransformConfig, step: StepReady) -> Any:
    template = config.template
    return json_or_text(template) if isinstance(template, str) else template
