"""The peer: the same 5-step no-op workload as Celery chains over the local Redis.

Started by ``bench/run.py`` as ``celery -A celery_app worker --pool prefork -c 2``.
"""

from __future__ import annotations

import os

from celery import Celery

BROKER = os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/14")

app = Celery("bench", broker=BROKER, backend=BROKER)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=4,
    task_acks_late=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.step")
def step(previous: object = None, index: int = 0) -> dict[str, object]:
    """A no-op step, like the transform steps of the Conveyor workload."""
    return {"step": index, "previous": previous is not None}
