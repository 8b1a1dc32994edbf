"""The ``conveyor`` command: run the local stack, register pipelines, trigger and inspect runs.

Bad input (an unreadable or invalid file, a bad ``-i``, an unknown run or pipeline, an API
that does not answer) is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conveyor.cli import (
    commands_artifacts,
    commands_control,
    commands_pipelines,
    commands_runs,
    commands_schedules,
)
from conveyor.cli.render import make_console, reports_errors

__all__ = ["app", "main"]

app = typer.Typer(
    name="conveyor",
    help="Conveyor: AI pipelines as event-driven microservices over Kafka.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(commands_pipelines.app, name="pipelines")
app.add_typer(commands_runs.runs_app, name="runs")
app.add_typer(commands_schedules.app, name="schedules")
app.add_typer(commands_artifacts.app, name="artifacts")
commands_runs.runs_app.command("delete")(commands_control.delete)
app.command("run")(commands_runs.run)
app.command("errors")(commands_runs.errors)
app.command("cancel")(commands_control.cancel)
app.command("retry")(commands_control.retry)
app.command("resume")(commands_control.resume)


@app.command("up")
@reports_errors
def up(
    services: Annotated[
        str | None,
        typer.Option(
            "--services",
            help="Comma-separated subset: scheduler,step-runner,media,run-recorder.",
        ),
    ] = None,
    runners: Annotated[
        int, typer.Option("--runners", min=1, help="How many step-runner processes.")
    ] = 1,
    home: Annotated[
        Path | None,
        typer.Option(
            "--home",
            help="Where logs, media and the embedded database live.",
            show_default=".conveyor",
        ),
    ] = None,
) -> None:
    """Broker, database and every service in the foreground; Ctrl-C stops them all."""
    from conveyor.cli.up import parse_services, run_up

    run_up(services=parse_services(services), runners=runners, home=home, console=make_console())


@app.command("demo")
@reports_errors
def demo(
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds each run may take.")] = 120.0,
) -> None:
    """The example pipelines end to end on a fresh local stack, which is then stopped."""
    from conveyor.cli.demo import run_demo

    raise typer.Exit(run_demo(make_console(), timeout=timeout))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
