"""The harness every runner shares: StepReady in, StepStarted then StepCompleted/StepFailed out.

For each step the harness announces it (StepStarted on ``runs.events``, for the recorder,
sent without waiting for the ack) once it has run for ``announce_after_s``: a quicker step
says everything through its result, which carries ``started_at`` and the worker, and saves
a publish here and a write in the recorder. It renders the step's config against the run's
context plus ``secrets``, validates it into the kind's config model, runs the kind's
executor under the step's timeout, and publishes the result, awaiting the broker's ack so
that the offset is committed only once the result is safe. ``StepDispatcher`` (in
``_dispatch``) runs several steps of a process at once and commits for them.

Failures are data. An executor reports an expected failure by raising a ``StepError``; any
other exception becomes a non-retryable StepFailed carrying its class name and traceback.

A long executor tells how far it is with ``report_progress(fraction, message)``: the harness
publishes StepProgress (without waiting for the ack, a few a second at most) while the
executor runs, and never after its result.

Errors the harness itself raises (each service's ``errors.py`` grows its own branches)::

    StepError                  a failure the runner understands: type, message, retryable
    ├── TemplateRenderError    "TemplateError": the config does not render (never retried)
    ├── MissingSecret          a ``secrets.NAME`` whose CONVEYOR_SECRET_NAME is not set
    ├── InvalidStepConfig      "ConfigError": the rendered config does not fit the kind
    ├── UnknownStepKind        no executor for the event's kind in this runner
    ├── StepTimeout            the step ran past its ``timeout_s`` (retryable)
    ├── Cancelled              its run was cancelled (CancelRun) while it waited or ran
    └── OutputNotSerializable  the executor returned something that is not JSON
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import socket
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from faststream import FastStream
from faststream.kafka import KafkaBroker, KafkaRouter
from faststream.middlewares import AckPolicy
from opentelemetry.sdk.trace import TracerProvider
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from conveyor.contracts import (
    ErrorInfo,
    Event,
    StepCompleted,
    StepFailed,
    StepMetrics,
    StepProgress,
    StepReady,
    StepStarted,
    Topics,
    utcnow,
)
from conveyor.contracts.kinds import KIND_CONFIGS, RUNNER_KINDS
from conveyor.contracts.templates import TemplateError, render_value
from conveyor.runtime._dispatch import RunnerSettings, StepControl, StepDispatcher
from conveyor.runtime.broker import consumer_options, ensure_topics, prompt_batches
from conveyor.runtime.guard import ConsumerGuard
from conveyor.runtime.inject import RawMessage
from conveyor.runtime.settings import KafkaSettings

__all__ = [
    "SECRET_ENV_PREFIX",
    "Announcement",
    "Cancelled",
    "Executor",
    "InvalidStepConfig",
    "MissingSecret",
    "OutputNotSerializable",
    "RunnerApp",
    "RunnerSettings",
    "Secrets",
    "StepControl",
    "StepDispatcher",
    "StepError",
    "StepHarness",
    "StepOutput",
    "StepTimeout",
    "TemplateRenderError",
    "UnknownStepKind",
    "create_runner_app",
    "create_runner_router",
    "report_progress",
    "require_kinds",
    "result_event_id",
    "runner_topics",
    "worker_name",
]

log = logging.getLogger("conveyor.runtime.runner")

SECRET_ENV_PREFIX = "CONVEYOR_SECRET_"
MASK = "***"
_JSON_HEADERS = {"content-type": "application/json"}


class StepError(Exception):
    """A step failure the runner understands. ``type`` defaults to the class name."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        type: str | None = None,
        retryable: bool | None = None,
        retry_after_s: float | None = None,
        details: dict[str, Any] | None = None,
        metrics: StepMetrics | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type or self.__class__.__name__
        if retryable is not None:
            self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.details = details
        self.metrics = metrics
        """What the failed work used (tokens, cost): billed calls count against a budget."""

    def to_error_info(self) -> ErrorInfo:
        return ErrorInfo(
            type=self.type,
            message=self.message,
            retryable=self.retryable,
            retry_after_s=self.retry_after_s,
            details=self.details,
        )


class TemplateRenderError(StepError):
    def __init__(self, message: str) -> None:
        super().__init__(message, type="TemplateError")


