"""Several steps at once in one runner process, with at-least-once delivery kept.

FastStream hands the runner's subscriber one message at a time. The handler decodes it
(dead-lettering what cannot be), waits for a free slot (a busy runner stops taking
messages: backpressure), starts the step as a task and returns for the next message. The
task publishes StepStarted, runs the step and publishes its result; once the broker has
acknowledged the result the message counts as finished, and each partition's offset is
committed up to its first unfinished message, never past it (``_offsets``).

- Rebalance: steps of revoked partitions get a moment (half the rebalance timeout) to
  finish, then the finished prefix is committed while the partitions are still ours, so
  their next owner does not run those steps again; steps still running run on. A message
  delivered again while its step still runs here (the partition came back) joins that
  step instead of running twice.
- Cancellation: every runner reads ``runs.control`` without a consumer group (all
  partitions, from the latest offset, nothing committed). A CancelRun cancels the run's
  running steps, which publish StepFailed "Cancelled"; a step of that run taken later fails
  the same way without running (until a RetryRun or ResumeRun of the run). A service's
  ``on_control`` hooks see every control event too (media deletes a RunDeleted's artifacts).
- Graceful stop (``drain``, an ``on_shutdown`` hook, so before the broker stops): no new
  messages; running steps get ``drain_seconds`` to finish; what finished is committed;
  steps still running then are cancelled, publish nothing and are not committed, so the
  group delivers them to another runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, MessageSizeTooLargeError
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from conveyor.contracts import (
    CancelRun,
    Event,
    EventDecodeError,
    ResumeRun,
    RetryRun,
    StepReady,
)
from conveyor.runtime._offsets import OffsetSlot, OffsetTracker
from conveyor.runtime.guard import ConsumerGuard, is_transient

if TYPE_CHECKING:
    from faststream.kafka.message import KafkaMessage

    from conveyor.runtime.runner import StepHarness

__all__ = ["RunnerSettings", "StepControl", "StepDispatcher"]

log = logging.getLogger("conveyor.runtime.runner")

_CANCELLED_RUNS_KEPT = 10_000
_COMMIT_TIMEOUT_S = 5.0


class RunnerSettings(BaseSettings):
    """``CONVEYOR_RUNNER_*``: how one runner process shares itself between steps."""

    model_config = SettingsConfigDict(env_prefix="CONVEYOR_RUNNER_", extra="ignore")

    concurrency: int = Field(default=8, ge=1)
    """Steps one process runs at once; 1 runs them one after another."""
    announce_after_ms: int = Field(default=200, ge=0)
    """A step announces itself (StepStarted, for the history) once it has run this long;
    a quicker step's result says when it started. 0: every step, at once."""
    drain_seconds: float = Field(default=20.0, ge=0)
    """On SIGTERM, how long running steps may take to finish; those still running then
    are cancelled and left, uncommitted, to another runner."""


class StepControl:
    """The dispatcher's hold on one step: the harness reads whether the step's run was
    cancelled and says while the executor runs (only then does a cancel interrupt it)."""

    __slots__ = ("cancel_reason", "cancelled", "cancelled_by", "executing")

    def __init__(self) -> None:
        self.cancelled = False
        self.cancel_reason: str | None = None
        self.cancelled_by: str | None = None
        self.executing = False


class _Job(StepControl):
    __slots__ = ("coordinates", "event", "record", "slots", "started_at", "task")

    def __init__(self, event: StepReady, record: Any, slot: OffsetSlot) -> None:
        super().__init__()
        self.event = event
        self.record = record
        self.coordinates: tuple[str, int, int] = (record.topic, record.partition, record.offset)
        self.slots = [slot]
        self.started_at: datetime | None = None
        self.task: asyncio.Task[None] | None = None

    def cancel(self, request: CancelRun) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.cancel_reason = request.reason
        self.cancelled_by = request.requested_by
        if self.executing and self.task is not None:
            self.task.cancel()


