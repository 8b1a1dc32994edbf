"""``conveyor pipelines validate|apply|list``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from conveyor.cli._prompts import PromptLibrary, find_prompts_dir
from conveyor.cli.client import ConveyorClient
from conveyor.cli.errors import ApiUnreachable, BadInput, ConveyorError, PipelineRejected
from conveyor.cli.render import make_console, pipelines_table, print_json, reports_errors
from conveyor.contracts import PipelineInvalid, PipelineSpec, Problem, load_pipeline

__all__ = ["LoadedPipeline", "app", "load_files"]

app = typer.Typer(help="Validate, register and list pipeline definitions.", no_args_is_help=True)

_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class LoadedPipeline:
    path: Path
    source: str
    spec: PipelineSpec
    prompts: dict[str, Any] = field(default_factory=dict)
    """The library prompts its steps name, sent along when it is registered."""


def _expand(paths: list[Path]) -> list[Path]:
    """Files as given; a directory stands for the definitions directly inside it."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES and p.is_file())
            if not found:
                raise BadInput(f"{path}: no .yaml, .yml or .json files in this directory")
            files.extend(found)
        else:
            files.append(path)
    return files


def _load(path: Path, libraries: dict[Path | None, PromptLibrary]) -> LoadedPipeline:
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineInvalid([Problem(file=str(path), message="no such file")]) from None
    except IsADirectoryError:
        raise PipelineInvalid([Problem(file=str(path), message="is a directory")]) from None
    except OSError as exc:
        message = exc.strerror or str(exc)
        raise PipelineInvalid([Problem(file=str(path), message=message)]) from None
    except UnicodeDecodeError:
        message = "not UTF-8 text"
        raise PipelineInvalid([Problem(file=str(path), message=message)]) from None
    library = libraries.get(None)  # --prompts DIR
    if library is None:
        directory = find_prompts_dir(path)
        if directory not in libraries:
            libraries[directory] = PromptLibrary.load(directory)
        library = libraries[directory]
    prompts, problems = library.for_pipeline(source)
    if problems:
        raise PipelineInvalid(problems)
    spec = load_pipeline(source, source=str(path), prompts=prompts)
    return LoadedPipeline(path=path, source=source, spec=spec, prompts=prompts)


def load_files(
    paths: list[Path], *, prompts_dir: Path | None = None
) -> tuple[list[LoadedPipeline], list[Problem]]:
    """Every definition that validates, and every problem of those that do not.

    Library prompts come from ``prompts_dir``, else from the nearest ``prompts/``
    directory at or above each file."""
    if prompts_dir is not None and not prompts_dir.is_dir():
        raise BadInput(f"--prompts {prompts_dir}: not a directory")
    libraries: dict[Path | None, PromptLibrary] = {}
    if prompts_dir is not None:
        libraries[None] = PromptLibrary.load(prompts_dir)
    loaded: list[LoadedPipeline] = []
    problems: list[Problem] = []
    for path in _expand(paths):
        try:
            loaded.append(_load(path, libraries))
        except PipelineInvalid as exc:
            problems.extend(exc.problems)
    return loaded, problems


def _fail_with(problems: list[Problem]) -> None:
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    raise typer.Exit(2)


Files = Annotated[
    list[Path],
    typer.Argument(help="Pipeline definitions (YAML or JSON), or directories of them."),
]
PromptsDir = Annotated[
    Path | None,
    typer.Option(
        "--prompts",
        help="The prompt library for prompt_ref (default: the nearest prompts/ directory "
        "at or above each file).",
    ),
]


@app.command("validate")
@reports_errors
def validate(files: Files, prompts: PromptsDir = None) -> None:
    """Check definitions offline: every problem, naming the file, the step and the field."""
    loaded, problems = load_files(files, prompts_dir=prompts)
    console = make_console()
    for pipeline in loaded:
        count = len(pipeline.spec.steps)
        console.print(
            f"ok  {pipeline.spec.name} ({count} step{'s' if count != 1 else ''})  "
            f"[dim]{pipeline.path}[/dim]"
        )
    if problems:
        _fail_with(problems)


@app.command("apply")
@reports_errors
def apply(files: Files, prompts: PromptsDir = None) -> None:
    """Validate every file, then register each as a new version (nothing is sent if any
    file is invalid; a definition equal to the latest version registers nothing). The
    library prompts a file names are sent with it."""
    loaded, problems = load_files(files, prompts_dir=prompts)
    if problems:
        _fail_with(problems)
    console = make_console()
    with ConveyorClient() as client:
        for pipeline in loaded:
            try:
                result = client.register_pipeline(
                    pipeline.source, filename=str(pipeline.path), prompts=pipeline.prompts
                )
            except (PipelineRejected, ApiUnreachable):
                raise
            except ConveyorError as exc:
                raise ConveyorError(f"{pipeline.path}: {exc}") from None
            state = "[green]created[/green]" if result.get("created") else "[dim]unchanged[/dim]"
            console.print(f"{result.get('name')}  v{result.get('version')}  {state}")


@app.command("list")
@reports_errors
def list_pipelines(
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Registered pipelines and their versions."""
    with ConveyorClient() as client:
        items = client.list_pipelines()
    console = make_console()
    if as_json:
        print_json(console, {"items": items})
    elif not items:
        console.print("no pipelines registered yet: conveyor pipelines apply FILE...")
    else:
        console.print(pipelines_table(items))
