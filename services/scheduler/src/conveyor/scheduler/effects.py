"""What the state machine's commands mean outside it: events staged in the outbox and
durable timers, all in the caller's transaction."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from uuid import UUID

from conveyor.contracts import (
    CancelRun,
    ErrorInfo,
    PipelineSpec,
    RunCompleted,
    RunFailed,
    RunParked,
    StepCancelled,
    StepCompleted,
    StepFailed,
    StepReady,
    StepRetrying,
    StepSkipped,
    Topics,
)
from conveyor.runtime import OutboxMessage
from conveyor.runtime.guard import MAX_MESSAGE_BYTES
from conveyor.scheduler import domain
from conveyor.scheduler.unit_of_work import UnitOfWork

__all__ = ["Effects"]


class Effects:
    def __init__(
        self,
        *,
        topics: Topics,
        clock: Callable[[], datetime],
        deadline_grace_s: float,
        on_timer: Callable[[], None],
    ) -> None:
        self.topics = topics
        self._clock = clock
        self._grace = deadline_grace_s
        self._on_timer = on_timer

    async def apply(
        self,
        uow: UnitOfWork,
        spec: PipelineSpec | None,
        state: domain.RunState,
        commands: list[domain.Command],
    ) -> None:
        run_id = UUID(state.run_id)
        key = state.run_id
        events = self.topics.runs_events
        cancelled = False
        for command in commands:
            if isinstance(command, domain.DispatchStep):
                assert spec is not None
                await self._dispatch(uow, spec, state, command)
            elif isinstance(command, domain.SkipStep):
                uow.emit(
                    events,
                    StepSkipped(run_id=run_id, step_id=command.step_id, reason=command.reason),
                    key=key,
                )
            elif isinstance(command, domain.RetryStep):
                due_at = self._clock() + timedelta(seconds=command.delay_s)
                await uow.add_timer(
                    kind="retry",
                    run_id=run_id,
                    step_id=command.step_id,
                    attempt=command.next_attempt,
                    item_index=command.item_index,
                    due_at=due_at,
                )
                self._on_timer()
                uow.emit(
                    events,
                    StepRetrying(
                        run_id=run_id,
                        step_id=command.step_id,
                        attempt=command.attempt,
                        next_attempt=command.next_attempt,
                        retry_at=due_at,
                        item_index=command.item_index,
                        error=command.error,
                    ),
                    key=key,
                )
            elif isinstance(command, domain.CompleteStep):
                summary: StepCompleted | StepFailed
                if command.error is None:
                    summary = StepCompleted(
                        run_id=run_id,
                        step_id=command.step_id,
                        attempt=command.attempt,
                        kind=_kind(spec, command.step_id),
                        output=command.output,
                    )
                else:
                    summary = StepFailed(
                        run_id=run_id,
                        step_id=command.step_id,
                        attempt=command.attempt,
                        kind=_kind(spec, command.step_id),
                        error=command.error,
                    )
                uow.emit(events, summary, key=key)
            elif isinstance(command, domain.CancelAttempt):
                cancelled = True
                uow.emit(
                    events,
                    StepCancelled(
                        run_id=run_id,
                        step_id=command.step_id,
                        attempt=command.attempt,
                        item_index=command.item_index,
                        reason=command.reason,
                    ),
                    key=key,
                )
            elif isinstance(command, domain.ParkRun):
                uow.emit(
                    events,
                    RunParked(run_id=run_id, step_id=command.step_id or "", reason=command.reason),
                    key=key,
                )
            elif isinstance(command, domain.CompleteRun):
                uow.emit(
                    events,
                    RunCompleted(
                        run_id=run_id,
                        output=command.output,
                        status="skipped" if command.status == "skipped" else "succeeded",
                    ),
                    key=key,
                )
            elif isinstance(command, domain.FailRun):
                uow.emit(
                    events,
                    RunFailed(run_id=run_id, error=command.error, step_id=command.step_id),
                    key=key,
                )
        if cancelled and state.status != "cancelled":
            # The run ended with work in flight (a step failed, or ended the run on
            # purpose): tell the runners to stop it. A user's cancel reached them already.
            uow.emit(
                self.topics.runs_control,
                CancelRun(run_id=run_id, reason=f"run {state.status}", requested_by="scheduler"),
                key=key,
            )

    async def _dispatch(
        self,
        uow: UnitOfWork,
        spec: PipelineSpec,
        state: domain.RunState,
        command: domain.DispatchStep,
    ) -> None:
        run_id = UUID(state.run_id)
        step = spec.step(command.step_id)
        config = state.config_of(step)
        timeout = spec.timeout_of(step.id)
        # No StepScheduled: the attempt's result (and its StepStarted, if it runs a while)
        # carries the kind and this StepReady's time to the history. It was a second outbox
        # row, produce and recorder write for every step: a fifth of the CPU per step.
        # Keyed by run, step and item: the steps of one run spread over the partitions,
        # so independent steps and fan-out items run in parallel on different runners.
        item_key = "" if command.item_index is None else f"/{command.item_index}"
        ready = StepReady(
            run_id=run_id,
            pipeline=spec.name,
            version=state.version,
            step_id=step.id,
            attempt=command.attempt,
            kind=step.type,
            config=config,
            context=domain.step_context(
                spec, state, step.id, item=command.item, index=command.item_index
            ),
            timeout_s=timeout,
            item_index=command.item_index,
        )
        message = OutboxMessage(
            topic=self.topics.ready(step.type),
            event=ready,
            key=f"{state.run_id}/{step.id}{item_key}",
        )
        if len(message.payload) > MAX_DISPATCH_BYTES:
            # The broker would refuse it, and the relay, which keeps the outbox's order,
            # would retry it forever with every run's events queued behind it. The attempt
            # fails instead, through the same path as a runner's StepFailed.
            failed = _too_large(ready, len(message.payload))
            uow.emit(self.topics.steps_completed, failed, key=state.run_id)
            return
        uow.send(message)  # staged with the payload measured here, not serialized again
        if timeout is not None:
            # The runner enforces the timeout; this deadline catches a runner that vanished
            # (or a broker that lost the message) and dispatches the attempt again.
            await uow.add_timer(
                kind="deadline",
                run_id=run_id,
                step_id=step.id,
                attempt=command.attempt,
                item_index=command.item_index,
                due_at=self._clock() + timedelta(seconds=2 * timeout + self._grace),
            )


def _kind(spec: PipelineSpec | None, step_id: str) -> str | None:
    return spec.step(step_id).type if spec is not None else None


MAX_DISPATCH_BYTES = MAX_MESSAGE_BYTES - (64 << 10)
"""The largest StepReady the scheduler sends: a record's limit, less room for its key and
headers (trace context)."""


def _too_large(ready: StepReady, size: int) -> StepFailed:
    where = ready.step_id if ready.item_index is None else f"{ready.step_id}[{ready.item_index}]"
    return StepFailed(
        **ready.outcome_fields(),
        error=ErrorInfo(
            type="InputTooLarge",
            message=f"step {where!r} was not dispatched: its input (the run's input and the "
            f"outputs it reads) is {size} bytes, over the {MAX_DISPATCH_BYTES}-byte limit of "
            "one message; pass large data by reference (a media artifact or a URL)",
            retryable=False,
            details={"size": size, "limit": MAX_DISPATCH_BYTES},
        ),
    )