class StepDispatcher:
    """Takes StepReady messages from the subscriber and runs up to ``concurrency`` steps."""

    def __init__(
        self,
        *,
        harness: StepHarness,
        guard: ConsumerGuard,
        settings: RunnerSettings | None = None,
        on_control: Sequence[Callable[[Event], Awaitable[None]]] = (),
    ) -> None:
        settings = settings or RunnerSettings()
        self.harness = harness
        self._on_control = tuple(on_control)
        self.concurrency = settings.concurrency
        self.drain_seconds = settings.drain_seconds
        self.listener = _RebalanceListener(self)
        self._guard = guard
        self._tracker = OffsetTracker()
        self._jobs: set[_Job] = set()
        self._by_record: dict[tuple[str, int, int], _Job] = {}
        self._runs: dict[UUID, set[_Job]] = {}
        self._cancelled_runs: OrderedDict[UUID, CancelRun] = OrderedDict()
        self._slot_free = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._subscriber: Any = None
        self._rebalance_wait_s = 0.0
        self._commit_wanted = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._committer: asyncio.Task[None] | None = None

    def bind(self, subscriber: Any, *, rebalance_wait_s: float = 0.0) -> None:
        """The FastStream subscriber whose consumer commits (and pauses) for us, and how
        long a rebalance may wait for steps of revoked partitions (well inside the group's
        rebalance timeout, or the group goes on without this member)."""
        self._subscriber = subscriber
        self._rebalance_wait_s = rebalance_wait_s

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        consumer = getattr(self._subscriber, "consumer", None)
        # The in-memory TestKafkaBroker has none: nothing to commit to.
        return consumer if isinstance(consumer, AIOKafkaConsumer) else None

    @property
    def running(self) -> int:
        """Steps running now."""
        return len(self._jobs)

    async def idle(self) -> None:
        """Wait until no step runs (tests use it; ``drain`` is for stopping)."""
        await self._idle.wait()

    # --- taking messages ---------------------------------------------------------------

    async def submit_batch(self, records: Sequence[Any]) -> None:
        """The subscriber's handler: what one poll returned, in order, each record in its
        own span (the step's task inherits it, so its result continues the run's trace).
        Returns once every step started; a busy runner waits here for free slots."""
        for record in records:
            if self._closing:
                return  # neither taken nor committed: the group delivers them again
            with self._guard.span(record):
                await self._take(record)

    async def _take(self, record: Any) -> None:
        """Take one StepReady record; returns once its step started."""
        tp = TopicPartition(record.topic, record.partition)
        try:
            event = cast(StepReady, self._guard.decode(record))
        except EventDecodeError as exc:
            log.warning(
                "dead-lettering %s[%s]@%s: %s", record.topic, record.partition, record.offset, exc
            )
            slot = self._tracker.begin(tp, record.offset)
            await self._dead_letter(record, str(exc))
            self._finish((slot,))
            return
        running = self._by_record.get((record.topic, record.partition, record.offset))
        if running is not None and running.event.event_id == event.event_id:
            # Delivered again (the partition came back after a rebalance) while its step
            # still runs here: the running step's result finishes this delivery too.
            running.slots.append(self._tracker.begin(tp, record.offset))
            return
        if len(self._jobs) >= self.concurrency:
            while len(self._jobs) >= self.concurrency:
                self._slot_free.clear()
                await self._slot_free.wait()
                if self._closing:
                    return
            consumer = self.consumer
            if consumer is not None and tp not in consumer.assignment():
                return  # revoked while it waited: its new owner delivers it again
        job = _Job(event, record, self._tracker.begin(tp, record.offset))
        cancelled = self._cancelled_runs.get(event.run_id)
        if cancelled is not None:
            job.cancel(cancelled)  # fails as Cancelled without running
        self._jobs.add(job)
        self._by_record[job.coordinates] = job
        self._runs.setdefault(event.run_id, set()).add(job)
        self._idle.clear()
        job.task = task = asyncio.create_task(
            self._run(job), name=f"step {event.run_id}/{event.step_id}#{event.attempt}"
        )
        task.add_done_callback(partial(self._forget, job))

    async def _run(self, job: _Job) -> None:
        harness, event = self.harness, job.event
        try:
            announcement = None
            if not job.cancelled:  # a step of a run cancelled before it came never starts
                announcement = await harness.start(event)
                job.started_at = announcement.started_at
            try:
                result = await harness.run_step(event, started_at=job.started_at, control=job)
            finally:
                if announcement is not None:
                    announcement.settle()
            await self._publish(job, result)
        except Exception as exc:
            # Not the step's failure (that is data) but the runner's: park the message.
            log.exception("step %s/%s failed outside its executor", event.run_id, event.step_id)
            try:
                await self._dead_letter(job.record, f"runner error: {type(exc).__name__}: {exc}")
            except Exception:
                log.exception("cannot dead-letter %s; it stays uncommitted", job.coordinates)
                return
        self._finish(job.slots)

    async def _publish(self, job: _Job, result: bytes) -> None:
        """Publish until the broker acknowledges: the offset must not move before that."""
        delay = 0.2
        while True:
            try:
                await self.harness.publish_result(job.event, result)
                return
            except MessageSizeTooLargeError:
                result = self.harness.oversized(
                    job.event, size=len(result), started_at=job.started_at
                )
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("publishing a result failed, again in %.1fs: %r", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _dead_letter(self, record: Any, reason: str) -> None:
        delay = 0.2
        while True:
            try:
                await self._guard.dead_letter(record, reason)
                return
            except Exception as exc:
                if not is_transient(exc) or self._closing:
                    raise
                log.warning("dead-lettering failed, again in %.1fs: %r", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _forget(self, job: _Job, _: object = None) -> None:
        self._jobs.discard(job)
        if self._by_record.get(job.coordinates) is job:
            del self._by_record[job.coordinates]
        run = self._runs.get(job.event.run_id)
        if run is not None:
            run.discard(job)
            if not run:
                del self._runs[job.event.run_id]
        self._slot_free.set()
        if not self._jobs:
            self._idle.set()

    # --- committing ----------------------------------------------------------------------

    def _finish(self, slots: Iterable[OffsetSlot]) -> None:
        advanced = False
        for slot in slots:
            advanced = self._tracker.finish(slot) or advanced
        if not advanced:
            return
        if self.consumer is None:
            self._tracker.take_commits()
            return
        self._commit_wanted.set()
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_loop(), name="offset-committer")

    async def _commit_loop(self) -> None:
        # One commit in flight at a time; finishes meanwhile are merged into the next one.
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            await self._commit(self._tracker.take_commits())

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        consumer = self.consumer
        if not offsets or consumer is None:
            return
        async with self._commit_lock:
            try:
                async with asyncio.timeout(_COMMIT_TIMEOUT_S):
                    await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # Revoked or rebalancing: the partition's next owner delivers again what
                # was not committed, and results are deduplicated per (run, step, attempt).
                log.info("offsets %s not committed: %r", _describe(offsets), exc)
            except Exception as exc:  # the broker unreachable: a later commit covers these
                log.warning("offsets %s not committed: %r", _describe(offsets), exc)

    # --- rebalance -----------------------------------------------------------------------

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        moving = [job.task for job in self._jobs if job.task and _tp(job) in revoked]
        if moving and self._rebalance_wait_s > 0:
            # A step that finishes now is committed below, so the partition's next owner
            # does not run it a second time.
            log.info(
                "rebalance: waiting up to %gs for %d step(s) of revoked partitions",
                self._rebalance_wait_s,
                len(moving),
            )
            await asyncio.wait(moving, timeout=self._rebalance_wait_s)
        await self._commit(self._tracker.revoke(revoked))
        still = sum(1 for job in self._jobs if _tp(job) in revoked)
        if still:
            log.info("rebalance: %d step(s) of revoked partitions run on", still)

    def _assigned(self, assigned: set[TopicPartition]) -> None:
        if self._closing:
            self._pause(assigned)

    def _pause(self, tps: Iterable[TopicPartition] | None = None) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        with contextlib.suppress(Exception):
            consumer.pause(*(consumer.assignment() if tps is None else tps))

    # --- control -------------------------------------------------------------------------

    async def control(self, msg: KafkaMessage) -> None:
        """The ``runs.control`` handler: CancelRun cancels; everything else is the
        scheduler's (this topic is its to dead-letter, so nothing is dead-lettered here)."""
        record: Any = msg.raw_message
        try:
            event = self._guard.decode(record)
        except EventDecodeError as exc:
            log.warning(
                "skipping undecodable %s[%s]@%s: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            return
        if isinstance(event, CancelRun):
            count = self.cancel_run(event)
            if count:
                log.info("run %s cancelled: cancelling %d running step(s)", event.run_id, count)
        elif isinstance(event, RetryRun | ResumeRun):
            self._cancelled_runs.pop(event.run_id, None)
        for hook in self._on_control:
            try:
                await hook(event)
            except Exception:  # nobody redelivers this topic to us: log, go on
                log.exception(
                    "control hook failed on %s of run %s",
                    type(event).__name__,
                    getattr(event, "run_id", None),
                )

    def cancel_run(self, request: CancelRun) -> int:
        """Cancel the run's running steps; steps of it taken later fail without running."""
        self._cancelled_runs[request.run_id] = request
        self._cancelled_runs.move_to_end(request.run_id)
        while len(self._cancelled_runs) > _CANCELLED_RUNS_KEPT:
            self._cancelled_runs.popitem(last=False)
        jobs = self._runs.get(request.run_id, ())
        for job in jobs:
            job.cancel(request)
        return len(jobs)

    # --- stopping ------------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop taking steps, let running ones finish (up to ``drain_seconds``), commit."""
        self._closing = True
        self._slot_free.set()  # a handler waiting for a slot lets its message go
        self._pause()
        tasks = [job.task for job in self._jobs if job.task is not None]
        if tasks:
            log.info("waiting up to %gs for %d running step(s)", self.drain_seconds, len(tasks))
            late = set(tasks)
            if self.drain_seconds > 0:
                _, late = await asyncio.wait(tasks, timeout=self.drain_seconds)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=_COMMIT_TIMEOUT_S)
                log.warning(
                    "cancelled %d step(s) still running after %gs; uncommitted, they will "
                    "run on another runner",
                    len(late),
                    self.drain_seconds,
                )
        await self._commit(self._tracker.take_commits())
        if self._committer is not None:
            self._committer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._committer
            self._committer = None


class _RebalanceListener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, dispatcher: StepDispatcher) -> None:
        self._dispatcher = dispatcher

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._dispatcher._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._dispatcher._assigned(set(assigned))


def _tp(job: _Job) -> TopicPartition:
    return TopicPartition(job.coordinates[0], job.coordinates[1])


def _describe(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]={offset}" for tp, offset in offsets.items())
