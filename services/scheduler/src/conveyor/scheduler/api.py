"""The control API (default http://127.0.0.1:8701): register pipelines and trigger runs.

Registration is synchronous so that an invalid definition is rejected whole, with every
problem named, before anything is stored or published.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from conveyor.contracts import (
    PIPELINE_NAME,
    CancelRun,
    IdempotencyKey,
    PipelineInvalid,
    ResumeRun,
    RetryRun,
    load_pipeline,
)
from conveyor.scheduler.auto import AutoResolutionFailed
from conveyor.scheduler.registry import (
    RunRequestRejected,
    list_pipelines,
    register_pipeline,
    request_control,
    request_run,
)
from conveyor.scheduler.scheduling import Scheduler

__all__ = ["create_api"]


class PipelineSource(BaseModel):
    source: str = Field(description="The definition, YAML or JSON text")
    filename: str | None = Field(default=None, description="Named in validation errors")
    prompts: dict[str, dict[str, Any]] | None = Field(
        default=None, description="Library prompts the steps name with prompt_ref, by name"
    )


class RegistrationOut(BaseModel):
    name: str
    version: int
    digest: str
    created: bool


def _pipeline_name(value: str) -> str:
    if len(value) > 128 or not re.match(PIPELINE_NAME, value):
        raise ValueError(
            f"{value[:80]!r} is not a pipeline name: lowercase letters, digits, '.', '_' "
            "and '-', as in the definition's name"
        )
    return value


class RunRequest(BaseModel):
    """Unknown fields are refused: ``inputs`` or ``versoin`` silently ignored would start
    a run the caller did not ask for."""

    model_config = ConfigDict(extra="forbid")

    pipeline: Annotated[str, AfterValidator(_pipeline_name)]
    input: dict[str, Any] = Field(default_factory=dict)
    version: int | None = Field(default=None, ge=1, description="default: the latest")
    idempotency_key: IdempotencyKey | None = None
    requested_by: str | None = Field(default=None, max_length=256)


class RunAccepted(BaseModel):
    run_id: UUID
    event_id: UUID | None = None
    pipeline: str
    duplicate: bool = False
    """True when the idempotency key names a run of the current window: no new run."""


class CancelRequest(BaseModel):
    reason: str | None = None
    requested_by: str | None = None


class RetryRequest(BaseModel):
    from_step: str | None = Field(
        default=None, description="default: the first step that failed or was cancelled"
    )
    set: dict[str, Any] = Field(
        default_factory=dict,
        description="edits before the re-run: input.<key> or steps.<step>.with.<key>",
    )
    requested_by: str | None = None


class ControlAccepted(BaseModel):
    run_id: UUID


class VersionOut(BaseModel):
    version: int
    digest: str
    registered_at: datetime


class PipelineOut(BaseModel):
    name: str
    description: str | None = None
    latest_version: int
    versions: list[VersionOut]


class PipelineList(BaseModel):
    items: list[PipelineOut]


_JSON_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number"}


async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 in its usual shape, with messages that say what to send instead of
    "JSON decode error" or "a valid dictionary or object to extract fields from"; a body
    that is not sent as JSON at all is a 415."""
    content_type = request.headers.get("content-type") or "none"
    status = 422
    errors = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        kind = err.get("type")
        msg = str(err.get("msg", "invalid"))
        if kind == "json_invalid":  # FastAPI puts the character offset in the location
            at = f" at character {loc[1]}" if len(loc) > 1 else ""
            loc = ["body"]
            msg = f"the body is not valid JSON{at}: {err.get('ctx', {}).get('error', msg)}"
        elif loc == ["body"] and kind == "missing":
            msg = "the body is empty: send a JSON object"
        elif loc == ["body"] and kind in ("model_attributes_type", "dict_type"):
            if "json" not in content_type:
                status = 415
                msg = (
                    "send the body as JSON, with content-type: application/json "
                    f"(got {content_type})"
                )
            else:
                got = _JSON_NAMES.get(type(err.get("input")), "something else")
                msg = f"the body must be a JSON object, got {got}"
        elif kind == "dict_type":
            got = _JSON_NAMES.get(type(err.get("input")), "something else")
            msg = f"must be a JSON object of name: value, got {got}"
        elif kind == "extra_forbidden":
            msg = f"unknown field {loc[-1]!r}"
        elif kind == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])
        errors.append({"loc": loc, "msg": msg, "type": kind})
    return JSONResponse(status_code=status, content={"detail": errors})


