"""The broker floor: a Conveyor run's hops on the embedded broker with no work at all.

A 5-step Conveyor run crosses the broker 12 times: the trigger to the scheduler, then for
each step StepReady to a runner and its result back, then RunCompleted to the client.
Here two relay processes play the scheduler and a runner: raw aiokafka, no database, no
pipeline, nothing but receive and send, with the services' fetch wait (the client
listens with 1 ms, as the bench's client does). Its latency is what the broker alone
costs such a run; Conveyor's latency minus this is what Conveyor itself adds.

``python bench/floor.py relay BOOTSTRAP ROLE FETCH_WAIT_MS PREFIX`` runs one relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from typing import Any

STEPS = 5
HOPS = 2 * STEPS + 2
PARTITIONS = 2  # what the local stack creates on the embedded broker for 2 runners


def _topics(prefix: str) -> tuple[str, str, str]:
    """(to the scheduler, to the runner, to the client)."""
    return f"{prefix}.scheduler", f"{prefix}.runner", f"{prefix}.done"


async def _relay(bootstrap: str, role: str, fetch_wait_ms: int, prefix: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    to_scheduler, to_runner, done = _topics(prefix)
    consumer = AIOKafkaConsumer(
        to_scheduler if role == "scheduler" else to_runner,
        bootstrap_servers=bootstrap,
        group_id=f"{prefix}.{role}",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_wait_ms,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    await consumer.start()
    await producer.start()
    try:
        async for record in consumer:
            message = json.loads(record.value)
            if role == "runner":
                message["step"] += 1
                target = to_scheduler
            else:
                target = done if message["step"] == STEPS else to_runner
            await producer.send(target, json.dumps(message).encode(), key=record.key)
    finally:
        await producer.stop()
        await consumer.stop()


async def positioned(consumer: Any) -> None:
    """Wait (up to 10 s) for ``consumer``'s assignment and its positions, so that a
    message sent after this is one it will see (it reads from the latest offset)."""
    for _ in range(200):
        if consumer.assignment():
            break
        await asyncio.sleep(0.05)
    for tp in consumer.assignment():
        await consumer.position(tp)


async def _drive(bootstrap: str, prefix: str, runs: int) -> list[float]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    to_scheduler, _to_runner, done = _topics(prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, PARTITIONS, 1) for t in _topics(prefix)], validate_only=False
        )
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
    listener = AIOKafkaConsumer(
        done, bootstrap_servers=bootstrap, auto_offset_reset="latest", fetch_max_wait_ms=1
    )
    await producer.start()
    await listener.start()
    try:
        await positioned(listener)

        async def one(within_s: float) -> float:
            run_id = str(uuid.uuid4())
            sent = time.perf_counter()
            await producer.send_and_wait(
                to_scheduler,
                json.dumps({"run_id": run_id, "step": 0}).encode(),
                key=run_id.encode(),
            )
            deadline = time.monotonic() + within_s
            while time.monotonic() < deadline:
                for records in (await listener.getmany(timeout_ms=100)).values():
                    if any(json.loads(r.value)["run_id"] == run_id for r in records):
                        return (time.perf_counter() - sent) * 1000
            raise SystemExit(f"bench floor: a run did not come back in {within_s:.0f} s")

        await one(60)  # the relays' groups join while this one waits
        for _ in range(5):
            await one(10)
        return [await one(10) for _ in range(runs)]
    finally:
        await listener.stop()
        await producer.stop()


def broker_floor(runs: int, fetch_wait_ms: int = 5) -> list[float]:
    """Latencies (ms) of ``runs`` relay runs, one after another, on a broker of their own."""
    from conveyor.cli.stack import start_broker

    broker = start_broker()
    prefix = f"floor{uuid.uuid4().hex[:6]}"
    relays = [
        subprocess.Popen(
            [sys.executable, __file__, "relay", broker.bootstrap, role, str(fetch_wait_ms), prefix]
        )
        for role in ("scheduler", "runner")
    ]
    try:
        return asyncio.run(_drive(broker.bootstrap, prefix, runs))
    finally:
        for relay in relays:
            relay.terminate()
        for relay in relays:
            with contextlib.suppress(subprocess.TimeoutExpired):
                relay.wait(10)
            if relay.poll() is None:
                relay.kill()
        broker.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["relay"]:
        bootstrap, role, wait, prefix = sys.argv[2:6]
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_relay(bootstrap, role, int(wait), prefix))
    else:
        import statistics

        latencies = broker_floor(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
        print(f"broker floor, {HOPS} hops: p50 {statistics.median(latencies):.1f} ms")
