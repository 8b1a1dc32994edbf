"""The scheduler's use cases: each turns one inbound event into one transaction that
updates run state and stages the events that follow from it.

The state machine (``domain``) decides; this module loads, saves and translates its
commands into events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contracts import (
    ErrorInfo,
    Event,
    InputInvalid,
    PipelineSpec,
    RunCompleted,
    RunFailed,
    RunQueued,
    RunRequested,
    RunStarted,
    StepCompleted,
    StepFailed,
    StepReady,
    StepRetrying,
    StepScheduled,
    StepSkipped,
    Topics,
    utcnow,
    validate_run_input,
)
from conveyor.runtime import OutboxRelay, Undeliverable
from conveyor.scheduler import domain, tables
from conveyor.scheduler.unit_of_work import SpecCache, UnitOfWork

__all__ = ["Scheduler"]

log = logging.getLogger("conveyor.scheduler")


class Scheduler:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        topics: Topics,
        relay: OutboxRelay | None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.topics = topics
        self.relay = relay
        self.specs = SpecCache()
        self._clock = clock
        self._timer_task: asyncio.Task[None] | None = None
        self._timer_wake = asyncio.Event()

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(engine=self.engine, relay=self.relay, specs=self.specs)

    # --- inbound events ---------------------------------------------------------------

    async def handle(self, event: Event, record: Any = None) -> None:
        if isinstance(event, RunRequested):
            await self.run_requested(event)
        elif isinstance(event, StepCompleted | StepFailed):
            await self.step_result(event)
        # StepStarted / StepProgress are for the recorder; control events come later.

    async def run_requested(self, request: RunRequested) -> None:
        run_id = request.resolved_run_id()
        now = self._clock()
        async with self.unit_of_work() as uow:
            if not await uow.first_delivery(request.event_id):
                return
            if await uow.run_exists(run_id):
                log.info("run %s exists already (request %s)", run_id, request.event_id)
                await uow.commit()
                return
            found = await uow.latest_pipeline(request.pipeline, request.version)
            run_input = request.input
            error: ErrorInfo | None = None
            if found is None:
                which = f" version {request.version}" if request.version else ""
                error = ErrorInfo(
                    type="UnknownPipeline",
                    message=f"no pipeline named {request.pipeline!r}{which} is registered",
                )
                version, spec = 0, None
            else:
                version, _digest, spec = found
                try:
                    run_input = validate_run_input(spec, request.input)
                except InputInvalid as exc:
                    error = ErrorInfo(type="InvalidInput", message=str(exc))
            state = domain.RunState(
                run_id=str(run_id),
                pipeline=request.pipeline,
                version=version,
                input=run_input,
                steps={s.id: domain.StepState() for s in spec.steps} if spec else {},
            )
            key = str(run_id)
            uow.emit(
                self.topics.runs_events,
                RunQueued(
                    run_id=run_id,
                    pipeline=request.pipeline,
                    version=version or None,
                    input=run_input,
                    requested_event_id=request.event_id,
                    idempotency_key=request.idempotency_key,
                    requested_by=request.requested_by,
                    requested_at=request.occurred_at,
                ),
                key=key,
            )
            commands: list[domain.Command] = []
            if error is not None or spec is None:
                assert error is not None
                state.status = "failed"
                state.error = error.model_dump(mode="json")
                commands.append(domain.FailRun(error))
            else:
                uow.emit(
                    self.topics.runs_events,
                    RunStarted(run_id=run_id, pipeline=spec.name, version=version),
                    key=key,
                )
                commands = domain.start_run(spec, state)
            inserted = await uow.insert_run(
                state,
                requested_at=request.occurred_at,
                idempotency_key=request.idempotency_key,
                requested_event_id=request.event_id,
                started_at=now if spec is not None else None,
                finished_at=now if state.status in domain.TERMINAL_RUN else None,
            )
            if not inserted:  # same idempotency key raced in through another partition
                log.info("run %s requested twice; keeping the first", run_id)
                return
            await self._apply(uow, spec, state, commands)
            await uow.commit()

    async def step_result(self, result: StepCompleted | StepFailed) -> None:
        async with self.unit_of_work() as uow:
            if not await uow.first_delivery(result.event_id):
                return
            state = await uow.load_run(result.run_id)
            if state is None:
                raise Undeliverable(
                    f"{result.type} names run {result.run_id}, which does not exist"
                )
            spec = await uow.pipeline_spec(state.pipeline, state.version)
            if spec is None:
                raise Undeliverable(f"run {result.run_id} names an unknown pipeline version")
            if isinstance(result, StepCompleted):
                commands = domain.on_step_completed(
                    spec,
                    state,
                    step_id=result.step_id,
                    attempt=result.attempt,
                    output=result.output,
                )
            else:
                commands = domain.on_step_failed(
                    spec, state, step_id=result.step_id, attempt=result.attempt, error=result.error
                )
            # Saved even when nothing follows: a branch that finishes while its sibling still
            # runs must be seen as done when the sibling's result arrives.
            await self._apply(uow, spec, state, commands)
            await uow.save_run(
                state,
                finished_at=self._clock() if state.status in domain.TERMINAL_RUN else None,
            )
            await uow.commit()

    # --- durable retry timers ---------------------------------------------------------

    async def start_timers(self) -> None:
        self._timer_task = asyncio.create_task(self._timer_loop(), name="retry-timers")

    async def stop_timers(self) -> None:
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task

    async def _timer_loop(self) -> None:
        while True:
            try:
                wait = await self.fire_due_timers()
            except Exception:
                log.exception("retry timers failed; trying again")
                wait = 1.0
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), wait)

    async def fire_due_timers(self, limit: int = 100) -> float:
        """Dispatch the retries that are due; return how long until the next one (capped)."""
        t = tables.timers
        async with self.unit_of_work() as uow:
            due = (
                await uow.conn.execute(
                    select(t)
                    .where(t.c.due_at <= self._clock())
                    .order_by(t.c.due_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for timer in due:
                state = await uow.load_run(timer.run_id)
                spec = await uow.pipeline_spec(state.pipeline, state.version) if state else None
                if state is not None and spec is not None:
                    commands = domain.on_retry_due(
                        spec, state, step_id=timer.step_id, attempt=timer.attempt
                    )
                    await self._apply(uow, spec, state, commands)
                    await uow.save_run(state, finished_at=None)
                await uow.conn.execute(delete(t).where(t.c.id == timer.id))
            next_due = await uow.conn.scalar(select(t.c.due_at).order_by(t.c.due_at).limit(1))
            await uow.commit()
        if len(due) == limit:
            return 0.0
        if next_due is None:
            return 1.0
        return max(0.0, min(1.0, (next_due - self._clock()).total_seconds()))

    # --- commands -> events -----------------------------------------------------------

    async def _apply(
        self,
        uow: UnitOfWork,
        spec: PipelineSpec | None,
        state: domain.RunState,
        commands: list[domain.Command],
    ) -> None:
        run_id = UUID(state.run_id)
        key = state.run_id
        events = self.topics.runs_events
        for command in commands:
            if isinstance(command, domain.DispatchStep):
                assert spec is not None
                step = spec.step(command.step_id)
                uow.emit(
                    events,
                    StepScheduled(
                        run_id=run_id,
                        step_id=step.id,
                        attempt=command.attempt,
                        kind=step.type,
                        config=step.with_,
                    ),
                    key=key,
                )
                # Keyed by run *and* step: steps of one run spread over the partitions, so
                # independent steps really run in parallel on different runners.
                uow.emit(
                    self.topics.ready(step.type),
                    StepReady(
                        run_id=run_id,
                        pipeline=spec.name,
                        version=state.version,
                        step_id=step.id,
                        attempt=command.attempt,
                        kind=step.type,
                        config=step.with_,
                        context=domain.step_context(spec, state, step.id),
                        timeout_s=spec.timeout_of(step.id),
                    ),
                    key=f"{key}/{step.id}",
                )
            elif isinstance(command, domain.SkipStep):
                uow.emit(
                    events,
                    StepSkipped(run_id=run_id, step_id=command.step_id, reason=command.reason),
                    key=key,
                )
            elif isinstance(command, domain.RetryStep):
                due_at = self._clock() + timedelta(seconds=command.delay_s)
                await uow.add_timer(
                    run_id=run_id,
                    step_id=command.step_id,
                    attempt=command.next_attempt,
                    due_at=due_at,
                )
                self._timer_wake.set()
                uow.emit(
                    events,
                    StepRetrying(
                        run_id=run_id,
                        step_id=command.step_id,
                        attempt=command.attempt,
                        next_attempt=command.next_attempt,
                        retry_at=due_at,
                        error=command.error,
                    ),
                    key=key,
                )
            elif isinstance(command, domain.CompleteRun):
                uow.emit(
                    events,
                    RunCompleted(run_id=run_id, output=command.output, status=command.status),  # type: ignore[arg-type]
                    key=key,
                )
            elif isinstance(command, domain.FailRun):
                uow.emit(
                    events,
                    RunFailed(run_id=run_id, error=command.error, step_id=command.step_id),
                    key=key,
                )
