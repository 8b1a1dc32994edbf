"""The per-partition commit tracker: only the contiguous finished prefix is ever committed."""

from __future__ import annotations

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from conveyor.runtime._offsets import OffsetTracker

TP = TopicPartition("t.steps.ready.http", 0)
TP1 = TopicPartition("t.steps.ready.http", 1)


def test_in_order_finishes_commit_each_next_offset() -> None:
    tracker = OffsetTracker()
    first, second = tracker.begin(TP, 10), tracker.begin(TP, 11)
    assert tracker.take_commits() == {}
    assert tracker.finish(first) is True
    assert tracker.take_commits() == {TP: 11}
    assert tracker.finish(second) is True
    assert tracker.take_commits() == {TP: 12}
    assert tracker.take_commits() == {}


def test_out_of_order_finishes_commit_only_the_contiguous_prefix() -> None:
    tracker = OffsetTracker()
    slots = [tracker.begin(TP, offset) for offset in range(5)]
    assert tracker.finish(slots[2]) is False
    assert tracker.finish(slots[3]) is False
    assert tracker.take_commits() == {}  # 0 and 1 still run: nothing may be committed
    assert tracker.finish(slots[0]) is True
    assert tracker.take_commits() == {TP: 1}  # not past 1, which is unfinished
    assert tracker.finish(slots[1]) is True
    assert tracker.take_commits() == {TP: 4}  # 1, then the finished 2 and 3
    assert tracker.pending(TP) == [4]
    tracker.finish(slots[4])
    assert tracker.take_commits() == {TP: 5}
    assert tracker.pending(TP) == []


def test_finishes_between_commits_are_merged() -> None:
    tracker = OffsetTracker()
    slots = [tracker.begin(TP, offset) for offset in range(3)]
    for slot in slots:
        tracker.finish(slot)
    assert tracker.take_commits() == {TP: 3}


def test_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    a0, b0, a1 = tracker.begin(TP, 0), tracker.begin(TP1, 7), tracker.begin(TP, 1)
    tracker.finish(a1)
    tracker.finish(b0)
    assert tracker.take_commits() == {TP1: 8}
    tracker.finish(a0)
    assert tracker.take_commits() == {TP: 2}


def test_gaps_in_offsets_commit_past_the_last_finished() -> None:
    tracker = OffsetTracker()  # compacted topics and transaction markers leave gaps
    first, second = tracker.begin(TP, 3), tracker.begin(TP, 9)
    tracker.finish(second)
    assert tracker.take_commits() == {}
    tracker.finish(first)
    assert tracker.take_commits() == {TP: 10}


def test_revoked_partition_hands_back_its_uncommitted_offset_then_is_forgotten() -> None:
    tracker = OffsetTracker()
    done, running = tracker.begin(TP, 0), tracker.begin(TP, 1)
    other = tracker.begin(TP1, 0)
    tracker.finish(done)
    assert tracker.revoke([TP]) == {TP: 1}  # committed while the partition is still ours
    assert tracker.finish(running) is False  # its result changes nothing now
    assert tracker.take_commits() == {}
    assert tracker.pending(TP) == []
    tracker.finish(other)
    assert tracker.take_commits() == {TP1: 1}


def test_revoke_hands_back_the_last_commit_point_even_if_taken_already() -> None:
    tracker = OffsetTracker()  # that commit may still be in flight when the partition goes
    tracker.finish(tracker.begin(TP, 0))
    tracker.begin(TP1, 0)
    assert tracker.take_commits() == {TP: 1}
    assert tracker.revoke([TP, TP1]) == {TP: 1}  # TP1 has nothing finished: nothing to commit
    assert tracker.revoke([TP]) == {}


def test_partition_delivered_again_starts_afresh() -> None:
    tracker = OffsetTracker()
    old = [tracker.begin(TP, offset) for offset in range(3)]
    tracker.finish(old[0])
    assert tracker.take_commits() == {TP: 1}
    # The partition came back (after a rebalance) and is delivered from offset 1 again.
    again = tracker.begin(TP, 1)
    assert tracker.pending(TP) == [1]
    assert tracker.finish(old[2]) is False
    assert tracker.finish(old[1]) is False  # the old delivery no longer moves commits
    assert tracker.take_commits() == {}
    tracker.finish(again)
    assert tracker.take_commits() == {TP: 2}


@given(st.permutations(range(12)))
def test_never_commits_past_an_unfinished_offset(order: list[int]) -> None:
    tracker = OffsetTracker()
    slots = {offset: tracker.begin(TP, 100 + offset) for offset in range(12)}
    finished: set[int] = set()
    committed = 100
    for offset in order:
        tracker.finish(slots[offset])
        finished.add(offset)
        commits = tracker.take_commits()
        prefix = 0
        while prefix in finished:
            prefix += 1
        if commits:
            committed = commits[TP]
            assert committed > 100
        assert committed == 100 + prefix  # exactly the contiguous finished prefix
    assert committed == 112
