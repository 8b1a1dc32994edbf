"""``conveyor artifacts gc``: the artifacts of deleted runs that no media runner deleted.

A media runner deletes a run's artifacts when it reads RunDeleted, which every runner
reads without a consumer group, from the latest offset: one that was down then never sees
it. This command catches up, and is safe to run at any time (from cron, say): it asks the
run recorder about every run the store has references of, and deletes the references of
the runs it answers 410 Gone for (deleted), then the artifacts nobody references. Runs the
recorder does not know (404: not recorded yet, or its database was reset) are kept.

It reads the artifact store the media service uses, through the same settings
(``CONVEYOR_MEDIA_ARTIFACT_BACKEND``, ``CONVEYOR_MEDIA_ARTIFACT_DIR``,
``CONVEYOR_MEDIA_S3_*``), so run it where the service's directory or bucket is reachable.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated
from uuid import UUID

import typer

from conveyor.cli.client import ConveyorClient
from conveyor.cli.errors import BadInput, ConveyorError
from conveyor.cli.render import reports_errors

if TYPE_CHECKING:
    from conveyor.media.artifacts import ArtifactStore

__all__ = ["app", "collect_garbage", "gc"]

app = typer.Typer(help="The media artifact store.", no_args_is_help=True)


def _store() -> ArtifactStore:
    try:
        from pydantic import ValidationError

        from conveyor.media.artifacts import create_store
        from conveyor.media.settings import MediaSettings
    except ImportError as exc:
        raise ConveyorError(
            f"`conveyor artifacts` needs the media service's package (conveyor-media): {exc}"
        ) from None
    try:
        return create_store(MediaSettings())
    except ValidationError as exc:
        problems = "; ".join(
            f"CONVEYOR_MEDIA_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise BadInput(problems) from None
    except (ValueError, RuntimeError) as exc:
        raise BadInput(str(exc)) from None


def collect_garbage(
    store: ArtifactStore, client: ConveyorClient, *, dry_run: bool = False
) -> tuple[list[UUID], list[UUID], int]:
    """Drop the references of runs the recorder reports deleted: ``(deleted runs, runs it
    does not know, artifacts deleted)``."""
    try:
        runs = asyncio.run(store.run_ids())
    except Exception as exc:
        raise ConveyorError(f"cannot list the runs in {store!r}: {exc}") from None
    gone: list[UUID] = []
    unknown: list[UUID] = []
    for run_id in runs:
        state = client.run_state(str(run_id))
        if state == "deleted":
            gone.append(run_id)
        elif state == "unknown":
            unknown.append(run_id)
    if dry_run or not gone:
        return gone, unknown, 0

    async def delete_all() -> int:
        return sum([await store.delete_run(run_id) for run_id in gone])

    try:
        deleted = asyncio.run(delete_all())
    except Exception as exc:
        raise ConveyorError(f"deleting artifacts in {store!r} failed: {exc}") from None
    return gone, unknown, deleted


@app.command("gc")
@reports_errors
def gc(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say which runs' artifacts would go.")
    ] = False,
) -> None:
    """Delete the artifacts of runs deleted in the run recorder (and of nothing else)."""
    store = _store()
    with ConveyorClient() as client:
        gone, unknown, deleted = collect_garbage(store, client, dry_run=dry_run)
    for run_id in gone:
        typer.echo(f"{'would drop' if dry_run else 'dropped'} the references of run {run_id}")
    if unknown:
        typer.echo(
            f"kept the references of {len(unknown)} run(s) the recorder does not know", err=True
        )
    if dry_run:
        typer.echo(f"{len(gone)} deleted run(s) still reference artifacts in {store!r}")
    else:
        typer.echo(f"{deleted} artifact(s) of {len(gone)} deleted run(s) deleted from {store!r}")
