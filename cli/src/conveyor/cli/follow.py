"""Live progress of one run: a table redrawn in a terminal, a line per change elsewhere."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from conveyor.cli.client import TERMINAL_RUN_STATUSES, ConveyorClient
from conveyor.cli.render import format_duration, status_text, steps_table, truncate

__all__ = ["follow_run"]


def follow_run(
    client: ConveyorClient,
    run_id: str,
    console: Console,
    *,
    timeout: float | None = None,
    poll_interval: float = 0.25,
) -> dict[str, Any]:
    """Watch ``run_id`` until it ends and return its final record."""
    if console.is_terminal:
        run = _follow_live(client, run_id, console, timeout=timeout, poll_interval=poll_interval)
    else:
        run = _follow_lines(client, run_id, console, timeout=timeout, poll_interval=poll_interval)
    console.print(_summary(run))
    return run


def _follow_live(
    client: ConveyorClient,
    run_id: str,
    console: Console,
    *,
    timeout: float | None,
    poll_interval: float,
) -> dict[str, Any]:
    spinner = Spinner("dots", text=Text(f"waiting for run {run_id}", style="dim"))
    with Live(spinner, console=console, refresh_per_second=8, transient=False) as live:

        def show(run: dict[str, Any]) -> None:
            header = Text.assemble(
                (f"{run.get('pipeline')} ", "bold"),
                (f"run {run_id} ", "dim"),
                status_text(run.get("status")),
            )
            spinner.update(text=header)
            live.update(Group(spinner, steps_table(run.get("steps") or [])))

        run = client.wait_for_run(
            run_id, timeout=timeout, poll_interval=poll_interval, on_update=show
        )
        header = Text.assemble(
            (f"{run.get('pipeline')} ", "bold"),
            (f"run {run_id} ", "dim"),
            status_text(run.get("status")),
        )
        live.update(Group(header, steps_table(run.get("steps") or [])))
    return run


def _follow_lines(
    client: ConveyorClient,
    run_id: str,
    console: Console,
    *,
    timeout: float | None,
    poll_interval: float,
) -> dict[str, Any]:
    seen: dict[tuple[Any, ...], str] = {}
    run_status: list[str] = []

    def show(run: dict[str, Any]) -> None:
        # the run's final status is the summary's to tell, after its last steps
        status = str(run.get("status"))
        if status not in TERMINAL_RUN_STATUSES and (not run_status or run_status[-1] != status):
            run_status.append(status)
            console.print(Text.assemble(f"run {run_id} ", status_text(status)))
        for step in run.get("steps") or []:
            key = (step.get("step_id"), step.get("item_index"), step.get("attempt"))
            status = str(step.get("status"))
            if seen.get(key) == status:
                continue
            seen[key] = status
            console.print(_step_line(step))

    return client.wait_for_run(run_id, timeout=timeout, poll_interval=poll_interval, on_update=show)


def _step_line(step: dict[str, Any]) -> Text:
    name = str(step.get("step_id"))
    if step.get("item_index") is not None:
        name += f"[{step['item_index']}]"
    line = Text.assemble(
        "  step ",
        (name, "bold"),
        f" (attempt {step.get('attempt', 1)}) ",
        status_text(step.get("status")),
    )
    if step.get("duration_ms") is not None and step.get("status") != "running":
        line.append(f" in {format_duration(step['duration_ms'])}")
    error = step.get("error")
    if isinstance(error, dict):
        line.append(f": {error.get('type')}: {truncate(error.get('message'), 100)}", style="red")
    elif step.get("status") == "succeeded" and "output" in step:
        line.append(f" → {truncate(step.get('output'), 80)}", style="dim")
    return line


def _summary(run: dict[str, Any]) -> Text:
    status = str(run.get("status"))
    text = Text.assemble(
        f"run {run.get('id')} ",
        status_text(status),
        f" in {format_duration(run.get('duration_ms'))}",
    )
    if status == "succeeded":
        text.append(f"\noutput: {truncate(run.get('output'), 300)}")
    elif run.get("error"):
        error = run["error"]
        message = (
            f"{error.get('type')}: {error.get('message')}" if isinstance(error, dict) else error
        )
        text.append(f"\nerror: {truncate(message, 300)}", style="red")
    return text
