"""Broker factory, topic creation and the consumer options every subscriber uses."""

from __future__ import annotations

import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faststream.kafka import KafkaBroker
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.kafka.subscriber.usecase import BatchSubscriber
from faststream.middlewares import AckPolicy
from faststream.opentelemetry.middleware import BaseTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider

from conveyor.runtime.settings import KafkaSettings

__all__ = ["consumer_options", "create_broker", "ensure_topics", "prompt_batches"]

log = logging.getLogger("conveyor.runtime")


class _RecordSpans(BaseTelemetryMiddleware[Any]):
    """FastStream's spans, but none around a batch: ``ConsumerGuard.span`` (and the
    runners' dispatcher) give each record of a batch its own span, a child of the span
    that sent it. FastStream's batch span, with a link to every record's sender, only
    doubled that work: 7-10% of the scheduler's, recorder's and runners' CPU."""

    async def consume_scope(self, call_next: Any, msg: Any) -> Any:
        if msg.batch_headers:
            return await call_next(msg)
        return await super().consume_scope(call_next, msg)


class _Telemetry(KafkaTelemetryMiddleware):
    def __call__(self, msg: Any | None, /, *, context: Any) -> BaseTelemetryMiddleware[Any]:
        return _RecordSpans(
            msg,
            tracer=self._tracer,
            metrics_container=self._metrics,
            settings_provider_factory=self._settings_provider_factory,
            context=context,
        )


def create_broker(
    kafka: KafkaSettings, *, service: str, tracer_provider: TracerProvider
) -> KafkaBroker:
    return KafkaBroker(
        kafka.bootstrap,
        client_id=f"conveyor-{service}",
        middlewares=[_Telemetry(tracer_provider=tracer_provider)],
        # Idempotent producers and transactions are deliberately not used: the embedded
        # broker lacks them, and exactly-once effects come from consumer dedupe + outbox.
        acks="all",
        enable_idempotence=False,
        linger_ms=0,
        logger=logging.getLogger(f"conveyor.{service}.broker"),
    )


def consumer_options(
    kafka: KafkaSettings,
    *,
    group: str,
    batch: bool = False,
    fetch_max_wait_ms: int | None = None,
) -> dict[str, Any]:
    """Offsets are committed after the handler returns; an unexpected error seeks back so
    the message is delivered again (nothing is lost), see ``ConsumerGuard``.

    ``batch``: the handler gets what one poll returned (up to ``max_poll_records``, as soon
    as anything is there) and the offsets are committed once for all of it; see
    ``ConsumerGuard.handle_batch``. Pass the subscriber to ``prompt_batches``.
    ``fetch_max_wait_ms``: instead of ``kafka.fetch_max_wait_ms``, for a consumer that is
    not on a run's critical path (the recorder)."""
    extra: dict[str, Any] = {}
    if batch:
        extra = {
            "batch": True,
            "max_records": kafka.max_poll_records,
            "batch_timeout_ms": kafka.batch_wait_ms,
            "decoder": _undecoded,
        }
    return extra | {
        "group_id": kafka.group(group),
        "auto_offset_reset": "earliest",
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "fetch_max_wait_ms": fetch_max_wait_ms or kafka.fetch_max_wait_ms,
        "max_poll_records": kafka.max_poll_records,
        "ack_policy": AckPolicy.NACK_ON_ERROR,
    }


async def _undecoded(msg: Any) -> None:
    """A batch handler reads ``msg.raw_message`` and decodes each record itself (through
    ``ConsumerGuard``, which dead-letters what does not decode): FastStream parsing every
    body as JSON first was a second decoding, for nothing."""
    return None


class _PromptBatchSubscriber(BatchSubscriber):
    """FastStream's batch subscriber, minus its sleep after an empty poll.

    ``getmany`` returns as soon as any record is there, so its timeout only bounds how long
    an idle loop goes without checking that it should stop. FastStream then sleeps that
    long again, and a record arriving meanwhile waits: with a 1 ms timeout the loop woke
    a thousand times a second to poll nothing (a tenth of an idle service's CPU on this
    broker); with a long one, a record could wait the whole sleep."""

    __slots__ = ()

    async def get_msg(self, consumer: Any) -> tuple[Any, ...]:
        messages = await consumer.getmany(
            timeout_ms=self.batch_timeout_ms, max_records=self.max_records
        )
        return tuple(record for records in messages.values() for record in records)


def prompt_batches(subscriber: Any) -> Any:
    """Make a batch subscriber (``consumer_options(batch=True)``) hand over each poll's
    records as they come, without FastStream's idle sleep; returns it."""
    if not isinstance(subscriber, BatchSubscriber):
        raise TypeError(f"not a batch subscriber: {type(subscriber).__name__}")
    subscriber.__class__ = _PromptBatchSubscriber
    return subscriber


async def ensure_topics(kafka: KafkaSettings, topics: list[str]) -> None:
    """Create topics with ``partitions`` partitions; existing topics are left as they are.

    Auto-created topics would get the broker's default partition count, which caps how many
    runners of a consumer group can share the work.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, client_id="conveyor-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if missing:
            await admin.create_topics(
                [
                    NewTopic(name=t, num_partitions=kafka.partitions, replication_factor=1)
                    for t in missing
                ]
            )
            log.info("created topics %s", ", ".join(missing))
    finally:
        await admin.close()
