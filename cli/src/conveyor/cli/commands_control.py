"""``conveyor cancel``, ``conveyor retry`` and ``conveyor resume``: control of runs, through
the control API; ``conveyor runs delete``, through the run recorder."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

import typer

from conveyor.cli.client import ConveyorClient
from conveyor.cli.commands_runs import follow_to_the_end, parse_input_value
from conveyor.cli.errors import BadInput
from conveyor.cli.render import make_console, reports_errors

__all__ = ["cancel", "delete", "parse_edits", "resume", "retry"]

# input.<key> or steps.<step>.with.<key>, each key maybe a dotted path into an object
_EDIT_PATH = re.compile(r"^(input|steps\.[^.\s]+\.with)(\.[^.\s]+)+$")


def parse_edits(pairs: list[str] | None) -> dict[str, Any]:
    """``--set path=value`` pairs: the value is JSON when it parses, like ``-i``."""
    edits: dict[str, Any] = {}
    for pair in pairs or []:
        path, sep, value = pair.partition("=")
        path = path.strip()
        if not sep or not path:
            raise BadInput(f"--set {pair!r} is not path=value (e.g. --set input.name=Bob)")
        if not _EDIT_PATH.match(path):
            raise BadInput(
                f"--set {pair!r}: the path must be input.<key> or steps.<step>.with.<key>"
            )
        edits[path] = parse_input_value(value)
    return edits


def _run_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise BadInput(
            f"{text!r} is not a run id (a UUID, as `conveyor runs list` shows)"
        ) from None


@reports_errors
def cancel(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="A run id.")],
    reason: Annotated[
        str | None, typer.Option("--reason", "-r", help="Why; kept in the run's history.")
    ] = None,
) -> None:
    """Cancel a run: nothing new starts, and the attempts in flight are cancelled."""
    run_id = _run_id(run_id)
    with ConveyorClient() as client:
        client.cancel_run(run_id, reason=reason)
    typer.echo(f"cancelling run {run_id}")


@reports_errors
def resume(run_id: Annotated[str, typer.Argument(metavar="RUN", help="A run id.")]) -> None:
    """Go on with a parked run (a run over its budget gets another max_cost)."""
    run_id = _run_id(run_id)
    with ConveyorClient() as client:
        client.resume_run(run_id)
    typer.echo(f"resuming run {run_id}")


@reports_errors
def retry(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="A run that has ended.")],
    from_step: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Run again from this step (default: the first that failed or was cancelled);"
            " the steps before it keep their outputs.",
        ),
    ] = None,
    edits: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="path=value, applied first: input.<key> or steps.<step>.with.<key>;"
            " the value is JSON when it parses.",
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Show live progress; exit 1 if it fails.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="With --follow: give up after SECONDS.")
    ] = None,
) -> None:
    """Run a finished run again from a step, optionally with edited input or step config."""
    run_id = _run_id(run_id)
    changes = parse_edits(edits)
    console = make_console()
    with ConveyorClient() as client:
        # how the run stands before: --follow waits for the recorder to show the retry
        before = client.find_run(run_id) if follow else None
        client.retry_run(run_id, from_step=from_step, edits=changes)
        where = f" from {from_step}" if from_step else ""
        if not follow:
            typer.echo(f"retrying run {run_id}{where}")
            return
        console.print(f"retrying run [bold]{run_id}[/bold]{where}")
        follow_to_the_end(client, run_id, console, timeout=timeout, since=before or {})


@reports_errors
def delete(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="A run that has ended.")],
) -> None:
    """Delete an ended run's history; its artifacts and scheduler state are deleted with it."""
    run_id = _run_id(run_id)
    with ConveyorClient() as client:
        done = client.delete_run(run_id)
    again = " (it had been deleted before; announced again)" if done.get("already_deleted") else ""
    typer.echo(f"deleted run {run_id}{again}")
