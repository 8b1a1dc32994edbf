"""Which offsets a runner may commit while several steps of one partition run at once.

Steps finish in any order, but a committed offset says "everything before this is done":
committing past a step that is still running would lose it if the runner died. So each
partition keeps its messages in arrival order and commits only the contiguous finished
prefix: the lowest unfinished offset, or the highest finished one plus one.

Pure bookkeeping, no I/O: the dispatcher begins a slot when it takes a message, finishes
it once the step's result is acknowledged (or the message is dead-lettered), and commits
what ``take_commits`` hands out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from aiokafka import TopicPartition

__all__ = ["OffsetSlot", "OffsetTracker"]


class _Lane:
    """One partition's messages in arrival order, from one uninterrupted delivery."""

    __slots__ = ("commit_point", "last_begun", "pending", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.pending: deque[OffsetSlot] = deque()
        self.last_begun = -1
        self.commit_point: int | None = None


class OffsetSlot:
    """A message taken from a partition; ``done`` once its result is safe."""

    __slots__ = ("_lane", "done", "offset")

    def __init__(self, lane: _Lane, offset: int) -> None:
        self._lane = lane
        self.offset = offset
        self.done = False

    @property
    def tp(self) -> TopicPartition:
        return self._lane.tp

    def __repr__(self) -> str:
        state = "done" if self.done else "pending"
        return f"<OffsetSlot {self.tp.topic}[{self.tp.partition}]@{self.offset} {state}>"


class OffsetTracker:
    """Per partition: offsets taken, offsets finished, and the offset safe to commit."""

    __slots__ = ("_dirty", "_lanes")

    def __init__(self) -> None:
        self._lanes: dict[TopicPartition, _Lane] = {}
        self._dirty: set[TopicPartition] = set()

    def begin(self, tp: TopicPartition, offset: int) -> OffsetSlot:
        """Record that the message at ``offset`` of ``tp`` was taken (in arrival order)."""
        lane = self._lanes.get(tp)
        if lane is None or offset <= lane.last_begun:
            # The partition is new to us, or it is delivered again from an earlier offset
            # (it came back after a rebalance, from its committed offset): a fresh lane.
            # Slots of the old lane no longer move this partition's commits.
            lane = self._lanes[tp] = _Lane(tp)
            self._dirty.discard(tp)
        lane.last_begun = offset
        slot = OffsetSlot(lane, offset)
        lane.pending.append(slot)
        return slot

    def finish(self, slot: OffsetSlot) -> bool:
        """Mark ``slot`` done; whether its partition now has a new offset to commit."""
        slot.done = True
        lane = slot._lane
        if self._lanes.get(lane.tp) is not lane:
            return False  # revoked, or superseded by a redelivery
        advanced = False
        pending = lane.pending
        while pending and pending[0].done:
            lane.commit_point = pending.popleft().offset + 1
            advanced = True
        if advanced:
            self._dirty.add(lane.tp)
        return advanced

    def take_commits(self) -> dict[TopicPartition, int]:
        """The offsets to commit since the last call: ``{partition: next offset to read}``."""
        commits: dict[TopicPartition, int] = {}
        for tp in self._dirty:
            point = self._lanes[tp].commit_point
            if point is not None:
                commits[tp] = point
        self._dirty.clear()
        return commits

    def revoke(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Forget partitions the consumer is losing; the offsets to commit before it does.

        Every lane's commit point is handed back, committed already or not: a commit in
        flight may not land before the partition is gone, and committing twice is harmless.
        Steps of those partitions may still finish: their slots then change nothing, and
        the partitions' new owner delivers the unfinished messages again.
        """
        commits: dict[TopicPartition, int] = {}
        for tp in tps:
            lane = self._lanes.pop(tp, None)
            if lane is not None and lane.commit_point is not None:
                commits[tp] = lane.commit_point
            self._dirty.discard(tp)
        return commits

    def pending(self, tp: TopicPartition) -> list[int]:
        """Offsets of ``tp`` taken and not yet committable (finished or not)."""
        lane = self._lanes.get(tp)
        return [slot.offset for slot in lane.pending] if lane else []

    def __repr__(self) -> str:
        lanes = ", ".join(
            f"{tp.topic}[{tp.partition}]: commit {lane.commit_point}, {len(lane.pending)} pending"
            for tp, lane in self._lanes.items()
        )
        return f"<OffsetTracker {lanes}>"
