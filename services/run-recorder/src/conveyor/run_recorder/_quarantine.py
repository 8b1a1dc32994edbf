"""The guard for messages read from the DLQ topic itself.

The recorder consumes ``conveyor.dlq``. If a message there could not be decoded (or kept
failing to project) and were dead-lettered like any other, it would land back on the very
topic it came from, be read again, fail again: a loop. Such a message is logged and
skipped instead; its bytes stay on the topic for whoever wants to look.
"""

from __future__ import annotations

import logging
from typing import Any

from conveyor.runtime.guard import ConsumerGuard

__all__ = ["DeadLetterQueueGuard"]

log = logging.getLogger("conveyor.run_recorder.dlq")


class DeadLetterQueueGuard(ConsumerGuard):  # type: ignore[misc,unused-ignore]
    """A ``ConsumerGuard`` whose give-up action is to log and skip, never to publish."""

    async def dead_letter(self, record: Any, reason: str, *, details: str | None = None) -> None:
        log.error(
            "skipping unrecordable message %s[%s]@%s from the dead-letter topic: %s%s",
            record.topic,
            record.partition,
            record.offset,
            reason,
            f"\n{details}" if details else "",
        )
