"""``conveyor run``, ``conveyor runs list|show`` and ``conveyor errors``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console

from conveyor.cli.client import ConveyorClient
from conveyor.cli.errors import BadInput, RunTimeout
from conveyor.cli.follow import follow_run
from conveyor.cli.render import (
    errors_table,
    make_console,
    print_json,
    render_run,
    reports_errors,
    runs_table,
)

__all__ = [
    "errors",
    "follow_to_the_end",
    "parse_input",
    "parse_input_value",
    "run",
    "runs_app",
]

runs_app = typer.Typer(help="Recorded runs: list them, show one's history.", no_args_is_help=True)

RUN_STATUSES = ("queued", "running", "parked", "succeeded", "failed", "cancelled", "skipped")


def parse_input_value(text: str) -> Any:
    """JSON when it parses (numbers, booleans, lists, objects, null), else the text itself.

    ``NaN`` and ``Infinity`` stay text: Python's JSON reader takes them as numbers that
    JSON has not got (``-i title=Infinity`` is a title)."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except ValueError:
        return text


_JSON_NAMES = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def parse_input(pairs: list[str] | None, input_json: str | None = None) -> dict[str, Any]:
    """``--input-json`` first, then each ``-i key=value`` on top of it."""
    result: dict[str, Any] = {}
    if input_json is not None:
        try:
            parsed = json.loads(input_json, parse_constant=_not_json)
        except ValueError as exc:
            raise BadInput(f"--input-json is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            got = _JSON_NAMES.get(type(parsed), type(parsed).__name__)
            raise BadInput(f"--input-json must be a JSON object, got {got}")
        result.update(parsed)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BadInput(f"-i {pair!r} is not key=value (e.g. -i name=Ada -i count=3)")
        result[key] = parse_input_value(value)
    return result


def _exit_for(status: str | None) -> None:
    if status != "succeeded":
        raise typer.Exit(1)


def follow_to_the_end(
    client: ConveyorClient,
    run_id: str,
    console: Console,
    *,
    timeout: float | None,
    since: dict[str, Any] | None = None,
) -> None:
    """Follow the run, then exit 0 if it succeeded, else 1 (failed, cancelled, timed out)."""
    try:
        final = follow_run(client, run_id, console, timeout=timeout, since=since)
    except RunTimeout as exc:  # not bad input: the run just did not succeed in time
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"stopped following; the run goes on: conveyor runs show {run_id}", err=True)
        raise typer.Exit(130) from None
    _exit_for(final.get("status"))


@reports_errors
def run(
    pipeline: Annotated[str, typer.Argument(help="Name of a registered pipeline.")],
    inputs: Annotated[
        list[str] | None,
        typer.Option("--input", "-i", help="key=value; the value is JSON when it parses."),
    ] = None,
    input_json: Annotated[
        str | None, typer.Option("--input-json", help="The whole input as a JSON object.")
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Show live progress; exit 1 if it fails.")
    ] = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Triggers with the same key start one run."),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="With --follow: give up after SECONDS.")
    ] = None,
) -> None:
    """Trigger a run and print its id (with --follow, watch it to the end)."""
    run_input = parse_input(inputs, input_json)
    console = make_console()
    with ConveyorClient() as client:
        accepted = client.trigger(pipeline, run_input, idempotency_key=idempotency_key)
        run_id = str(accepted["run_id"])
        if accepted.get("duplicate"):
            # stderr: stdout stays the run id alone, for scripts
            typer.echo(
                f"duplicate: idempotency key {idempotency_key!r} already started run {run_id};"
                " no new run",
                err=True,
            )
        if not follow:
            console.print(run_id)
            return
        console.print(f"run [bold]{run_id}[/bold] of {accepted.get('pipeline', pipeline)}")
        follow_to_the_end(client, run_id, console, timeout=timeout)


@runs_app.command("list")
@reports_errors
def list_runs(
    pipeline: Annotated[str | None, typer.Option("--pipeline", "-p")] = None,
    status: Annotated[
        str | None, typer.Option("--status", "-s", help=", ".join(RUN_STATUSES))
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000)] = 20,
    cursor: Annotated[str | None, typer.Option("--cursor", help="Page from next_cursor.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the recorder's JSON.")] = False,
) -> None:
    """Recent runs, newest first."""
    if status is not None and status not in RUN_STATUSES:
        raise BadInput(f"--status {status!r} is not one of {', '.join(RUN_STATUSES)}")
    with ConveyorClient() as client:
        page = client.list_runs(pipeline=pipeline, status=status, limit=limit, cursor=cursor)
    console = make_console()
    if as_json:
        print_json(console, page)
        return
    items = page.get("items") or []
    if not items:
        console.print("no runs recorded" + (f" for {pipeline}" if pipeline else ""))
        return
    console.print(runs_table(items))
    if page.get("next_cursor"):
        console.print(f"[dim]more: --cursor {page['next_cursor']}[/dim]")


@runs_app.command("show")
@reports_errors
def show_run(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="A run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the recorder's JSON.")] = False,
    width: Annotated[
        int, typer.Option("--width", help="Characters of each step's output to show.")
    ] = 60,
    items: Annotated[
        bool, typer.Option("--items", help="List every item attempt of fan-out steps.")
    ] = False,
) -> None:
    """A run's history: status, timings, every step attempt, errors with tracebacks.

    A fan-out step is one line (``12/50 items done``); --items lists its items too.
    """
    with ConveyorClient() as client:
        record = client.get_run(run_id)
    console = make_console()
    if as_json:
        print_json(console, record)
    else:
        console.print(render_run(record, output_limit=width, items=items))


@reports_errors
def errors(
    pipeline: Annotated[str | None, typer.Option("--pipeline", "-p")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=1000)] = 50,
    tracebacks: Annotated[
        bool, typer.Option("--traceback", "-t", help="Print every traceback in full.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the recorder's JSON.")] = False,
) -> None:
    """Recent errors, newest first: step failures and run failures, with their types."""
    with ConveyorClient() as client:
        items = client.list_errors(pipeline=pipeline, limit=limit)
    console = make_console()
    if as_json:
        print_json(console, {"items": items})
        return
    if not items:
        console.print("no errors recorded" + (f" for {pipeline}" if pipeline else ""))
        return
    console.print(errors_table(items))
    if tracebacks:
        for item in items:
            if item.get("traceback"):
                console.rule(
                    f"[red]{item.get('run_id')} {item.get('step_id') or ''} "
                    f"{item.get('type')}[/red]",
                    align="left",
                )
                console.print(item["traceback"].rstrip(), markup=False)
