"""Live progress of one run: a table redrawn in a terminal, a line per change elsewhere.

A run waiting for a slot (``max_concurrent_runs``) says so; a fan-out step is one line of
progress (``3/50 items done, 4 running``) rather than a line per item; a run being retried
is followed from the retry on, its earlier attempts not shown again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from conveyor.cli._steps import FanOut, arrange_steps
from conveyor.cli.client import TERMINAL_RUN_STATUSES, ConveyorClient
from conveyor.cli.errors import RunTimeout
from conveyor.cli.render import (
    format_duration,
    progress_text,
    status_text,
    steps_table,
    truncate,
)

__all__ = ["follow_run", "run_state"]

RETRY_APPEAR_TIMEOUT = 30.0

Update = Callable[[dict[str, Any]], None]


def run_state(run: dict[str, Any]) -> Text:
    """The run's status, and what it waits for when that is not obvious."""
    status = str(run.get("status"))
    text = status_text(status)
    if status == "queued":
        text.append(": waiting for a slot", style="dim")
    return text


def follow_run(
    client: ConveyorClient,
    run_id: str,
    console: Console,
    *,
    timeout: float | None = None,
    poll_interval: float = 0.25,
    since: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Watch ``run_id`` until it ends and return its final record.

    ``since`` is the run's record from before a retry was requested: the run is followed
    from when the recorder shows that retry, and the attempts ``since`` holds are not
    shown again.
    """
    follow = _follow_live if console.is_terminal else _follow_lines
    run = follow(client, run_id, console, timeout=timeout, poll_interval=poll_interval, since=since)
    console.print(_summary(run))
    return run


def _wait(
    client: ConveyorClient,
    run_id: str,
    *,
    timeout: float | None,
    poll_interval: float,
    on_update: Update,
    since: dict[str, Any] | None,
) -> dict[str, Any]:
    """``wait_for_run``, after waiting for the retry when following one: until then, the
    recorder still shows how the run ended before."""
    started = time.monotonic()
    if since is not None:
        retries = since.get("retries") or 0
        limit = RETRY_APPEAR_TIMEOUT if timeout is None else min(timeout, RETRY_APPEAR_TIMEOUT)
        while True:
            run = client.find_run(run_id)
            if run is not None and (run.get("retries") or 0) > retries:
                break
            if time.monotonic() - started > limit:
                raise RunTimeout(
                    f"the retry of run {run_id} was not recorded within {limit:.0f}s: "
                    f"see `conveyor runs show {run_id}`"
                )
            time.sleep(poll_interval)
    remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
    return client.wait_for_run(
        run_id, timeout=remaining, poll_interval=poll_interval, on_update=on_update
    )


def _header(run: dict[str, Any], run_id: str) -> Text:
    return Text.assemble(
        (f"{run.get('pipeline')} ", "bold"), (f"run {run_id} ", "dim"), run_state(run)
    )


def _follow_live(
    client: ConveyorClient,
    run_id: str,
    console: Console,
    *,
    timeout: float | None,
    poll_interval: float,
    since: dict[str, Any] | None,
) -> dict[str, Any]:
    waiting = f"waiting for the retry of run {run_id}" if since else f"waiting for run {run_id}"
    spinner = Spinner("dots", text=Text(waiting, style="dim"))
    with Live(spinner, console=console, refresh_per_second=8, transient=False) as live:

        def table(run: dict[str, Any]) -> Any:
            return steps_table(run.get("steps") or [], retried_at=run.get("retried_at"))

        def show(run: dict[str, Any]) -> None:
            spinner.update(text=_header(run, run_id))
            live.update(Group(spinner, table(run)))

        run = _wait(
            client,
            run_id,
            timeout=timeout,
            poll_interval=poll_interval,
            on_update=show,
            since=since,
        )
        live.update(Group(_header(run, run_id), table(run)))
    return run


class _Lines:
    """What has been printed already, so that only changes are."""

    def __init__(self, run_id: str, console: Console) -> None:
        self.run_id = run_id
        self.console = console
        self.run_status: str | None = None
        self.attempts: dict[tuple[Any, ...], tuple[str, int | None]] = {}
        self.fan_outs: dict[str, tuple[Any, ...]] = {}

    def show(self, run: dict[str, Any], *, quiet: bool = False) -> None:
        out: Callable[[Any], None] = _discard if quiet else self.console.print
        # the run's final status is the summary's to tell, after its last steps
        status = str(run.get("status"))
        if status not in TERMINAL_RUN_STATUSES and status != self.run_status:
            out(Text.assemble(f"run {self.run_id} ", run_state(run)))
        self.run_status = status
        for entry in arrange_steps(run.get("steps") or [], retried_at=run.get("retried_at")):
            if not isinstance(entry, FanOut):
                self._attempt(entry, out)
                continue
            # a line per item would drown everything else: the step's progress instead,
            # and each failed item with its error
            for item in entry.items:
                if item.get("status") == "failed":
                    self._attempt(item, out)
            milestone = _milestone(entry)
            if self.fan_outs.get(entry.step_id) != milestone:
                self.fan_outs[entry.step_id] = milestone
                out(_fan_out_line(entry))

    def _attempt(self, step: dict[str, Any], out: Callable[[Any], None]) -> None:
        key = (step.get("step_id"), step.get("item_index"), step.get("attempt"))
        # a running step that reports progress gets a line per tenth done
        progress = step.get("progress") if step.get("status") == "running" else None
        tenth = int(progress * 10) if isinstance(progress, int | float) else None
        state = (str(step.get("status")), tenth)
        if self.attempts.get(key) != state:
            self.attempts[key] = state
            out(_step_line(step))


def _discard(_: Any) -> None:
    pass


def _follow_lines(
    client: ConveyorClient,
    run_id: str,
    console: Console,
    *,
    timeout: float | None,
    poll_interval: float,
    since: dict[str, Any] | None,
) -> dict[str, Any]:
    lines = _Lines(run_id, console)
    if since is not None:
        lines.show(since, quiet=True)  # what was shown before the retry is not news
        lines.run_status = None
    return _wait(
        client,
        run_id,
        timeout=timeout,
        poll_interval=poll_interval,
        on_update=lines.show,
        since=since,
    )


def _milestone(fan: FanOut) -> tuple[Any, ...]:
    """What makes a fan-out's progress worth a line: its status, a failure, or another
    tenth of its items done (every item, up to ten)."""
    counts = fan.counts
    tenths = counts["succeeded"] * 10 // max(fan.total, 1)
    return fan.status, counts["failed"], counts["cancelled"], tenths


def _fan_out_line(fan: FanOut) -> Text:
    line = Text.assemble("  step ", (fan.step_id, "bold"), " ", status_text(fan.status))
    line.append(f": {fan.progress()}")
    if fan.duration_ms is not None:
        line.append(f" in {format_duration(fan.duration_ms)}")
    return line


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
    progress = progress_text(step, width=10)
    if progress is not None:
        line.append(" ")
        line.append(progress)
    elif isinstance(error, dict):
        line.append(f": {error.get('type')}: {truncate(error.get('message'), 100)}", style="red")
    elif step.get("status") == "cancelled" and step.get("reason"):
        line.append(f": {truncate(step['reason'], 100)}", style="dim")
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
    error = run.get("error")
    if status == "succeeded":
        text.append(f"\noutput: {truncate(run.get('output'), 300)}")
    elif status == "cancelled":
        reason = error.get("message") if isinstance(error, dict) else None
        text.append(f"\nreason: {truncate(reason or 'none given', 300)}", style="yellow")
    elif error:
        message = (
            f"{error.get('type')}: {error.get('message')}" if isinstance(error, dict) else error
        )
        text.append(f"\nerror: {truncate(message, 300)}", style="red")
    return text
