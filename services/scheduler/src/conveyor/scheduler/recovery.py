"""Recovery from a broker that lost its data, run once at start before anything is consumed.

The embedded broker keeps everything in memory: when it restarts, the step-ready events of
attempts in flight are gone, and so are results nobody had read yet. Nothing would ever
answer those attempts, and a step without a timeout has no deadline to notice. The sign is
the scheduler's own consumer group: with runs in flight it must have committed offsets, so
when the broker knows none, it lost them. Every attempt in flight then gets a deadline due
now, and the timer loop dispatches it again as if its runner had vanished (counted against
``MAX_REDELIVERIES``; results are deduplicated per attempt, so an attempt answered twice
counts once). A broker that keeps its data (Apache Kafka) never triggers this.
"""

from __future__ import annotations

import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import select

from conveyor.runtime import KafkaSettings
from conveyor.scheduler import domain, tables
from conveyor.scheduler.scheduling import Scheduler

__all__ = ["group_has_offsets", "recover_lost_dispatches", "redispatch_in_flight"]

log = logging.getLogger("conveyor.scheduler.recovery")

GROUP = "scheduler"


async def group_has_offsets(kafka: KafkaSettings, *, group: str, topics: list[str]) -> bool:
    """Whether ``group`` has a committed offset on any partition of ``topics``."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        client_id="conveyor-scheduler-recovery",
    )
    await consumer.start()
    try:
        await consumer.topics()  # fresh metadata
        for topic in topics:
            for partition in consumer.partitions_for_topic(topic) or ():
                if await consumer.committed(TopicPartition(topic, partition)) is not None:
                    return True
        return False
    finally:
        await consumer.stop()


async def redispatch_in_flight(scheduler: Scheduler) -> int:
    """A deadline due now for every attempt in flight; how many there were."""
    r = tables.runs
    count = 0
    async with scheduler.unit_of_work() as uow:
        run_ids = (
            await uow.conn.scalars(select(r.c.id).where(r.c.status.in_(("running", "parked"))))
        ).all()
        now = scheduler.now()
        for run_id in run_ids:
            state = await uow.load_run(run_id)
            if state is None:
                continue
            for step_id, attempt, item_index in domain.in_flight(state):
                await uow.add_timer(
                    kind="deadline",
                    run_id=run_id,
                    step_id=step_id,
                    attempt=attempt,
                    item_index=item_index,
                    due_at=now,
                )
                count += 1
        await uow.commit()
    return count


async def recover_lost_dispatches(scheduler: Scheduler, kafka: KafkaSettings) -> None:
    """Dispatch again what was in flight when the broker lost its data (see above)."""
    topics = kafka.topics
    watched = [topics.runs_requested, topics.steps_completed, topics.runs_control]
    if await group_has_offsets(kafka, group=kafka.group(GROUP), topics=watched):
        return
    count = await redispatch_in_flight(scheduler)
    if count:
        log.warning(
            "the broker has no offsets of consumer group %s: it lost its data (a restart of "
            "the embedded broker?); dispatching the %d attempt(s) in flight again",
            kafka.group(GROUP),
            count,
        )