def create_api(scheduler: Scheduler) -> FastAPI:
    api = FastAPI(title="Conveyor control API", version="1")
    api.add_exception_handler(RequestValidationError, request_invalid)  # type: ignore[arg-type]

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/pipelines", response_model=RegistrationOut)
    async def post_pipeline(body: PipelineSource) -> RegistrationOut:
        try:
            source = body.filename or "<request>"
            spec = load_pipeline(body.source, source=source, prompts=body.prompts)
            reg = await register_pipeline(scheduler, spec, source_file=body.filename)
        except PipelineInvalid as exc:
            problems = [p.model_dump() for p in exc.problems]
            raise HTTPException(status_code=422, detail={"problems": problems}) from None
        except AutoResolutionFailed as exc:
            raise HTTPException(status_code=502, detail=str(exc)) from None
        return RegistrationOut(
            name=reg.name, version=reg.version, digest=reg.digest, created=reg.created
        )

    @api.get("/pipelines", response_model=PipelineList)
    async def get_pipelines() -> PipelineList:
        return PipelineList.model_validate({"items": await list_pipelines(scheduler)})

    @api.post("/runs", status_code=202, response_model=RunAccepted)
    async def post_run(body: RunRequest, response: Response) -> RunAccepted:
        try:
            run_id, event_id = await request_run(
                scheduler,
                pipeline=body.pipeline,
                version=body.version,
                run_input=body.input,
                idempotency_key=body.idempotency_key,
                requested_by=body.requested_by,
            )
        except RunRequestRejected as exc:
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None
        if event_id is None:
            response.status_code = 200
        return RunAccepted(
            run_id=run_id, event_id=event_id, pipeline=body.pipeline, duplicate=event_id is None
        )

    @api.post("/runs/{run_id}/cancel", status_code=202, response_model=ControlAccepted)
    async def cancel_run(run_id: UUID, body: CancelRequest | None = None) -> ControlAccepted:
        body = body or CancelRequest()
        event = CancelRun(run_id=run_id, reason=body.reason, requested_by=body.requested_by)
        await _control(run_id, event)
        return ControlAccepted(run_id=run_id)

    @api.post("/runs/{run_id}/retry", status_code=202, response_model=ControlAccepted)
    async def retry_run(run_id: UUID, body: RetryRequest | None = None) -> ControlAccepted:
        body = body or RetryRequest()
        event = RetryRun(
            run_id=run_id, from_step=body.from_step, set=body.set, requested_by=body.requested_by
        )
        await _control(run_id, event)
        return ControlAccepted(run_id=run_id)

    @api.post("/runs/{run_id}/resume", status_code=202, response_model=ControlAccepted)
    async def resume_run(run_id: UUID, body: CancelRequest | None = None) -> ControlAccepted:
        """Go on with a parked run (one over its budget gets another ``max_cost``)."""
        by = body.requested_by if body else None
        await _control(run_id, ResumeRun(run_id=run_id, requested_by=by))
        return ControlAccepted(run_id=run_id)

    async def _control(run_id: UUID, event: CancelRun | RetryRun | ResumeRun) -> None:
        try:
            await request_control(scheduler, run_id=run_id, event=event)
        except RunRequestRejected as exc:
            raise HTTPException(status_code=exc.status, detail=str(exc)) from None

    return api
