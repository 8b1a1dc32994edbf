"""Decode-or-dead-letter for every consumer: one bad message never stops a partition.

A message that cannot be decoded or validated goes to the DLQ with the reason, byte for
byte, and the consumer moves on. A valid message whose handling raises is delivered again
(the subscriber seeks back) after a short backoff; after ``max_failures`` tries it too is
dead-lettered, so a poison message cannot wedge the partition forever.

Infrastructure errors (the database or the broker unreachable) are not the message's
fault: they are retried with backoff for as long as they last and never dead-letter a
valid event.

What counts as undecodable, besides bad JSON and a body that does not fit its topic's
event: a record over ``MAX_MESSAGE_BYTES`` (no Conveyor producer can write one, and
accepting it would only move the failure to the next hop, where the event carrying it
cannot be published), and a StepReady on the ready topic of another kind (whoever produced
it, no runner of that kind will ever run it). A dead letter keeps the record byte for byte
up to ``DEAD_LETTER_VALUE_BYTES``; beyond that the reason says how much was cut, so that
the letter itself always fits the broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any
from uuid import UUID, uuid5

from faststream.kafka import KafkaBroker
from faststream.kafka.message import KafkaMessage
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

from conveyor.contracts import (
    DeadLetter,
    Event,
    EventDecodeError,
    StepReady,
    Topics,
    decode_event,
)

__all__ = [
    "DEAD_LETTER_VALUE_BYTES",
    "MAX_MESSAGE_BYTES",
    "ConsumerGuard",
    "Undeliverable",
    "record_event_id",
]

_RECORD_NAMESPACE = UUID("a4c2b7de-51a3-4f3e-9f0e-6c7d8e9f0a1b")

MAX_MESSAGE_BYTES = 1 << 20
"""The largest record (key, value and headers) a consumer accepts: Kafka's default
``message.max.bytes`` and the most a Conveyor producer sends (``max_request_size``)."""
DEAD_LETTER_VALUE_BYTES = 256 << 10
"""How much of a record's value a dead letter keeps: base64 and the reason on top still
fit a 1 MiB message."""
_DEAD_LETTER_KEY_BYTES = 16 << 10
_DEAD_LETTER_HEADER_CHARS = 4 << 10

log = logging.getLogger("conveyor.runtime.guard")


class Undeliverable(Exception):
    """Raised by a handler for a valid event that can never be processed (it names a run
    that does not exist, say): the message goes to the DLQ with this reason."""


def is_transient(exc: BaseException) -> bool:
    """An outage of something we depend on, rather than a problem with the message."""
    from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, MessageSizeTooLargeError | RecordTooLargeError):
        return False  # the broker refuses this message whenever it is sent again
    return isinstance(exc, OSError | TimeoutError | KafkaError)


def record_event_id(record: Any) -> UUID:
    """Stable id for a record that carries none: the same record always maps to the same id,
    and a record produced later (even after the broker lost its offsets) to another."""
    digest = hashlib.sha256(record.value or b"").hexdigest()
    return uuid5(
        _RECORD_NAMESPACE,
        f"{record.topic}/{record.partition}/{record.offset}/{record.timestamp}/{digest}",
    )


class ConsumerGuard:
    def __init__(
        self,
        *,
        broker: KafkaBroker,
        topics: Topics,
        group: str,
        max_failures: int = 5,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("conveyor.runtime.guard", tracer_provider=tracer_provider)
        self._broker = broker
        self._topics = topics
        self._group = group
        self._max_failures = max_failures
        self._max_message_bytes = max_message_bytes
        self._failures: dict[tuple[str, int, int], int] = {}

    def decode(self, record: Any) -> Event:
        """The record's event; raises EventDecodeError with the reason it cannot be one."""
        size = _record_size(record)
        if size > self._max_message_bytes:
            raise EventDecodeError(
                f"message of {size} bytes is over the {self._max_message_bytes}-byte limit: "
                "large data belongs in an artifact or behind a URL, not in an event"
            )
        event = decode_event(
            self._topics, record.topic, record.value, fallback_event_id=record_event_id(record)
        )
        if isinstance(event, StepReady):
            kind = self._topics.kind_of(record.topic)
            if kind is not None and event.kind != kind:
                raise EventDecodeError(
                    f"StepReady of kind {event.kind!r} (run {event.run_id}, step "
                    f"{event.step_id!r}) on {record.topic}, the topic of kind {kind!r}: "
                    "no runner serves it there"
                )
        return event

    async def handle(
        self, msg: KafkaMessage, process: Callable[[Event, Any], Awaitable[None]]
    ) -> None:
        """Decode ``msg`` and run ``process(event, record)``; dead-letter what cannot be."""
        record: Any = msg.raw_message  # one ConsumerRecord: not a batch subscriber
        try:
            event = self.decode(record)
        except EventDecodeError as exc:
            log.warning(
                "dead-lettering %s[%s]@%s: %s", record.topic, record.partition, record.offset, exc
            )
            await self.dead_letter(record, str(exc))
            return
        await self._process_one(event, record, process)

    async def handle_batch(
        self,
        records: Sequence[Any],
        process: Callable[[Event, Any], Awaitable[None]],
        *,
        transaction: Callable[[], AbstractAsyncContextManager[Any]],
        prepare: Callable[[list[Event]], Awaitable[None]] | None = None,
    ) -> None:
        """A batch subscriber's records (``msg.raw_message``): decode each (dead-lettering
        what cannot be), then ``process`` them in order inside one ``transaction()``.

        One transaction per batch is what makes consuming cheap: one commit, one WAL flush,
        one offset commit for up to ``max_poll_records`` events. ``process`` must keep each
        event's effects all-or-nothing inside it (a savepoint), so an ``Undeliverable``
        event is dead-lettered without undoing the others. Any other failure rolls the
        batch back and its events are processed again one at a time, each in its own
        transaction, so a poison event is isolated and retried or dead-lettered exactly as
        ``handle`` does. Each event is processed in its own span, a child of the span its
        producer sent, so a run stays one trace however its events were batched.

        ``prepare``: awaited inside the transaction with every decoded event before any is
        processed, to read in one query what the batch will need (rows to lock, ids seen)."""
        events: list[tuple[Event, Any]] = []
        for record in records:
            try:
                events.append((self.decode(record), record))
            except EventDecodeError as exc:
                log.warning(
                    "dead-lettering %s[%s]@%s: %s",
                    record.topic,
                    record.partition,
                    record.offset,
                    exc,
                )
                await self.dead_letter(record, str(exc))
        if not events:
            return
        refused: list[tuple[Any, Undeliverable]] = []
        try:
            async with transaction():
                if prepare is not None:
                    await prepare([event for event, _ in events])
                for event, record in events:
                    with self.span(record):
                        try:
                            await process(event, record)
                        except Undeliverable as exc:
                            refused.append((record, exc))
        except Exception as exc:
            if is_transient(exc):
                log.warning("transient failure, will retry a batch of %d: %r", len(events), exc)
                await asyncio.sleep(1.0)
                raise
            log.warning(
                "a batch of %d events failed (%r); processing them one at a time", len(events), exc
            )
            for event, record in events:
                await self._process_one(event, record, process, span=True)
            return
        for record, refusal in refused:
            log.warning(
                "dead-lettering %s: %s", (record.topic, record.partition, record.offset), refusal
            )
            await self.dead_letter(record, str(refusal))

    def span(self, record: Any) -> AbstractContextManager[Any]:
        """The consumer span of one record: a child of the span that sent it, so a run stays
        one trace however its records were polled."""
        carrier = {
            name: value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            for name, value in record.headers or ()
        }
        return self._tracer.start_as_current_span(
            f"{record.topic} process",
            context=propagate.extract(carrier),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": record.topic,
                "messaging.kafka.destination.partition": record.partition,
                "messaging.kafka.message.offset": record.offset,
                "messaging.consumer.group.name": self._group,
            },
        )

    async def _process_one(
        self,
        event: Event,
        record: Any,
        process: Callable[[Event, Any], Awaitable[None]],
        *,
        span: bool = False,
    ) -> None:
        """One event in its own transaction: dead-letter it if Undeliverable, retry it
        (by raising: the subscriber seeks back) up to ``max_failures`` times, then give up
        on it into the DLQ. ``span``: open the event's own span (in a batch subscriber, the
        middleware's span is the batch's)."""
        coordinates = (record.topic, record.partition, record.offset)
        try:
            with self.span(record) if span else contextlib.nullcontext():
                await process(event, record)
        except Undeliverable as exc:
            log.warning("dead-lettering %s: %s", coordinates, exc)
            await self.dead_letter(record, str(exc))
            return
        except Exception as exc:
            if is_transient(exc):
                log.warning("transient failure, will retry %s: %r", coordinates, exc)
                await asyncio.sleep(1.0)
                raise
            failures = self._failures.get(coordinates, 0) + 1
            self._failures[coordinates] = failures
            if failures >= self._max_failures:
                self._failures.pop(coordinates, None)
                log.exception("giving up on %s after %d failures", coordinates, failures)
                reason = f"handler failed {failures} times: {type(exc).__name__}: {exc}"
                await self.dead_letter(record, reason, details=traceback.format_exc())
                return
            log.warning("handler failed (%d/%d), will retry: %r", failures, self._max_failures, exc)
            await asyncio.sleep(min(0.2 * 2**failures, 5.0))
            raise
        else:
            self._failures.pop(coordinates, None)

    async def dead_letter(self, record: Any, reason: str, *, details: str | None = None) -> None:
        headers = {}
        for name, raw in record.headers or ():
            try:
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError:
                text = base64.b64encode(raw).decode()
            headers[name] = text[:_DEAD_LETTER_HEADER_CHARS]
        value: bytes = record.value or b""
        key: bytes | None = record.key
        if len(value) > DEAD_LETTER_VALUE_BYTES:
            reason += (
                f" (the dead letter keeps the first {DEAD_LETTER_VALUE_BYTES} of its "
                f"{len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()})"
            )
            value = value[:DEAD_LETTER_VALUE_BYTES]
        if key is not None and len(key) > _DEAD_LETTER_KEY_BYTES:
            reason += f" (key cut to {_DEAD_LETTER_KEY_BYTES} of {len(key)} bytes)"
            key = key[:_DEAD_LETTER_KEY_BYTES]
        letter = DeadLetter(
            event_id=uuid5(_RECORD_NAMESPACE, f"dlq/{self._group}/{record_event_id(record)}"),
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            consumer_group=self._group,
            reason=reason if details is None else f"{reason}\n{details}",
            key_b64=base64.b64encode(key).decode() if key else None,
            value_b64=base64.b64encode(value).decode(),
            headers=headers,
        )
        await self._broker.publish(
            letter.model_dump_json().encode(),
            self._topics.dlq,
            key=key,
            headers={"content-type": "application/json"},
        )


def _record_size(record: Any) -> int:
    """Key, value and header bytes of a record, as the broker counts them (near enough)."""
    size = len(record.value or b"") + len(record.key or b"")
    for name, value in record.headers or ():
        size += len(name) + len(value or b"")
    return size
