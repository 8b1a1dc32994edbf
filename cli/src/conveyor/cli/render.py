"""How the CLI shows things: tables of pipelines, runs and errors, a run's history, and
failures as one line on stderr with exit status 2."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from conveyor.cli._steps import FanOut, arrange_steps
from conveyor.cli.errors import ConveyorError

__all__ = [
    "STATUS_STYLES",
    "errors_table",
    "format_duration",
    "format_time",
    "make_console",
    "pipelines_table",
    "print_json",
    "progress_text",
    "render_run",
    "reports_errors",
    "runs_table",
    "status_text",
    "steps_table",
    "truncate",
]

P = ParamSpec("P")
R = TypeVar("R")

STATUS_STYLES: dict[str, str] = {
    "queued": "dim",
    "scheduled": "dim",
    "running": "cyan",
    "parked": "magenta",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "yellow",
    "skipped": "dim",
}
_MISSING = "–"


def make_console(*, stderr: bool = False) -> Console:
    """A console that stays wide when piped, so ids are never folded."""
    width = None
    if not os.environ.get("COLUMNS"):
        probe = Console(stderr=stderr)
        width = None if probe.is_terminal else 160
    return Console(stderr=stderr, highlight=False, width=width)


def reports_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Show a ``ConveyorError`` as its message on stderr and exit with status 2."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ConveyorError as exc:
            for line in str(exc).splitlines() or ["failed"]:
                typer.echo(f"error: {line}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def print_json(console: Console, value: Any) -> None:
    console.print_json(json.dumps(value, default=str))


# --- small formats ------------------------------------------------------------------------


def format_duration(ms: float | None) -> str:
    if ms is None:
        return _MISSING
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_time(value: str | None) -> str:
    """An ISO timestamp as ``YYYY-MM-DD HH:MM:SS`` (in the timestamp's own zone)."""
    if not value:
        return _MISSING
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return parsed.strftime("%Y-%m-%d %H:%M:%S")


def truncate(value: Any, limit: int = 80) -> str:
    if value is None:
        return _MISSING
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(text.split()) if "\n" in text else text
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_text(status: str | None) -> Text:
    status = status or "unknown"
    return Text(status, style=STATUS_STYLES.get(status, ""))


def _number(value: Any, *, money: bool = False) -> str:
    if value in (None, 0, 0.0):
        return _MISSING
    return f"${value:.4f}" if money else str(value)


def _error_line(error: Any) -> str:
    if not error:
        return ""
    if isinstance(error, dict):
        kind = error.get("type") or "Error"
        return f"{kind}: {error.get('message', '')}"
    return str(error)


# --- tables ---------------------------------------------------------------------------------


def pipelines_table(items: Iterable[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("PIPELINE", no_wrap=True)
    table.add_column("LATEST", justify="right")
    table.add_column("VERSIONS", justify="right")
    table.add_column("REGISTERED")
    table.add_column("DESCRIPTION")
    for item in items:
        versions = item.get("versions") or []
        latest = item.get("latest_version")
        registered = next(
            (v.get("registered_at") for v in versions if v.get("version") == latest), None
        )
        table.add_row(
            item.get("name", "?"),
            f"v{latest}" if latest is not None else _MISSING,
            str(len(versions)),
            format_time(registered),
            item.get("description") or "",
        )
    return table


def runs_table(items: Iterable[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("RUN", no_wrap=True)
    table.add_column("PIPELINE", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("REQUESTED", no_wrap=True)
    table.add_column("DURATION", justify="right", no_wrap=True)
    table.add_column("TOKENS", justify="right")
    table.add_column("COST", justify="right")
    table.add_column("ERROR", no_wrap=True, overflow="ellipsis")
    for run in items:
        version = run.get("version")
        table.add_row(
            str(run.get("id")),
            f"{run.get('pipeline')}" + (f" v{version}" if version is not None else ""),
            _run_status(run),
            format_time(run.get("requested_at")),
            format_duration(run.get("duration_ms")),
            _number(run.get("tokens")),
            _number(run.get("cost"), money=True),
            truncate(_error_line(run.get("error")), 60) if run.get("error") else "",
        )
    return table


def _step_name(step: dict[str, Any]) -> str:
    name = str(step.get("step_id"))
    return name if step.get("item_index") is None else f"{name}[{step['item_index']}]"


def progress_text(step: dict[str, Any], *, width: int = 20) -> Text | None:
    """A running step's last progress report as ``━━━━━━╺━━━━  42% encoding``; None when
    the step is not running or reported nothing."""
    if step.get("status") != "running":
        return None
    fraction, message = step.get("progress"), step.get("progress_message")
    if fraction is None and not message:
        return None
    text = Text()
    if isinstance(fraction, int | float):
        fraction = min(max(float(fraction), 0.0), 1.0)
        done = round(fraction * width)
        text.append("━" * done, style="cyan")
        text.append("━" * (width - done), style="dim")
        text.append(f" {fraction * 100:3.0f}%")
    if message:
        text.append(f" {message}" if text else str(message), style="dim")
    return text


def _attempt_detail(step: dict[str, Any], limit: int) -> Text:
    progress = progress_text(step)
    if progress is not None:
        return progress
    if step.get("error"):
        return Text(truncate(_error_line(step["error"]), limit), style="red")
    if step.get("reason"):
        return Text(truncate(step["reason"], limit), style="dim")
    return Text(truncate(step.get("output"), limit) if "output" in step else "")


def _fan_out_detail(fan: FanOut, limit: int) -> Text:
    detail = Text(fan.progress())
    error = (fan.summary or {}).get("error")
    if error:
        detail.append(f": {truncate(_error_line(error), limit)}", style="red")
    elif fan.status == "succeeded" and fan.summary is not None:
        detail.append(f" → {truncate(fan.summary.get('output'), limit)}", style="dim")
    return detail


def _run_status(run: dict[str, Any]) -> Text:
    text = status_text(run.get("status"))
    if run.get("retries"):
        text.append(f" (retried {run['retries']}×)", style="dim")
    return text


def steps_table(
    steps: Iterable[dict[str, Any]],
    *,
    output_limit: int = 60,
    items: bool = False,
    retried_at: str | None = None,
) -> Table:
    """One row per attempt, grouped by step; a fan-out step is one row (``12/50 items
    done``) and its items are listed under it only with ``items``."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("STEP", no_wrap=True)
    table.add_column("ATTEMPT", justify="right")
    table.add_column("KIND", no_wrap=True)
    table.add_column("STATUS", no_wrap=True)
    table.add_column("DURATION", justify="right", no_wrap=True)
    table.add_column("OUTPUT / ERROR")

    def add(step: dict[str, Any], *, indent: str = "") -> None:
        table.add_row(
            indent + _step_name(step),
            str(step.get("attempt", 1)),
            str(step.get("kind") or ""),
            status_text(step.get("status")),
            format_duration(step.get("duration_ms")),
            _attempt_detail(step, output_limit),
        )

    for entry in arrange_steps(list(steps), retried_at=retried_at):
        if not isinstance(entry, FanOut):
            add(entry)
            continue
        table.add_row(
            entry.step_id,
            str(entry.attempt) if entry.attempt is not None else _MISSING,
            str(entry.kind or ""),
            status_text(entry.status),
            format_duration(entry.duration_ms),
            _fan_out_detail(entry, output_limit),
        )
        if items:
            for item in (*entry.earlier_items, *entry.items):
                add(item, indent="  ")
    return table


def errors_table(items: Iterable[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("WHEN", no_wrap=True)
    table.add_column("RUN", no_wrap=True)
    table.add_column("PIPELINE", no_wrap=True)
    table.add_column("SCOPE", no_wrap=True)
    table.add_column("STEP", no_wrap=True)
    table.add_column("ATTEMPT", justify="right")
    table.add_column("ERROR", no_wrap=True, overflow="ellipsis")
    for error in items:
        retry = " (retryable)" if error.get("retryable") else ""
        table.add_row(
            format_time(error.get("occurred_at")),
            str(error.get("run_id") or _MISSING),
            str(error.get("pipeline") or _MISSING),
            str(error.get("scope") or _MISSING),
            str(error.get("step_id") or _MISSING),
            str(error.get("attempt") or _MISSING),
            Text(truncate(_error_line(error), 100) + retry, style="red"),
        )
    return table


# --- a run's history ------------------------------------------------------------------------


def render_run(
    run: dict[str, Any], *, output_limit: int = 60, items: bool = False
) -> RenderableType:
    """Status and timings, input and output, every step attempt, then every traceback.

    A fan-out step is one line; ``items`` lists its item attempts (and their tracebacks).
    """
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    version = run.get("version")
    head.add_row("run", str(run.get("id")))
    pipeline = str(run.get("pipeline")) + (f" v{version}" if version is not None else "")
    head.add_row("pipeline", pipeline)
    head.add_row("status", status_text(run.get("status")))
    if run.get("retries"):
        retried = f"{run['retries']}×, last at {format_time(run.get('retried_at'))}"
        head.add_row("retried", retried)
    head.add_row("requested", format_time(run.get("requested_at")))
    head.add_row("started", format_time(run.get("started_at")))
    head.add_row("finished", format_time(run.get("finished_at")))
    head.add_row("duration", format_duration(run.get("duration_ms")))
    if run.get("tokens") or run.get("cost"):
        head.add_row(
            "tokens / cost",
            f"{_number(run.get('tokens'))} / {_number(run.get('cost'), money=True)}",
        )
    head.add_row("input", truncate(run.get("input"), 200))
    head.add_row("output", truncate(run.get("output"), 200))
    if run.get("error"):
        head.add_row("error", Text(_error_line(run["error"]), style="red"))

    parts: list[RenderableType] = [head, Text("")]
    steps = run.get("steps") or []
    retried_at = run.get("retried_at")
    if steps:
        parts.append(
            steps_table(steps, output_limit=output_limit, items=items, retried_at=retried_at)
        )
    else:
        parts.append(Text("no step attempts recorded yet", style="dim"))

    hidden = 0
    for entry in arrange_steps(steps, retried_at=retried_at):
        shown: list[dict[str, Any]] = []
        if isinstance(entry, FanOut):
            failed = [*entry.earlier_items, *entry.items] if items else entry.failed_items()
            failed = [f for f in failed if isinstance(f.get("error"), dict)]
            # without --items, the first failed item's traceback stands for the others
            shown = [*failed[: None if items else 1], *([entry.summary] if entry.summary else [])]
            hidden += len(failed) - len(failed[: None if items else 1])
        else:
            shown = [entry]
        for step in shown:
            error = step.get("error")
            if isinstance(error, dict) and error.get("traceback"):
                title = f"{_step_name(step)} attempt {step.get('attempt', 1)}: {_error_line(error)}"
                parts.append(_traceback_panel(title, error["traceback"]))
    if hidden:
        parts.append(Text(f"{hidden} more failed items: --items shows them all", style="dim"))
    run_error = run.get("error")
    if isinstance(run_error, dict) and run_error.get("traceback"):
        parts.append(_traceback_panel(f"run: {_error_line(run_error)}", run_error["traceback"]))
    return Group(*parts)


def _traceback_panel(title: str, traceback: str) -> Panel:
    return Panel(
        Text(traceback.rstrip()),
        title=Text(truncate(title, 100), style="red"),
        title_align="left",
        border_style="red",
    )