class MissingSecret(StepError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"secret {name!r} is not set: set the environment variable "
            f"{SECRET_ENV_PREFIX}{name} on the runner",
            details={"secret": name},
        )
        self.name = name


class InvalidStepConfig(StepError):
    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, type="ConfigError", details=details)


class UnknownStepKind(StepError):
    pass


class StepTimeout(StepError):
    retryable = True


class Cancelled(StepError):
    """The step's run was cancelled; the message names the reason given, if any."""

    def __init__(self, reason: str | None = None, *, requested_by: str | None = None) -> None:
        message = "the run was cancelled" + (f": {reason}" if reason else "")
        if requested_by:
            message += f" (by {requested_by})"
        super().__init__(
            message, type="Cancelled", details={"reason": reason, "requested_by": requested_by}
        )


class OutputNotSerializable(StepError):
    pass


class Secrets:
    """``{{ secrets.NAME }}`` reads ``CONVEYOR_SECRET_NAME`` from the runner's environment.

    Secrets are rendered at the runner, never carried in events: every value handed out is
    remembered so that the harness can mask it in what it publishes.
    """

    __slots__ = ("used",)

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __getitem__(self, name: str) -> str:
        value = os.environ.get(f"{SECRET_ENV_PREFIX}{name}")
        if value is None:
            raise MissingSecret(name)
        if value:
            self.used.add(value)
        return value

    def __getattr__(self, name: str) -> str:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __repr__(self) -> str:
        return "<secrets>"

    def mask(self, value: Any) -> Any:
        """``value`` with every secret handed out so far replaced by ``***``."""
        if not self.used:
            return value
        return _mask(value, sorted(self.used, key=len, reverse=True))


