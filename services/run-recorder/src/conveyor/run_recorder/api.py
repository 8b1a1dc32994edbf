"""The recorder's HTTP API: run history, events, errors, dead letters and pipelines.

Served in the recorder's own process, next to its consumer, from the same engine. Every
request reads on one pooled connection; nothing here writes.
"""

from collections.abc import AsyncIterator
from typing import Annotated
from uuid import UUID

from fastapi import Depends, FastAPI, HTTPException, Query
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.run_recorder import queries
from conveyor.run_recorder.schemas import (
    DeadLetterPage,
    ErrorPage,
    ErrorScope,
    EventPage,
    Health,
    PipelineHealth,
    PipelinePage,
    RunDetail,
    RunPage,
    RunStatus,
)

__all__ = ["create_api"]

Limit = Annotated[int, Query(ge=1, le=500, description="at most 500")]


def create_api(engine: AsyncEngine) -> FastAPI:
    """The FastAPI app over ``engine``; its lifetime (and disposal) is the caller's."""
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

    @api.get("/runs/{run_id}", tags=["runs"], responses={404: {"description": "unknown run"}})
    async def get_run(conn: Conn, run_id: UUID) -> RunDetail:
        """One run with every step attempt, in the order they were scheduled."""
        run = await queries.get_run(conn, run_id)
        if run is None:
            raise HTTPException(status_code=404, detail=f"run {run_id} not found")
        return run

    @api.get(
        "/runs/{run_id}/events", tags=["runs"], responses={404: {"description": "unknown run"}}
    )
    async def run_events(conn: Conn, run_id: UUID) -> EventPage:
        """The run's raw events, in the order they happened."""
        events = await queries.run_events(conn, run_id)
        if events is None:
            raise HTTPException(status_code=404, detail=f"run {run_id} not found")
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
