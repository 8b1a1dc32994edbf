"""The scheduler's use cases: each turns one inbound event (or a due timer) into one
transaction that updates run state and stages the events that follow from it.

The state machine (``domain``) decides; this module loads, saves, enforces the idempotency
window and the per-pipeline run queue, and hands commands to ``Effects``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.contracts import (
    CancelRun,
    ErrorInfo,
    Event,
    InputInvalid,
    ResumeRun,
    RetryRun,
    RunCancelled,
    RunDeleted,
    RunQueued,
    RunRequested,
    RunResumed,
    RunRetried,
    RunStarted,
    StepCompleted,
    StepFailed,
    Topics,
    utcnow,
    validate_run_input,
)
from conveyor.runtime import OutboxRelay, Undeliverable
from conveyor.scheduler import domain, tables
from conveyor.scheduler.effects import Effects
from conveyor.scheduler.unit_of_work import (
    SpecCache,
    UnitOfWork,
    prepare_batch,
    shared_transaction,
)

__all__ = ["Scheduler"]

log = logging.getLogger("conveyor.scheduler")

_HANDLED = (RunRequested, StepCompleted, StepFailed, CancelRun, RetryRun, ResumeRun, RunDeleted)
"""What ``handle`` acts on."""


class Scheduler:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        topics: Topics,
        relay: OutboxRelay | None,
        clock: Callable[[], datetime] = utcnow,
        idempotency_window_s: float = 86400.0,
        deadline_grace_s: float = 30.0,
    ) -> None:
        self.engine = engine
        self.topics = topics
        self.relay = relay
        self.specs = SpecCache()
        self.idempotency_window = timedelta(seconds=idempotency_window_s)
        self._clock = clock
        self._timer_task: asyncio.Task[None] | None = None
        self._timer_wake = asyncio.Event()
        self.effects = Effects(
            topics=topics,
            clock=clock,
            deadline_grace_s=deadline_grace_s,
            on_timer=self._timer_wake.set,
        )

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(engine=self.engine, relay=self.relay, specs=self.specs)

    def batch(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """Every unit of work opened inside shares one transaction (see ``unit_of_work``)."""
        return shared_transaction(self.engine, self.relay)

    async def prepare(self, events: list[Event]) -> None:
        """Inside ``batch()``: lock the runs ``events`` name and look up which were seen,
        two queries for the whole batch instead of two per event."""
        handled = [e for e in events if isinstance(e, _HANDLED)]
        if not handled:  # StepStarted, StepProgress: for the recorder; no transaction
            return
        run_ids = [e.run_id for e in handled if not isinstance(e, RunRequested | RunDeleted)]
        requests = [e for e in handled if isinstance(e, RunRequested)]
        await prepare_batch(
            [*run_ids, *(r.resolved_run_id() for r in requests)],
            [e.event_id for e in handled],
            [r.pipeline for r in requests if r.version is None],
        )

    def now(self) -> datetime:
        return self._clock()

    # --- inbound events ---------------------------------------------------------------

    async def handle(self, event: Event, record: Any = None) -> None:
        if not isinstance(event, _HANDLED):
            return  # StepStarted / StepProgress are for the recorder.
        if isinstance(event, RunRequested):
            await self.run_requested(event)
        elif isinstance(event, StepCompleted | StepFailed):
            await self.step_result(event)
        elif isinstance(event, CancelRun):
            await self.cancel(event)
        elif isinstance(event, RetryRun):
            await self.retry(event)
        elif isinstance(event, ResumeRun):
            await self.resume(event)
        elif isinstance(event, RunDeleted):
            await self.forget(event)

    async def run_requested(self, request: RunRequested) -> None:
        run_id = request.resolved_run_id()
        now = self._clock()
        async with self.unit_of_work() as uow:
            if not await uow.first_delivery(request.event_id):
                return
            if await uow.run_exists(run_id):
                await uow.commit()
                return
            if request.idempotency_key is not None:
                holder = await uow.claim_idempotency_key(
                    pipeline=request.pipeline,
                    key=request.idempotency_key,
                    run_id=run_id,
                    now=now,
                    expires_at=now + self.idempotency_window,
                )
                if holder is not None:
                    log.info(
                        "request %s repeats idempotency key %r of run %s: no new run",
                        request.event_id,
                        request.idempotency_key,
                        holder,
                    )
                    await uow.commit()
                    return
            found = await uow.latest_pipeline(request.pipeline, request.version)
            run_input = request.input
            error: ErrorInfo | None = None
            spec = None
            version = 0
            if found is None:
                which = f" version {request.version}" if request.version else ""
                error = ErrorInfo(
                    type="UnknownPipeline",
                    message=f"no pipeline named {request.pipeline!r}{which} is registered",
                )
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
                key=str(run_id),
            )
            commands: list[domain.Command] = []
            starts = False
            if error is not None or spec is None:
                assert error is not None
                state.status = "failed"
                state.error = error.model_dump(mode="json")
                commands.append(domain.FailRun(error))
            elif spec.max_concurrent_runs is None:
                starts = True
            else:
                await uow.lock_pipeline_name(spec.name)
                starts = await uow.active_runs(spec.name) < spec.max_concurrent_runs
            if starts:
                assert spec is not None
                uow.emit(
                    self.topics.runs_events,
                    RunStarted(run_id=run_id, pipeline=spec.name, version=version),
                    key=str(run_id),
                )
                commands = domain.start_run(spec, state)
            await uow.insert_run(
                state,
                requested_at=request.occurred_at,
                idempotency_key=request.idempotency_key,
                requested_event_id=request.event_id,
                started_at=now if starts else None,
                finished_at=now if state.status in domain.TERMINAL_RUN else None,
            )
            await self.effects.apply(uow, spec, state, commands)
            if spec is not None and state.status in domain.TERMINAL_RUN:
                await self._start_queued(uow, spec.name)
            await uow.commit()
        if error is not None:
            # The failed run answers whoever holds its id; the dead letter keeps the request
            # itself for an operator (a typo in a producer, a pipeline not applied yet, an
            # input that does not fit the pipeline).
            raise Undeliverable(error.message)

    async def step_result(self, result: StepCompleted | StepFailed) -> None:
        async with self.unit_of_work() as uow:
            if not await uow.first_delivery(result.event_id):
                return
            state = await uow.load_run(result.run_id)
            if state is None:
                raise Undeliverable(
                    f"{result.type} names run {result.run_id}, which does not exist"
                )
            spec = await self._spec(uow, state)
            if isinstance(result, StepCompleted):
                commands = domain.on_step_completed(
                    spec,
                    state,
                    step_id=result.step_id,
                    attempt=result.attempt,
                    output=result.output,
                    item_index=result.item_index,
                    cost=result.metrics.cost,
                )
            else:
                commands = domain.on_step_failed(
                    spec,
                    state,
                    step_id=result.step_id,
                    attempt=result.attempt,
                    error=result.error,
                    item_index=result.item_index,
                    cost=result.metrics.cost,
                )
            await self._save(uow, spec, state, commands)
            await uow.clear_deadline(
                run_id=result.run_id,
                step_id=result.step_id,
                attempt=result.attempt,
                item_index=result.item_index,
            )
            await uow.commit()

    async def cancel(self, request: CancelRun) -> None:
        async with self.unit_of_work() as uow:
            if not await uow.first_delivery(request.event_id):
                return
            state = await uow.load_run(request.run_id)
            if state is None:
                raise Undeliverable(f"CancelRun names run {request.run_id}, which does not exist")
            if state.status in domain.TERMINAL_RUN:
                log.info("run %s is %s already; cancel ignored", state.run_id, state.status)
                await uow.commit()
                return
            spec = await self._spec(uow, state)
            reason = request.reason or f"cancelled by {request.requested_by or 'a user'}"
            commands = domain.cancel_run(state, reason=reason)
            uow.emit(
                self.topics.runs_events,
                RunCancelled(run_id=request.run_id, reason=reason),
                key=state.run_id,
            )
            await self._save(uow, spec, state, commands)
            await uow.commit()

    async def resume(self, request: ResumeRun) -> None:
        async with self.unit_of_work() as uow:
            if not await uow.first_delivery(request.event_id):
                return
            state = await uow.load_run(request.run_id)
            if state is None:
                raise Undeliverable(f"ResumeRun names run {request.run_id}, which does not exist")
            spec = await self._spec(uow, state)
            try:
                commands = domain.resume_run(spec, state)
            except ValueError as exc:
                log.warning("resume of run %s refused: %s", state.run_id, exc)
                await uow.commit()
                return
            uow.emit(self.topics.runs_events, RunResumed(run_id=request.run_id), key=state.run_id)
            await self._save(uow, spec, state, commands)
            await uow.commit()

    async def retry(self, request: RetryRun) -> None:
        async with self.unit_of_work() as uow:
            if not await uow.first_delivery(request.event_id):
                return
            state = await uow.load_run(request.run_id)
            if state is None:
                raise Undeliverable(f"RetryRun names run {request.run_id}, which does not exist")
            spec = await self._spec(uow, state)
            try:
                from_step, commands = domain.retry_run(
                    spec, state, from_step=request.from_step, edits=request.set
                )
            except ValueError as exc:
                log.warning("retry of run %s refused: %s", state.run_id, exc)
                await uow.commit()
                return
            uow.emit(
                self.topics.runs_events,
                RunRetried(
                    run_id=request.run_id,
                    from_step=from_step,
                    set=request.set,
                    input=state.input,
                    requested_by=request.requested_by,
                ),
                key=state.run_id,
            )
            await self._save(uow, spec, state, commands)
            await uow.commit()

    async def forget(self, request: RunDeleted) -> None:
        """The recorder deleted the run's history: its state goes too, so that a retry of
        it is refused as naming no run rather than reopening a run nobody can see. A run
        that is not over here (retried since the recorder saw it end) is kept."""
        async with self.unit_of_work() as uow:
            if not await uow.first_delivery(request.event_id):
                return
            state = await uow.load_run(request.run_id)
            if state is not None and state.status not in domain.TERMINAL_RUN:
                log.warning("run %s was deleted while %s; it is kept", state.run_id, state.status)
            elif state is not None:
                conn = await uow.connection()
                for table, column in (
                    (tables.timers, tables.timers.c.run_id),
                    (tables.idempotency_keys, tables.idempotency_keys.c.run_id),
                    (tables.runs, tables.runs.c.id),
                ):
                    await conn.execute(delete(table).where(column == request.run_id))
                uow.forget_run(request.run_id)
            await uow.commit()

    # --- durable timers: retries and deadlines ----------------------------------------

    async def start_timers(self) -> None:
        self._timer_task = asyncio.create_task(self._timer_loop(), name="scheduler-timers")

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
                log.exception("timers failed; trying again")
                wait = 1.0
            self._timer_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timer_wake.wait(), wait)

    async def fire_due_timers(self, limit: int = 100) -> float:
        """Fire the timers that are due; return how long until the next one (capped)."""
        t = tables.timers
        async with self.unit_of_work() as uow:
            conn = await uow.connection()
            due = (
                await conn.execute(
                    select(t)
                    .where(t.c.due_at <= self._clock())
                    .order_by(t.c.due_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for timer in due:
                state = await uow.load_run(timer.run_id)
                if state is not None and state.status not in domain.TERMINAL_RUN:
                    spec = await self._spec(uow, state)
                    fire = domain.on_retry_due if timer.kind == "retry" else domain.on_deadline
                    commands = fire(
                        spec,
                        state,
                        step_id=timer.step_id,
                        attempt=timer.attempt,
                        item_index=timer.item_index,
                    )
                    if commands:
                        await self._save(uow, spec, state, commands)
                await conn.execute(delete(t).where(t.c.id == timer.id))
            conn = await uow.connection()  # the timers just added count too
            next_due = await conn.scalar(select(t.c.due_at).order_by(t.c.due_at).limit(1))
            await uow.commit()
        if len(due) == limit:
            return 0.0
        if next_due is None:
            return 1.0
        until_next: float = (next_due - self._clock()).total_seconds()
        return max(0.0, min(1.0, until_next))

    # --- shared -----------------------------------------------------------------------

    async def _spec(self, uow: UnitOfWork, state: domain.RunState) -> Any:
        spec = await uow.pipeline_spec(state.pipeline, state.version)
        if spec is None:
            raise Undeliverable(f"run {state.run_id} names an unknown pipeline version")
        return spec

    async def _save(
        self,
        uow: UnitOfWork,
        spec: Any,
        state: domain.RunState,
        commands: list[domain.Command],
    ) -> None:
        """Apply ``commands`` and save the state, even when nothing follows: a branch that
        finishes while its sibling still runs must be seen as done when the sibling's
        result arrives. A run that just ended frees its slot for a queued one."""
        await self.effects.apply(uow, spec, state, commands)
        ended = state.status in domain.TERMINAL_RUN
        await uow.save_run(state, finished_at=self._clock() if ended else None)
        if ended and spec.max_concurrent_runs is not None:
            await self._start_queued(uow, spec.name)

    async def _start_queued(self, uow: UnitOfWork, pipeline: str) -> None:
        """Start queued runs of ``pipeline``, oldest first, while slots are free."""
        await uow.lock_pipeline_name(pipeline)
        while True:
            latest = await uow.latest_pipeline(pipeline)
            limit = latest[2].max_concurrent_runs if latest else None
            if limit is not None and await uow.active_runs(pipeline) >= limit:
                return
            run_id = await uow.oldest_queued(pipeline)
            if run_id is None:
                return
            state = await uow.load_run(run_id)
            assert state is not None
            spec = await self._spec(uow, state)
            uow.emit(
                self.topics.runs_events,
                RunStarted(run_id=run_id, pipeline=spec.name, version=state.version),
                key=state.run_id,
            )
            commands = domain.start_run(spec, state)
            await self.effects.apply(uow, spec, state, commands)
            ended = state.status in domain.TERMINAL_RUN
            await uow.save_run(
                state, started_at=self._clock(), finished_at=self._clock() if ended else None
            )