def _mask(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {k: _mask(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v, secrets) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What an executor may return instead of a bare output, to report metrics too."""

    output: Any = None
    metrics: StepMetrics | None = None


Executor = Callable[[Any, StepReady], Awaitable[Any]]
"""``async (config model, step) -> output | StepOutput``; raise ``StepError`` to fail."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


_RESULT_NAMESPACE = UUID("0c4f3a9e-7d1b-4e5f-8a26-93b1c7d2e4f0")


def result_event_id(event: StepReady) -> UUID:
    """The event id of every result of one attempt (run, step, attempt, item).

    A step can run twice for one attempt: its runner died after publishing the result but
    before committing the offset, or a deadline dispatched it again. Both results then carry
    this id, so the scheduler's inbox and the recorder's event log keep whichever they read
    first (the same one: results of a run share a partition) and drop the other, and the
    history cannot show an output the run did not go on with."""
    item = "" if event.item_index is None else f"/{event.item_index}"
    return uuid5(_RESULT_NAMESPACE, f"{event.run_id}/{event.step_id}/{event.attempt}{item}")


PROGRESS_INTERVAL_S = 0.25
"""At most one StepProgress per step this often: a progress bar needs no more."""


class _ProgressReporter:
    """Publishes one step's progress reports, dropping those that come too soon after the
    last one; once closed (the executor returned), it publishes nothing more."""

    def __init__(
        self,
        event: StepReady,
        publish: Callable[[StepProgress], Awaitable[None]],
        *,
        interval_s: float,
    ) -> None:
        self._event = event
        self._publish = publish
        self._interval_s = interval_s
        self._last = -interval_s
        self._sending: asyncio.Task[None] | None = None
        self._closed = False

    def report(self, fraction: float | None, message: str | None) -> None:
        now = time.monotonic()
        busy = self._sending is not None and not self._sending.done()
        if self._closed or busy or now - self._last < self._interval_s:
            return
        self._last = now
        if fraction is not None:
            fraction = min(max(float(fraction), 0.0), 1.0)
        progress = StepProgress(
            run_id=self._event.run_id,
            step_id=self._event.step_id,
            attempt=self._event.attempt,
            item_index=self._event.item_index,
            progress=fraction,
            message=message,
        )
        self._sending = asyncio.get_running_loop().create_task(self._send(progress))

    async def _send(self, progress: StepProgress) -> None:
        try:
            await self._publish(progress)
        except Exception as exc:
            log.debug("StepProgress was not sent: %r", exc)

    async def close(self) -> None:
        """Stop reporting; a report being handed to the producer is let through first, so
        that it goes out ahead of the result."""
        self._closed = True
        if self._sending is not None and not self._sending.done():
            await asyncio.wait([self._sending], timeout=1.0)


_progress: contextvars.ContextVar[_ProgressReporter | None] = contextvars.ContextVar(
    "conveyor_step_progress", default=None
)


def report_progress(fraction: float | None, message: str | None = None) -> None:
    """From inside an executor: how far the step is (0..1, or None when unknown) and what it
    is doing. Cheap and never blocking; outside a step (or too soon after the last report)
    it does nothing."""
    reporter = _progress.get()
    if reporter is not None:
        reporter.report(fraction, message)


class Announcement:
    """A started step's StepStarted, published later if the step still runs then."""

    __slots__ = ("_timer", "started_at")

    def __init__(self, started_at: datetime, timer: asyncio.TimerHandle | None) -> None:
        self.started_at = started_at
        self._timer = timer

    def settle(self) -> None:
        """The step has ended: a StepStarted not yet sent is not sent."""
        if self._timer is not None:
            self._timer.cancel()


class StepHarness:
    """Runs StepReady events through the executor of their kind and publishes the result."""

    def __init__(
        self,
        *,
        broker: KafkaBroker,
        topics: Topics,
        executors: Mapping[str, Executor],
        config_models: Mapping[str, type[BaseModel]] | None = None,
        worker: str | None = None,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
        announce_after_s: float = 0.0,
    ) -> None:
        """``announce_after_s``: StepStarted goes out once a step has run this long (0: at
        once); see ``start``."""
        self._broker = broker
        self._announce_after_s = announce_after_s
        self._announcing: set[asyncio.Task[None]] = set()
        self._progress_interval_s = progress_interval_s
        self._topic = topics.steps_completed
        self._events_topic = topics.runs_events
        """StepStarted and StepProgress: for the recorder. On the results topic they cost the
        scheduler a poll cycle before each result."""
        self._executors = dict(executors)
        models = {kind: KIND_CONFIGS[kind] for kind in self._executors if kind in KIND_CONFIGS}
        self._models: dict[str, type[BaseModel]] = {**models, **(config_models or {})}
        missing = set(self._executors) - set(self._models)
        if missing:
            raise ValueError(f"no config model for kind(s) {', '.join(sorted(missing))}")
        self.worker = worker or worker_name()

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._executors)

    async def execute(
        self, event: Event, record: Any = None, *, control: StepControl | None = None
    ) -> None:
        """Handle one StepReady end to end; returns once the result is acknowledged."""
        if not isinstance(event, StepReady):
            raise TypeError(f"a runner handles StepReady, got {type(event).__name__}")
        announcement = await self.start(event)
        try:
            result = await self.run_step(event, started_at=announcement.started_at, control=control)
        finally:
            announcement.settle()
        await self.publish_result(event, result)

    async def start(self, event: StepReady) -> Announcement:
        """The step starts now: its StepStarted is published once it has run for
        ``announce_after_s``, unless ``settle()`` (the step ended) comes first. A step's
        result carries ``started_at`` and the worker, so a quick step loses nothing by
        not announcing itself; a slow one shows as running in the history meanwhile."""
        started_at = utcnow()
        if self._announce_after_s <= 0:
            # handed to the producer ahead of the result
            await self.announce(self._started(event, started_at))
            return Announcement(started_at, None)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self._announce_after_s, self._announce_soon, event, started_at)
        return Announcement(started_at, timer)

    def _started(self, event: StepReady, started_at: datetime) -> StepStarted:
        return StepStarted(**event.outcome_fields(), occurred_at=started_at, worker=self.worker)

    def _announce_soon(self, event: StepReady, started_at: datetime) -> None:
        task = asyncio.get_running_loop().create_task(
            self.announce(self._started(event, started_at))
        )
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def announce(self, started: StepStarted) -> None:
        """Publish StepStarted (on ``runs.events``) without waiting for the ack: losing it
        loses nothing the result does not carry, and the recorder takes the two in either
        order."""
        try:
            pending = await self._broker.publish(
                started.model_dump_json().encode(),
                self._events_topic,
                key=str(started.run_id).encode(),
                headers=_JSON_HEADERS,
                no_confirm=True,
            )
        except Exception as exc:
            log.warning("StepStarted was not sent: %r", exc)
        else:
            if isinstance(pending, asyncio.Future):
                pending.add_done_callback(_log_failed_send)

    async def publish_progress(self, progress: StepProgress) -> None:
        """Hand a StepProgress to the producer without waiting for the ack: it goes out
        ahead of the step's result on the same producer, and losing one loses little."""
        pending = await self._broker.publish(
            progress.model_dump_json().encode(),
            self._events_topic,
            key=str(progress.run_id).encode(),
            headers=_JSON_HEADERS,
            no_confirm=True,
        )
        if isinstance(pending, asyncio.Future):
            pending.add_done_callback(_log_failed_send)

    async def publish_result(self, event: StepReady, result: bytes) -> None:
        """Publish a serialized StepCompleted/StepFailed, awaiting the broker's ack."""
        await self._broker.publish(
            result, self._topic, key=str(event.run_id).encode(), headers=_JSON_HEADERS
        )

    def oversized(
        self, event: StepReady, *, size: int, started_at: datetime | None = None
    ) -> bytes:
        """The StepFailed that replaces a result the broker refuses as too large."""
        return (
            StepFailed(
                **event.outcome_fields(),
                event_id=result_event_id(event),
                error=ErrorInfo(
                    type="OutputTooLarge",
                    message=f"the step's result ({size} bytes) is larger than the broker "
                    "accepts: return a reference to large data, not the data",
                    details={"size": size},
                ),
                started_at=started_at,
                worker=self.worker,
            )
            .model_dump_json()
            .encode()
        )

    async def run_step(
        self,
        event: StepReady,
        *,
        started_at: datetime | None = None,
        control: StepControl | None = None,
    ) -> bytes:
        """Render, validate and execute ``event``; the serialized StepCompleted/StepFailed.

        With a ``control``, a cancel of the step's run fails it as "Cancelled": before the
        executor starts, or by cancelling the executor (its work is aborted: the request
        closed, the child process killed). A cancel without a cancelled run (shutdown)
        propagates, and nothing is published."""
        started_at = started_at or utcnow()
        began = time.perf_counter()
        secrets = Secrets()
        step_input: Any = event.config
        failed_metrics = StepMetrics()
        try:
            executor = self._executors.get(event.kind)
            if executor is None:
                raise UnknownStepKind(
                    f"this runner ({self.worker}) serves {', '.join(self.kinds)}, "
                    f"not {event.kind!r}"
                )
            step_input = self._render(event, secrets)
            config = self._validate(event.kind, step_input)
            progress = _ProgressReporter(
                event, self.publish_progress, interval_s=self._progress_interval_s
            )
            outcome = await _call(executor, config, event, control, progress=progress)
        except StepError as exc:
            error = exc.to_error_info()
            failed_metrics = exc.metrics or StepMetrics()
        except Exception as exc:
            error = ErrorInfo(
                type=type(exc).__name__,
                message=str(exc) or type(exc).__name__,
                traceback=traceback.format_exc(),
                retryable=False,
            )
        else:
            output, metrics = (
                (outcome.output, outcome.metrics or StepMetrics())
                if isinstance(outcome, StepOutput)
                else (outcome, StepMetrics())
            )
            completed = StepCompleted(
                **event.outcome_fields(),
                event_id=result_event_id(event),
                output=secrets.mask(output),
                input=secrets.mask(step_input),
                metrics=_with_duration(metrics, began),
                started_at=started_at,
                worker=self.worker,
            )
            try:
                return completed.model_dump_json().encode()
            except PydanticSerializationError as exc:
                error = OutputNotSerializable(
                    f"the {event.kind} step returned output that is not JSON: {exc}"
                ).to_error_info()
        failed = StepFailed(
            **event.outcome_fields(),
            event_id=result_event_id(event),
            error=_masked_error(error, secrets),
            input=secrets.mask(step_input),
            metrics=_with_duration(failed_metrics, began),
            started_at=started_at,
            worker=self.worker,
        )
        try:
            return failed.model_dump_json().encode()
        except PydanticSerializationError:
            # The rendered config itself is not JSON (a template yielded an object).
            return failed.model_copy(update={"input": repr(step_input)}).model_dump_json().encode()

    @staticmethod
    def _render(event: StepReady, secrets: Secrets) -> Any:
        try:
            return render_value(event.config, {**event.context, "secrets": secrets})
        except TemplateError as exc:
            raise TemplateRenderError(str(exc)) from None

    def _validate(self, kind: str, rendered: Any) -> BaseModel:
        try:
            return self._models[kind].model_validate(rendered)
        except ValidationError as exc:
            problems = [
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                for err in exc.errors(include_url=False)
            ]
            raise InvalidStepConfig(
                f"invalid {kind} config: " + "; ".join(problems[:5]),
                details={"problems": problems},
            ) from None


