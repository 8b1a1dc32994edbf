"""What can go wrong talking to Conveyor or starting it, as one exception tree.

::

    ConveyorError                 anything the CLI reports as one line and exit status 2
    ├── ApiUnreachable            nothing answers at the API's URL (or it timed out)
    ├── ApiError                  the API answered something unexpected (5xx, not JSON)
    ├── NotFound                  404: no such run, no such pipeline
    ├── Rejected                  422: the request was understood and refused
    │   └── PipelineRejected      a pipeline definition with problems (``.problems``)
    ├── BadInput                  the user's own arguments are wrong (``-i``, ``--input-json``)
    ├── RunTimeout                a run followed to its end did not end in time
    └── StackError                the local stack could not start (busy port, dead service)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ApiError",
    "ApiUnreachable",
    "BadInput",
    "ConveyorError",
    "NotFound",
    "PipelineRejected",
    "Rejected",
    "RunTimeout",
    "StackError",
    "format_problem",
]


class ConveyorError(Exception):
    """Base of every error the CLI and the client report; ``str()`` is the one-line message."""


class ApiUnreachable(ConveyorError):
    pass


class ApiError(ConveyorError):
    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(ConveyorError):
    pass


class Rejected(ConveyorError):
    pass


class PipelineRejected(Rejected):
    """``problems`` are ``{"file", "step", "field", "message"}`` dicts, one per problem."""

    def __init__(self, problems: list[dict[str, Any]]) -> None:
        self.problems = problems
        super().__init__("\n".join(format_problem(p) for p in problems))


class BadInput(ConveyorError):
    pass


class RunTimeout(ConveyorError):
    pass


class StackError(ConveyorError):
    pass


def format_problem(problem: dict[str, Any]) -> str:
    """``file: step 'x': field 'y': message``, the same shape as ``contracts.Problem``."""
    where = [str(problem.get("file") or "<pipeline>")]
    if problem.get("step") is not None:
        where.append(f"step '{problem['step']}'")
    if problem.get("field") is not None:
        where.append(f"field '{problem['field']}'")
    return f"{': '.join(where)}: {problem.get('message', 'invalid')}"
