"""Use cases behind the control API: register a pipeline version, request a run.

Both go through the outbox, so what the API acknowledged is durably on its way to the
broker even if the process dies right after answering.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from pydantic import ValidationError
from sqlalchemy import select

from conveyor.contracts import (
    CancelRun,
    InputInvalid,
    PipelineRegistered,
    PipelineSpec,
    ResumeRun,
    RetryRun,
    RunRequested,
    validate_run_input,
)
from conveyor.scheduler import domain, tables
from conveyor.scheduler.auto import resolve_auto
from conveyor.scheduler.cron import sync_schedule
from conveyor.scheduler.scheduling import Scheduler

__all__ = [
    "Registration",
    "RunRequestRejected",
    "list_pipelines",
    "register_pipeline",
    "request_run",
]


@dataclass(frozen=True)
class Registration:
    name: str
    version: int
    digest: str
    created: bool
    registered_at: datetime | None


class RunRequestRejected(ValueError):
    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


async def register_pipeline(
    scheduler: Scheduler, spec: PipelineSpec, *, source_file: str | None
) -> Registration:
    """A new immutable version when the definition differs from the latest one.

    ``<AUTO>`` asks are answered by a model only for a new version (the digest is the
    definition's, before the answers), so re-applying a file never asks again."""
    digest = spec.digest()
    async with scheduler.unit_of_work() as uow:
        await uow.lock_pipeline_name(spec.name)
        latest = await uow.latest_pipeline(spec.name)
        if latest is not None and latest[1] == digest:
            return Registration(spec.name, latest[0], digest, created=False, registered_at=None)
        version = latest[0] + 1 if latest else 1
        spec = await resolve_auto(spec, source_file=source_file)
        registered_at = await uow.add_pipeline(
            spec, version=version, digest=digest, source_file=source_file
        )
        await sync_schedule(uow.conn, spec, now=scheduler.now())
        uow.emit(
            scheduler.topics.pipelines,
            PipelineRegistered(
                name=spec.name,
                version=version,
                digest=digest,
                spec=spec.canonical(),
                source_file=source_file,
            ),
            key=spec.name,
        )
        await uow.commit()
    return Registration(spec.name, version, digest, created=True, registered_at=registered_at)


async def request_run(
    scheduler: Scheduler,
    *,
    pipeline: str,
    run_input: dict[str, Any],
    version: int | None = None,
    idempotency_key: str | None = None,
    requested_by: str | None = None,
) -> tuple[UUID, UUID | None]:
    """Check the request up front (clear errors for the caller), then publish RunRequested
    like any other producer would. Returns (run_id, event_id); event_id is None when the
    idempotency key names a run of the current window (that run's id is returned).
    ``version`` pins the run to that version; default: the latest."""
    async with scheduler.unit_of_work() as uow:
        found = await uow.latest_pipeline(pipeline, version)
        if found is None and version is not None:
            latest = await uow.latest_pipeline(pipeline)
            if latest is not None:
                raise RunRequestRejected(
                    f"pipeline {pipeline!r} has no version {version} (latest: {latest[0]})",
                    status=404,
                )
        if found is None:
            raise RunRequestRejected(f"no pipeline named {pipeline!r} is registered", status=404)
        if idempotency_key is not None:
            existing = await uow.live_idempotency_key(
                pipeline=pipeline, key=idempotency_key, now=scheduler.now()
            )
            if existing is not None:
                return existing, None
        try:
            validate_run_input(found[2], run_input)
        except InputInvalid as exc:
            raise RunRequestRejected(str(exc), status=422) from None
        try:
            request = RunRequested(
                event_id=uuid4(),
                pipeline=pipeline,
                version=version,
                input=run_input,
                idempotency_key=idempotency_key,
                requested_by=requested_by,
            )
        except ValidationError as exc:  # what the topic would dead-letter
            message = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            )
            raise RunRequestRejected(message, status=422) from None
        uow.emit(scheduler.topics.runs_requested, request, key=idempotency_key or pipeline)
        await uow.commit()
    return request.resolved_run_id(), request.event_id


async def list_pipelines(scheduler: Scheduler) -> list[dict[str, Any]]:
    p = tables.pipelines
    async with scheduler.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(p.c.name, p.c.version, p.c.digest, p.c.registered_at, p.c.spec).order_by(
                    p.c.name, p.c.version
                )
            )
        ).all()
    items: dict[str, dict[str, Any]] = {}
    for row in rows:
        item = items.setdefault(row.name, {"name": row.name, "versions": []})
        item["description"] = row.spec.get("description")
        item["latest_version"] = row.version
        item["versions"].append(
            {"version": row.version, "digest": row.digest, "registered_at": row.registered_at}
        )
    return list(items.values())


async def request_control(
    scheduler: Scheduler, *, run_id: UUID, event: CancelRun | RetryRun | ResumeRun
) -> None:
    """Check a cancel or retry against the run's state (clear errors for the caller), then
    publish it on the control topic; the scheduler applies it from there."""
    async with scheduler.unit_of_work() as uow:
        state = await uow.load_run(run_id)
        if state is None:
            raise RunRequestRejected(f"run {run_id} not found", status=404)
        if isinstance(event, CancelRun) and state.status in domain.TERMINAL_RUN:
            raise RunRequestRejected(f"run {run_id} is already {state.status}", status=409)
        if isinstance(event, ResumeRun) and state.status != "parked":
            raise RunRequestRejected(f"run {run_id} is {state.status}, not parked", status=409)
        if isinstance(event, RetryRun):
            if state.status not in domain.TERMINAL_RUN:
                raise RunRequestRejected(
                    f"run {run_id} is still {state.status}; cancel it or wait", status=409
                )
            spec = await uow.pipeline_spec(state.pipeline, state.version)
            assert spec is not None
            try:  # a dry run on a copy: nothing is saved here
                domain.retry_run(
                    spec, copy.deepcopy(state), from_step=event.from_step, edits=event.set
                )
            except ValueError as exc:
                raise RunRequestRejected(str(exc), status=422) from None
        uow.emit(scheduler.topics.runs_control, event, key=str(run_id))
        await uow.commit()