async def _call(
    executor: Executor,
    config: BaseModel,
    event: StepReady,
    control: StepControl | None,
    *,
    progress: _ProgressReporter | None = None,
) -> Any:
    """The executor under the step's timeout, interruptible by its run's cancellation."""
    if control is not None and control.cancelled:
        raise Cancelled(control.cancel_reason, requested_by=control.cancelled_by)
    deadline = asyncio.timeout(event.timeout_s)
    if control is not None:
        control.executing = True
    reporting = _progress.set(progress)
    try:
        async with deadline:
            return await executor(config, event)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise StepTimeout(
            f"step exceeded its {event.timeout_s:g}s timeout",
            details={"timeout_s": event.timeout_s},
        ) from None
    except asyncio.CancelledError:
        if control is None or not control.cancelled:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()  # handled: the failure is published like any other
        raise Cancelled(control.cancel_reason, requested_by=control.cancelled_by) from None
    finally:
        _progress.reset(reporting)
        if progress is not None:
            await progress.close()
        if control is not None:
            control.executing = False


def _masked_error(error: ErrorInfo, secrets: Secrets) -> ErrorInfo:
    if not secrets.used:
        return error
    return ErrorInfo.model_validate(secrets.mask(error.model_dump()))


def _with_duration(metrics: StepMetrics, began: float) -> StepMetrics:
    duration_ms = round((time.perf_counter() - began) * 1000, 3)
    return metrics.model_copy(update={"duration_ms": duration_ms})


