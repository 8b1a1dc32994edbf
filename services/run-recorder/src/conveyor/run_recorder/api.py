"""The recorder's HTTP API: run history, events, errors, dead letters and pipelines.

Served in the recorder's own process, next to its consumer, from the same engine. Every
request reads on one pooled connection; only ``DELETE /runs/{id}`` writes (see
``deletion``). A deleted run answers 410 Gone, an unknown one 404.
"""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any
from uuid import UUID

from fastapi import Depends, FastAPI, HTTPException, Query
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.contracts import RunDeleted, utcnow
from conveyor.run_recorder import deletion, queries
from conveyor.run_recorder.schemas import (
    DeadLetterPage,
    ErrorPage,
    ErrorScope,
    EventPage,
    Health,
    PipelineHealth,
    PipelinePage,
    RunDeletion,
    RunDetail,
    RunPage,
    RunStatus,
)

__all__ = ["create_api"]

log = logging.getLogger("conveyor.run_recorder.api")

Limit = Annotated[int, Query(ge=1, le=500, description="at most 500")]
_UNKNOWN_RUN: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown run"},
    410: {"description": "deleted run"},
}


def create_api(
    engine: AsyncEngine,
    *,
    announce: Callable[[RunDeleted], Awaitable[None]] | None = None,
) -> FastAPI:
    """The FastAPI app over ``engine``; its lifetime (and disposal) is the caller's.
    ``announce`` publishes the RunDeleted of a deletion (on ``runs.control``)."""
    api = FastAPI(
        title="Conveyor run recorder",
        version="1",
        description="Run history, step attempts, errors and dead letters of Conveyor.",
    )

    async def connection() -> AsyncIterator[AsyncConnection]:
        async with engine.connect() as conn:
            yield conn

    Conn = Annotated[AsyncConnection, Depends(connection)]

    @api.get("/healthz", tags=["meta"])
    async def healthz() -> Health:
        return Health()

    @api.get("/runs", tags=["runs"])
    async def list_runs(
        conn: Conn,
        pipeline: str | None = None,
        status: RunStatus | None = None,
        limit: Limit = 50,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    ) -> RunPage:
        """Runs, newest first."""
        try:
            return await queries.list_runs(
                conn, pipeline=pipeline, status=status, limit=limit, cursor=cursor
            )
        except queries.InvalidCursor as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None

    async def not_found(conn: AsyncConnection, run_id: UUID) -> HTTPException:
        gone = await deletion.deleted(conn, run_id)
        if gone is not None:
            by = f" by {gone[1]}" if gone[1] else ""
            return HTTPException(
                status_code=410, detail=f"run {run_id} was deleted at {gone[0].isoformat()}{by}"
            )
        return HTTPException(status_code=404, detail=f"run {run_id} not found")

    @api.get("/runs/{run_id}", tags=["runs"], responses=_UNKNOWN_RUN)
    async def get_run(conn: Conn, run_id: UUID) -> RunDetail:
        """One run with every step attempt, in the order they were scheduled."""
        run = await queries.get_run(conn, run_id)
        if run is None:
            raise await not_found(conn, run_id)
        return run

    @api.delete(
        "/runs/{run_id}",
        tags=["runs"],
        responses={
            404: {"description": "unknown run"},
            409: {"description": "the run has not ended: cancel it first"},
            503: {"description": "deleted, but RunDeleted was not published: delete again"},
        },
    )
    async def delete_run(
        run_id: UUID,
        requested_by: Annotated[str | None, Query(description="who asks; kept")] = None,
    ) -> RunDeletion:
        """Delete an ended run's history; its scheduler state and artifacts follow through
        RunDeleted. Deleting a deleted run publishes RunDeleted again (for a media runner
        that missed it) and answers with ``already_deleted``."""
        async with engine.begin() as conn:
            done = await deletion.delete_run(conn, run_id, now=utcnow(), deleted_by=requested_by)
        if done.outcome == "not_found":
            raise HTTPException(status_code=404, detail=f"run {run_id} not found")
        if done.outcome == "not_ended":
            raise HTTPException(
                status_code=409,
                detail=f"run {run_id} is {done.status}: only an ended run can be deleted "
                "(cancel it first)",
            )
        assert done.deleted_at is not None
        if announce is not None:
            try:
                await announce(RunDeleted(run_id=run_id, requested_by=requested_by))
            except Exception as exc:
                log.warning("RunDeleted of run %s not published: %r", run_id, exc)
                raise HTTPException(
                    status_code=503,
                    detail=f"run {run_id} was deleted, but RunDeleted could not be published "
                    f"({type(exc).__name__}): delete it again so that its artifacts go too",
                ) from None
        return RunDeletion(
            run_id=run_id,
            deleted_at=done.deleted_at,
            deleted_by=done.deleted_by,
            already_deleted=done.outcome == "already_deleted",
        )

    @api.get("/runs/{run_id}/events", tags=["runs"], responses=_UNKNOWN_RUN)
    async def run_events(conn: Conn, run_id: UUID) -> EventPage:
        """The run's raw events, in the order they happened."""
        events = await queries.run_events(conn, run_id)
        if events is None:
            raise await not_found(conn, run_id)
        return EventPage(items=events)

    @api.get("/errors", tags=["errors"])
    async def list_errors(
        conn: Conn,
        pipeline: str | None = None,
        run_id: UUID | None = None,
        scope: ErrorScope | None = None,
        limit: Limit = 50,
    ) -> ErrorPage:
        """Step failures, run failures and dead letters, newest first."""
        items = await queries.list_errors(
            conn, pipeline=pipeline, run_id=run_id, scope=scope, limit=limit
        )
        return ErrorPage(items=items)

    @api.get("/dead-letters", tags=["errors"])
    async def list_dead_letters(conn: Conn, limit: Limit = 50) -> DeadLetterPage:
        """Messages some consumer could not decode or process, newest first."""
        return DeadLetterPage(items=await queries.list_dead_letters(conn, limit=limit))

    @api.get("/pipelines", tags=["pipelines"])
    async def list_pipelines(conn: Conn) -> PipelinePage:
        """Every registered version of every pipeline."""
        return PipelinePage(items=await queries.list_pipelines(conn))

    @api.get(
        "/pipelines/{name}/health",
        tags=["pipelines"],
        responses={404: {"description": "unknown pipeline"}},
    )
    async def pipeline_health(
        conn: Conn,
        name: str,
        window: Annotated[int, Query(ge=1, le=10_000, description="newest runs to cover")] = 100,
    ) -> PipelineHealth:
        """Success rate, durations and usage over the pipeline's newest runs."""
        health = await queries.pipeline_health(conn, name, window=window)
        if health is None:
            raise HTTPException(status_code=404, detail=f"pipeline {name} not found")
        return health

    return api
