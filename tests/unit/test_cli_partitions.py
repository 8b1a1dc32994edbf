"""How many partitions the local stack gives its topics (``topic_partitions``)."""

from __future__ import annotations

import pytest

from conveyor.cli._startup import topic_partitions
from conveyor.cli.errors import BadInput


@pytest.mark.parametrize(
    ("runners", "expected"),
    [(1, 2), (2, 2), (3, 3), (4, 4), (8, 8)],
)
def test_on_the_embedded_broker_a_partition_per_runner_and_at_least_two(
    runners: int, expected: int
) -> None:
    assert topic_partitions(runners=runners, configured=None, embedded=True) == expected


def test_on_a_broker_of_the_users_the_services_default_stands() -> None:
    assert topic_partitions(runners=4, configured=None, embedded=False) is None


@pytest.mark.parametrize("embedded", [True, False])
def test_what_the_user_set_wins(embedded: bool) -> None:
    assert topic_partitions(runners=4, configured="6", embedded=embedded) == 6
    assert topic_partitions(runners=1, configured="1", embedded=embedded) == 1
    assert topic_partitions(runners=4, configured="", embedded=True) == 4  # empty: unset


@pytest.mark.parametrize(
    ("configured", "message"),
    [("six", "must be a number, not 'six'"), ("0", "at least 1, not 0"), ("-2", "not -2")],
)
def test_a_bad_setting_is_named(configured: str, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        topic_partitions(runners=2, configured=configured, embedded=True)
