"""``conveyor demo``: the example pipelines, end to end, on a fresh local stack of its own.

The demo's stack lives in a temporary directory and takes free ports when the usual ones
are busy, so it never collides with a ``conveyor up`` that is already running. With
``CONVEYOR_DATABASE_URL`` or ``CONVEYOR_KAFKA_BOOTSTRAP`` set, it uses that server but a
database and a topic prefix of its own.
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from conveyor.cli import stack as _stack
from conveyor.cli._startup import fake_provider_notice
from conveyor.cli.client import DEFAULT_API_URL, DEFAULT_RECORDER_URL
from conveyor.cli.commands_pipelines import LoadedPipeline, load_files
from conveyor.cli.errors import BadInput, ConveyorError, RunTimeout
from conveyor.cli.follow import follow_run
from conveyor.cli.render import render_run
from conveyor.cli.up import local_stack
from conveyor.contracts import KIND_CONFIGS

__all__ = ["MAIN_EXAMPLE", "export_artifacts", "find_examples", "run_demo", "runnable_examples"]

MAIN_EXAMPLE = "hello"
_INPUTS: dict[str, dict[str, Any]] = {
    "hello": {"name": "Conveyor"},
    "brief": {"topic": "sea otters"},
    "captions-video": {"topic": "sea otters"},
}
DEMO_OUTPUT = Path(".conveyor/demo-output")
"""Where the demo copies the files its runs made (the stack's own store goes with it)."""


def find_examples() -> Path:
    """``./examples``, else the examples of the source tree this package was installed from."""
    candidates = [Path.cwd() / "examples", *(p / "examples" for p in Path(__file__).parents)]
    for candidate in candidates:
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise BadInput("no examples/ directory with *.yaml pipelines here or beside the package")


@contextlib.contextmanager
def _isolated_servers() -> Iterator[dict[str, str | None]]:
    """A database and topic prefix of the demo's own on servers from the environment."""
    overrides: dict[str, str | None] = {"topic_prefix": None, "database_url": None}
    tag = uuid.uuid4().hex[:8]
    if os.environ.get("CONVEYOR_KAFKA_BOOTSTRAP"):
        overrides["topic_prefix"] = f"conveyor-demo-{tag}"
    server = os.environ.get("CONVEYOR_DATABASE_URL")
    if not server:
        yield overrides
        return
    name = f"conveyor_demo_{tag}"
    try:
        overrides["database_url"] = _stack.create_database(server, name, exist_ok=False)
    except Exception as exc:
        raise ConveyorError(
            f"cannot create database {name} at CONVEYOR_DATABASE_URL: {exc}"
        ) from None
    try:
        yield overrides
    finally:
        with contextlib.suppress(Exception):
            _stack.drop_database(server, name)


def runnable_examples(examples: Path, console: Console | None = None) -> list[Path]:
    """The example files whose step kinds this installation serves (an example of a kind
    still being built, such as ``llm`` before its runner exists, is left out)."""
    files = []
    for path in sorted(examples.glob("*.yaml")):
        missing = sorted(_step_types(path) - set(KIND_CONFIGS))
        if missing and console is not None:
            console.print(f"[dim]skipping {path.name}: no runner serves {', '.join(missing)}[/dim]")
        if not missing:
            files.append(path)
    return files


def _step_types(path: Path) -> set[str]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return set()  # load_files reports it
    steps = data.get("steps") if isinstance(data, dict) else None
    return {
        str(step["type"])
        for step in (steps if isinstance(steps, list) else [])
        if isinstance(step, dict) and "type" in step
    }


def run_demo(console: Console, *, timeout: float = 120.0) -> int:
    """Run the demo; return the exit status (0 when every run succeeded)."""
    examples = find_examples()
    pipelines, problems = load_files(runnable_examples(examples, console))
    if problems:
        raise ConveyorError("\n".join(f"the examples are invalid: {p}" for p in problems))
    main = next((p for p in pipelines if p.spec.name == MAIN_EXAMPLE), pipelines[0])

    home = Path(tempfile.mkdtemp(prefix="conveyor-demo-"))
    succeeded = False
    try:
        with contextlib.ExitStack() as stack:
            started = time.monotonic()
            with console.status("starting a local stack: broker, database, services…"):
                overrides = stack.enter_context(_isolated_servers())
                local = stack.enter_context(
                    local_stack(
                        home=home,
                        quiet=True,
                        # its own local APIs, whatever CONVEYOR_API_URL points at
                        api_url=DEFAULT_API_URL,
                        recorder_url=DEFAULT_RECORDER_URL,
                        free_ports=True,
                        topic_prefix=overrides["topic_prefix"],
                        database_url=overrides["database_url"],
                    )
                )
            broker = "embedded broker" if local.embedded_broker else "broker"
            console.print(
                f"[green]stack ready[/green] in {time.monotonic() - started:.1f}s: "
                f"{broker} {local.bootstrap}, control API {local.api_url}, "
                f"run recorder {local.recorder_url}  [dim](logs in {local.logs})[/dim]"
            )
            if local.fake_llm_url:
                console.print(f"[yellow]{fake_provider_notice(local.fake_llm_url)}[/yellow]")
            with local.client() as client:
                console.rule("registering the examples", align="left")
                for pipeline in pipelines:
                    result = client.register_pipeline(
                        pipeline.source, filename=pipeline.path.name, prompts=pipeline.prompts
                    )
                    console.print(
                        f"{result.get('name')}  v{result.get('version')}  "
                        f"[dim]{pipeline.path.name}, {len(pipeline.spec.steps)} steps[/dim]"
                    )
                ordered = [main, *(p for p in pipelines if p is not main)]
                artifacts = Path(
                    local.service_env.get("CONVEYOR_MEDIA_ARTIFACT_DIR") or local.home / "artifacts"
                )
                outcomes = [
                    _run_one(
                        client,
                        p,
                        console,
                        timeout=timeout,
                        history=p is main,
                        artifacts=artifacts,
                    )
                    for p in ordered
                ]
                succeeded = all(outcomes)
            console.rule("stopping the stack", align="left")
            stop_started = time.monotonic()
            with console.status("stopping services, broker and database…"):
                stack.close()
            console.print(f"stopped in {time.monotonic() - stop_started:.1f}s")
    finally:
        if succeeded:
            shutil.rmtree(home, ignore_errors=True)
        else:
            console.print(f"[yellow]the demo's logs are kept in {home / 'logs'}[/yellow]")
    if succeeded:
        console.print("[bold green]demo finished: every run succeeded[/bold green]")
        return 0
    console.print("[bold red]demo finished: a run did not succeed[/bold red]")
    return 1


def _run_one(
    client: Any,
    pipeline: LoadedPipeline,
    console: Console,
    *,
    timeout: float,
    history: bool,
    artifacts: Path | None = None,
) -> bool:
    name = pipeline.spec.name
    run_input = _INPUTS.get(name, {})
    console.rule(f"running {name}", align="left")
    accepted = client.trigger(name, run_input, requested_by="demo")
    run_id = str(accepted["run_id"])
    console.print(f"run [bold]{run_id}[/bold] of {name} with input {run_input or '{}'}")
    try:
        final = follow_run(client, run_id, console, timeout=timeout)
    except RunTimeout as exc:
        console.print(f"[red]{exc}[/red]")
        return False
    if history:
        console.rule(f"history of run {run_id} (conveyor runs show)", align="left")
        console.print(render_run(client.get_run(run_id)))
    if artifacts is not None and final.get("status") == "succeeded":
        output = DEMO_OUTPUT.resolve()
        for step_id, path in export_artifacts(client.get_run(run_id), artifacts, output):
            console.print(f"[bold]{step_id}[/bold]: [green]{path}[/green]")
    return final.get("status") == "succeeded"


def _artifact_refs(output: Any) -> list[dict[str, Any]]:
    """The artifact references a step's output is or lists (a fan-in lists its items')."""
    values = output if isinstance(output, list) else [output]
    return [
        v
        for v in values
        if isinstance(v, dict)
        and str(v.get("uri", "")).startswith("artifact://sha256/")
        and isinstance(v.get("sha256"), str)
    ]


def export_artifacts(run: dict[str, Any], store: Path, into: Path) -> list[tuple[str, Path]]:
    """Copy the files a run's steps made out of a local artifact store, as
    ``<into>/<pipeline>/<step>[-n].<ext>``; what was copied, by step."""
    copied: list[tuple[str, Path]] = []
    for step in run.get("steps") or []:
        if step.get("status") != "succeeded" or step.get("item_index") is not None:
            continue
        refs = _artifact_refs(step.get("output"))
        for index, ref in enumerate(refs, start=1):
            sha = str(ref["sha256"])
            source = store / "sha256" / sha[:2] / sha
            if not source.is_file():
                continue  # another kind of store: the reference is in the run's history
            extension = mimetypes.guess_extension(str(ref.get("mime") or "")) or ""
            suffix = f"-{index}" if len(refs) > 1 else ""
            target = into / str(run.get("pipeline")) / f"{step['step_id']}{suffix}{extension}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied.append((str(step["step_id"]), target))
    return copied
