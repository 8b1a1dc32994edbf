"""The consumer options every subscriber gets, and batch subscribers without FastStream's
idle sleep (``prompt_batches``)."""

from __future__ import annotations

from typing import Any

import pytest
from faststream.kafka import KafkaRouter

from conveyor.runtime import KafkaSettings, consumer_options, prompt_batches


class _Consumer:
    """What ``get_msg`` asks of an aiokafka consumer: ``getmany``."""

    def __init__(self, polls: list[dict[Any, list[Any]]]) -> None:
        self.polls = polls
        self.calls: list[dict[str, Any]] = []

    async def getmany(self, **kwargs: Any) -> dict[Any, list[Any]]:
        self.calls.append(kwargs)
        return self.polls.pop(0)


def _batch_subscriber(kafka: KafkaSettings) -> Any:
    return KafkaRouter().subscriber("t", **consumer_options(kafka, group="g", batch=True))


async def test_an_empty_poll_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """FastStream's batch subscriber sleeps as long as its poll after an empty one, and a
    record arriving meanwhile waits; ours turns the loop straight away."""
    import anyio

    async def no_sleep(seconds: float) -> None:
        raise AssertionError(f"slept {seconds}s after an empty poll")

    monkeypatch.setattr(anyio, "sleep", no_sleep)
    kafka = KafkaSettings(batch_wait_ms=300, max_poll_records=7)
    subscriber = prompt_batches(_batch_subscriber(kafka))
    consumer = _Consumer([{}, {"p0": ["a", "b"], "p1": ["c"]}])
    assert await subscriber.get_msg(consumer) == ()
    assert await subscriber.get_msg(consumer) == ("a", "b", "c")
    assert consumer.calls == [{"timeout_ms": 300, "max_records": 7}] * 2


def test_only_batch_subscribers() -> None:
    one_by_one = KafkaRouter().subscriber("t", **consumer_options(KafkaSettings(), group="g"))
    with pytest.raises(TypeError, match="not a batch subscriber"):
        prompt_batches(one_by_one)


def test_a_consumer_off_the_critical_path_polls_less_often() -> None:
    kafka = KafkaSettings(fetch_max_wait_ms=5, history_fetch_max_wait_ms=50)
    assert consumer_options(kafka, group="g")["fetch_max_wait_ms"] == 5
    slow = consumer_options(kafka, group="g", batch=True, fetch_max_wait_ms=50)
    assert slow["fetch_max_wait_ms"] == 50
    assert slow["group_id"] == f"{kafka.topic_prefix}.g"


async def test_batch_bodies_are_left_to_the_handler() -> None:
    """The handler decodes each record itself (``ConsumerGuard``); FastStream does not
    parse the bodies first."""
    from faststream.kafka import KafkaBroker, TestKafkaBroker

    from conveyor.runtime.inject import RawMessage

    broker = KafkaBroker()
    seen: list[tuple[Any, list[bytes]]] = []

    @broker.subscriber("t", **consumer_options(KafkaSettings(), group="g", batch=True))
    async def handle(msg: RawMessage) -> None:
        seen.append((await msg.decode(), [r.value for r in msg.raw_message]))

    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish(b'{"a": 1}', "t")
    assert seen == [(None, [b'{"a": 1}'])]


async def test_no_faststream_span_around_a_batch() -> None:
    """Batch handlers give each record its own span (ConsumerGuard.span); FastStream's
    span around the batch, linked to every record's sender, is left out. One-by-one
    subscribers keep FastStream's span."""
    from faststream.kafka import TestKafkaBroker
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from conveyor.runtime import create_broker

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    kafka = KafkaSettings()
    broker = create_broker(kafka, service="test", tracer_provider=provider)
    handled: list[str] = []

    @broker.subscriber("batched", **consumer_options(kafka, group="g", batch=True))
    async def batched(msg: Any) -> None:
        handled.append("batched")

    @broker.subscriber("single", **consumer_options(kafka, group="g"))
    async def single(msg: Any) -> None:
        handled.append("single")

    async with TestKafkaBroker(broker) as test_broker:
        await test_broker.publish(b"{}", "batched")
        await test_broker.publish(b"{}", "single")
    assert sorted(handled) == ["batched", "single"]
    consumed = [s.name for s in exporter.get_finished_spans() if s.name.endswith("process")]
    assert consumed == ["single process"]