def _log_failed_send(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("StepStarted was not delivered: %r", future.exception())


def create_runner_router(
    *, kafka: KafkaSettings, dispatcher: StepDispatcher, group: str
) -> KafkaRouter:
    """A runner service's subscribers: every kind it serves in one consumer group, and the
    control topic, read by every runner process.

    One subscriber lists all the ready topics because each consumer-group join costs the
    embedded broker about a second, and FastStream starts subscribers one after another.
    The control subscriber has no group, so it costs no join and sees every partition.
    """
    topics = kafka.topics
    kinds = dispatcher.harness.kinds
    router = KafkaRouter()

    ready = router.subscriber(
        *(topics.ready(kind) for kind in kinds),
        title=f"{group}:on_step_ready",
        description="StepReady (conveyor.contracts.StepReady) of the kinds this runner "
        f"serves ({', '.join(kinds)}), up to CONVEYOR_RUNNER_CONCURRENCY at once; "
        f"undecodable messages go to {topics.dlq}. Offsets are committed once results "
        "are acknowledged, never past an unfinished step.",
        **{
            **consumer_options(kafka, group=group, batch=True),
            "ack_policy": AckPolicy.MANUAL,
            "listener": dispatcher.listener,
        },
    )

    async def on_step_ready(msg: RawMessage) -> None:
        # A poll's records, each in its own span: FastStream's per-message path (its
        # middlewares, a dependency resolution and a span per message) was a quarter of a
        # runner's CPU for a step that does nothing.
        await dispatcher.submit_batch(msg.raw_message)

    prompt_batches(ready)(on_step_ready)
    # The rebalance timeout is the session timeout (aiokafka's default).
    dispatcher.bind(ready, rebalance_wait_s=kafka.session_timeout_ms / 2000)

    @router.subscriber(
        topics.runs_control,
        title=f"{group}:on_control",
        description="CancelRun (conveyor.contracts.CancelRun) cancels this process's "
        "running steps of the run, which fail as 'Cancelled'. Read by every runner "
        "process (no consumer group, from the latest offset); other control events and "
        "undecodable messages are skipped (the scheduler owns this topic).",
        group_id=None,
        auto_offset_reset="latest",
        # Control events are rare and a cancel may take a tenth of a second: polling this
        # topic as often as the ready topics doubled an idle runner's CPU on the embedded
        # broker, which holds every fetch for its full wait.
        fetch_max_wait_ms=max(kafka.fetch_max_wait_ms, kafka.control_fetch_max_wait_ms),
        ack_policy=AckPolicy.MANUAL,
    )
    async def on_control(msg: RawMessage) -> None:
        await dispatcher.control(msg)

    # Documents what the harness emits (it publishes through the broker, keyed by run id).
    router.publisher(
        topics.steps_completed,
        schema=StepCompleted | StepFailed,
        title=f"{topics.steps_completed}:{group}",
        description="StepCompleted (the data packet) or StepFailed (the error as data), "
        "once per attempt; key: run_id.",
    )
    router.publisher(
        topics.runs_events,
        schema=StepStarted | StepProgress,
        title=f"{topics.runs_events}:{group}",
        description="StepStarted when a step begins, StepProgress while a long step runs "
        "(some kinds); for the recorder; key: run_id.",
    )
    return router


def runner_topics(kafka: KafkaSettings, harness: StepHarness) -> list[str]:
    """Every topic a runner reads or writes, for ``ensure_topics`` at start."""
    topics = kafka.topics
    return [
        *(topics.ready(kind) for kind in harness.kinds),
        topics.steps_completed,
        topics.runs_events,
        topics.runs_control,
        topics.dlq,
    ]


def require_kinds(service: str, harness: StepHarness) -> None:
    """Fail at start when the service lacks an executor for a kind it is declared to serve:
    the scheduler accepts pipelines of those kinds, trusting that someone serves them."""
    missing = set(RUNNER_KINDS[service]) - set(harness.kinds)
    if missing:
        raise RuntimeError(f"{service} has no executor for {', '.join(sorted(missing))}")


@dataclass(frozen=True)
class RunnerApp:
    app: FastStream
    harness: StepHarness
    dispatcher: StepDispatcher


def create_runner_app(
    *,
    service: str,
    kafka: KafkaSettings,
    runner: RunnerSettings,
    broker: KafkaBroker,
    executors: Mapping[str, Executor],
    create_router: Callable[..., KafkaRouter],
    on_startup: Sequence[Callable[[], Awaitable[None]]] = (),
    after_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
    on_control: Sequence[Callable[[Event], Awaitable[None]]] = (),
    tracer_provider: TracerProvider | None = None,
) -> RunnerApp:
    """The wiring every runner service shares: harness, dispatcher, the service's router,
    its topics created at start, and a drain before the broker stops (running steps
    finish and are committed, then the process leaves its group). ``after_shutdown``
    hooks run once the broker has stopped, when no step needs a client any more;
    ``on_control`` hooks see every event of ``runs.control`` (read by every process)."""
    harness = StepHarness(
        broker=broker,
        topics=kafka.topics,
        executors=executors,
        announce_after_s=runner.announce_after_ms / 1000,
    )
    require_kinds(service, harness)
    # The guard opens each StepReady's consumer span: the step runs, and its result is
    # sent, inside it.
    guard = ConsumerGuard(
        broker=broker,
        topics=kafka.topics,
        group=kafka.group(service),
        tracer_provider=tracer_provider,
    )
    dispatcher = StepDispatcher(
        harness=harness, guard=guard, settings=runner, on_control=on_control
    )
    broker.include_router(create_router(kafka=kafka, dispatcher=dispatcher))
    topics = runner_topics(kafka, harness)

    async def create_topics() -> None:
        await ensure_topics(kafka, topics)

    app = FastStream(
        broker,
        on_startup=[create_topics, *on_startup],
        on_shutdown=[dispatcher.drain],
        after_shutdown=list(after_shutdown),
    )
    return RunnerApp(app=app, harness=harness, dispatcher=dispatcher)
