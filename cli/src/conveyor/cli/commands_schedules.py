"""``conveyor schedules list|pause|resume``: the cron schedules of pipelines."""

from __future__ import annotations

import getpass
from collections.abc import Iterable
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from conveyor.cli.client import ConveyorClient
from conveyor.cli.render import format_time, make_console, print_json, reports_errors

__all__ = ["app", "schedules_table"]

app = typer.Typer(help="Cron schedules: list them, pause and resume one.", no_args_is_help=True)

Name = Annotated[str, typer.Argument(help="The pipeline whose schedule to change.")]
By = Annotated[
    str | None,
    typer.Option("--by", help="Who is asking, recorded with the change.", show_default="you"),
]


def _who(by: str | None) -> str:
    if by:
        return by
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name in some containers
        return "cli"


def schedules_table(items: Iterable[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("PIPELINE", no_wrap=True)
    table.add_column("CRON", no_wrap=True)
    table.add_column("TIMEZONE", no_wrap=True)
    table.add_column("CATCH-UP", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("NEXT RUN", no_wrap=True)
    table.add_column("LAST RUN", no_wrap=True)
    for item in items:
        paused = bool(item.get("paused"))
        table.add_row(
            str(item.get("pipeline")),
            str(item.get("cron")),
            str(item.get("timezone")),
            str(item.get("catch_up")),
            Text("paused", style="yellow") if paused else Text("active", style="green"),
            "–" if paused else format_time(item.get("next_fire_at")),
            format_time(item.get("last_fired_at")),
        )
    return table


@app.command("list")
@reports_errors
def list_schedules(
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Every pipeline with a schedule: its cron, state, next and last run (times in UTC)."""
    with ConveyorClient() as client:
        items = client.schedules()
    console = make_console()
    if as_json:
        print_json(console, {"items": items})
    elif not items:
        console.print("no schedules: add `schedule: {cron: ...}` to a pipeline and apply it")
    else:
        console.print(schedules_table(items))


@app.command("pause")
@reports_errors
def pause(name: Name, by: By = None) -> None:
    """Stop firing NAME's schedule until it is resumed."""
    with ConveyorClient() as client:
        before = _paused(client, name)
        client.pause(name, by=_who(by))
    make_console().print(f"{name}: {'already paused' if before else 'paused'}")


@app.command("resume")
@reports_errors
def resume(name: Name, by: By = None) -> None:
    """Fire NAME's schedule again from its next tick (missed ticks are not caught up)."""
    with ConveyorClient() as client:
        before = _paused(client, name)
        item = client.unpause(name, by=_who(by))
    state = "resumed" if before is not False else "already running"
    next_run = format_time(item.get("next_fire_at"))
    make_console().print(f"{name}: {state}, next run at {next_run} UTC")


def _paused(client: ConveyorClient, name: str) -> bool | None:
    """The schedule's state before the change, for the message; ``None`` when unknown."""
    for item in client.schedules():
        if item.get("pipeline") == name:
            return bool(item.get("paused"))
    return None
