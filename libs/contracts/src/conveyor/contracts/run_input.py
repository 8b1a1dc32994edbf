"""A run's input checked against the pipeline's declared ``input``.

A pipeline that declares ``input`` takes those names only, so a misspelt key is an error
rather than a value silently ignored while the default is used; one that declares none
takes any object. A null counts as not given (the default applies). Values must be
storable JSON (no NUL character, finite numbers) and the whole at most
``MAX_RUN_INPUT_BYTES``: the input rides in events and lands in JSONB.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from conveyor.contracts._limits import MAX_RUN_INPUT_BYTES, json_type_name, json_value_problem

if TYPE_CHECKING:
    from conveyor.contracts.pipeline import PipelineSpec

__all__ = ["InputInvalid", "run_input_problems", "validate_run_input"]

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


class InputInvalid(ValueError):
    """A run's input that does not match the pipeline's declared ``input``; ``problems``
    lists each ``(input name, message)``, the message naming the input too."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(message for _, message in problems))


def validate_run_input(spec: PipelineSpec, run_input: Any) -> dict[str, Any]:
    """The input a run starts with, defaults applied; raises ``InputInvalid`` listing every
    problem (see the module's docstring for the rules)."""
    result, problems = run_input_problems(spec, run_input)
    if problems:
        raise InputInvalid(problems)
    return result


def run_input_problems(
    spec: PipelineSpec, run_input: Any
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``validate_run_input`` without raising: the input with defaults, and the problems."""
    if not isinstance(run_input, dict):
        got = json_type_name(run_input)
        return {}, [("", f"the input must be a JSON object of name: value, got {got}")]
    unstorable = json_value_problem(run_input)
    if unstorable is not None:
        loc, message = unstorable
        name = ".".join(str(part) for part in loc)
        return {}, [(name, f"input '{name}' {message}")]
    size = len(json.dumps(run_input, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_RUN_INPUT_BYTES:
        message = (
            f"the input is {size} bytes of JSON; the limit is {MAX_RUN_INPUT_BYTES} "
            "(pass large data as an artifact or a URL)"
        )
        return {}, [("", message)]
    result = dict(run_input)
    problems: list[tuple[str, str]] = []
    if spec.input:
        declared = ", ".join(sorted(spec.input))
        for name in sorted(set(run_input) - set(spec.input)):
            message = (
                f"input '{name}' is not declared by pipeline '{spec.name}' (declared: {declared})"
            )
            problems.append((name, message))
    for name, field in spec.input.items():
        value = result.get(name)
        if value is None:
            if field.default is not None or not field.required:
                result[name] = field.default
            else:
                given = "null" if name in result else "not given"
                problems.append((name, f"input '{name}' is required ({given})"))
            continue
        expected = _JSON_TYPES.get(field.type)
        wrong_bool = isinstance(value, bool) and field.type in ("number", "integer")
        if expected is not None and (not isinstance(value, expected) or wrong_bool):
            problems.append((name, f"input '{name}' must be {field.type}, got {_described(value)}"))
    return result, problems


def _described(value: Any) -> str:
    """``string "abc"``: the JSON type and a glimpse of the value, so the user sees what
    arrived (``-i n=3x`` gives text, ``-i n=3`` a number)."""
    text = json.dumps(value, ensure_ascii=False)
    return f"{json_type_name(value)} {text if len(text) <= 40 else text[:37] + '...'}"
