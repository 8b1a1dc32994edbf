"""Broker factory, topic creation and the consumer options every subscriber uses."""

from __future__ import annotations

import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faststream.kafka import KafkaBroker
from faststream.kafka.opentelemetry import KafkaTelemetryMiddleware
from faststream.middlewares import AckPolicy
from opentelemetry.sdk.trace import TracerProvider

from conveyor.runtime.settings import KafkaSettings

__all__ = ["consumer_options", "create_broker", "ensure_topics"]

log = logging.getLogger("conveyor.runtime")


def create_broker(
    kafka: KafkaSettings, *, service: str, tracer_provider: TracerProvider
) -> KafkaBroker:
    return KafkaBroker(
        kafka.bootstrap,
        client_id=f"conveyor-{service}",
        middlewares=[KafkaTelemetryMiddleware(tracer_provider=tracer_provider)],
        # Idempotent producers and transactions are deliberately not used: the embedded
        # broker lacks them, and exactly-once effects come from consumer dedupe + outbox.
        acks="all",
        enable_idempotence=False,
        linger_ms=0,
        logger=logging.getLogger(f"conveyor.{service}.broker"),
    )


def consumer_options(kafka: KafkaSettings, *, group: str, batch: bool = False) -> dict[str, Any]:
    """Offsets are committed after the handler returns; an unexpected error seeks back so
    the message is delivered again (nothing is lost), see ``ConsumerGuard``.

    ``batch``: the handler gets what one poll returned (up to ``max_poll_records``, as soon
    as anything is there) and the offsets are committed once for all of it; see
    ``ConsumerGuard.handle_batch``. An idle poll waits ``batch_wait_ms``."""
    extra: dict[str, Any] = {}
    if batch:
        extra = {
            "batch": True,
            "max_records": kafka.max_poll_records,
            "batch_timeout_ms": kafka.batch_wait_ms,
        }
    return extra | {
        "group_id": kafka.group(group),
        "auto_offset_reset": "earliest",
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "fetch_max_wait_ms": kafka.fetch_max_wait_ms,
        "max_poll_records": kafka.max_poll_records,
        "ack_policy": AckPolicy.NACK_ON_ERROR,
    }


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
