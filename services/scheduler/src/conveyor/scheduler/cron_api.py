"""Control API routes for cron schedules: list them, pause and unpause one.

Included in the control API with ``api.include_router(cron_router(scheduler))``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from conveyor.scheduler.cron import CronRunner, list_schedules, set_paused
from conveyor.scheduler.scheduling import Scheduler

__all__ = ["ScheduleChange", "ScheduleList", "ScheduleOut", "cron_router"]


class ScheduleChange(BaseModel):
    by: str | None = Field(default=None, description="Who asked, recorded on ScheduleUpdated")


class ScheduleOut(BaseModel):
    pipeline: str
    cron: str
    timezone: str
    catch_up: Literal["skip", "once"]
    paused: bool
    next_fire_at: datetime
    last_fired_at: datetime | None


class ScheduleList(BaseModel):
    items: list[ScheduleOut]


def cron_router(scheduler: Scheduler, *, runner: CronRunner | None = None) -> APIRouter:
    """``runner``, when given, is woken on unpause so the next tick is not waited for."""
    router = APIRouter(tags=["schedules"])

    async def change(name: str, body: ScheduleChange | None, *, paused: bool) -> ScheduleOut:
        item = await set_paused(scheduler, name, paused=paused, by=body.by if body else None)
        if item is None:
            raise HTTPException(status_code=404, detail=f"pipeline {name!r} has no schedule")
        if runner is not None and not paused:
            runner.wake()
        return ScheduleOut.model_validate(item)

    @router.get("/schedules", response_model=ScheduleList)
    async def get_schedules() -> ScheduleList:
        return ScheduleList.model_validate({"items": await list_schedules(scheduler)})

    @router.post("/pipelines/{name}/pause", response_model=ScheduleOut)
    async def pause(name: str, body: ScheduleChange | None = None) -> ScheduleOut:
        """Stop firing until unpaused. Pausing a paused schedule changes nothing."""
        return await change(name, body, paused=True)

    @router.post("/pipelines/{name}/unpause", response_model=ScheduleOut)
    async def unpause(name: str, body: ScheduleChange | None = None) -> ScheduleOut:
        """Fire again from the first tick after now; the paused period is not caught up."""
        return await change(name, body, paused=False)

    return router
