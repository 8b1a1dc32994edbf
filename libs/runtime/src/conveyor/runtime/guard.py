"""Decode-or-dead-letter for every consumer: one bad message never stops a partition.

A message that cannot be decoded or validated goes to the DLQ with the reason, byte for
byte, and the consumer moves on. A valid message whose handling raises is delivered again
(the subscriber seeks back) after a short backoff; after ``max_failures`` tries it too is
dead-lettered, so a poison message cannot wedge the partition forever.

Infrastructure errors (the database or the broker unreachable) are not the message's
fault: they are retried with backoff for as long as they last and never dead-letter a
valid event.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID, uuid5

from faststream.kafka import KafkaBroker
from faststream.kafka.message import KafkaMessage

from conveyor.contracts import DeadLetter, Event, EventDecodeError, Topics, decode_event

__all__ = ["ConsumerGuard", "Undeliverable", "record_event_id"]

_RECORD_NAMESPACE = UUID("a4c2b7de-51a3-4f3e-9f0e-6c7d8e9f0a1b")

log = logging.getLogger("conveyor.runtime.guard")


class Undeliverable(Exception):
    """Raised by a handler for a valid event that can never be processed (it names a run
    that does not exist, say): the message goes to the DLQ with this reason."""


def is_transient(exc: BaseException) -> bool:
    """An outage of something we depend on, rather than a problem with the message."""
    from aiokafka.errors import KafkaError
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
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
    ) -> None:
        self._broker = broker
        self._topics = topics
        self._group = group
        self._max_failures = max_failures
        self._failures: dict[tuple[str, int, int], int] = {}

    def decode(self, record: Any) -> Event:
        return decode_event(
            self._topics, record.topic, record.value, fallback_event_id=record_event_id(record)
        )

    async def handle(
        self, msg: KafkaMessage, process: Callable[[Event, Any], Awaitable[None]]
    ) -> None:
        """Decode ``msg`` and run ``process(event, record)``; dead-letter what cannot be."""
        record: Any = msg.raw_message  # one ConsumerRecord: these subscribers do not batch
        try:
            event = self.decode(record)
        except EventDecodeError as exc:
            log.warning(
                "dead-lettering %s[%s]@%s: %s", record.topic, record.partition, record.offset, exc
            )
            await self.dead_letter(record, str(exc))
            return
        coordinates = (record.topic, record.partition, record.offset)
        try:
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
        for name, value in record.headers or ():
            try:
                headers[name] = value.decode() if isinstance(value, bytes) else str(value)
            except UnicodeDecodeError:
                headers[name] = base64.b64encode(value).decode()
        letter = DeadLetter(
            event_id=uuid5(_RECORD_NAMESPACE, f"dlq/{self._group}/{record_event_id(record)}"),
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            consumer_group=self._group,
            reason=reason if details is None else f"{reason}\n{details}",
            key_b64=base64.b64encode(record.key).decode() if record.key else None,
            value_b64=base64.b64encode(record.value or b"").decode(),
            headers=headers,
        )
        await self._broker.publish(
            letter.model_dump_json().encode(),
            self._topics.dlq,
            key=record.key,
            headers={"content-type": "application/json"},
        )
