"""A step's state as saved on the run row: every field, and back."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from conveyor.scheduler._state import ItemState, StepState

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=8,
)
_items = st.builds(
    ItemState,
    status=st.sampled_from(["pending", "running", "succeeded", "failed"]),
    attempt=st.integers(0, 5),
    output=_json,
    error=st.none() | st.just({"type": "E", "message": "m"}),
    redeliveries=st.integers(0, 3),
)
_steps = st.builds(
    StepState,
    status=st.sampled_from(["pending", "running", "succeeded", "failed", "skipped"]),
    attempt=st.integers(0, 5),
    output=_json,
    error=st.none() | st.just({"type": "E", "message": "m"}),
    redeliveries=st.integers(0, 3),
    items=st.none() | st.lists(_items, max_size=3),
    values=st.none() | st.lists(_json, max_size=3),
    item_base=st.integers(0, 4),
)


@given(_steps)
def test_every_field_is_saved_and_read_back(step: StepState) -> None:
    saved: dict[str, Any] = step.to_json()
    assert saved == asdict(step)  # a field added to the dataclass must be saved too
    assert StepState.from_json(saved) == step


def test_saved_items_are_new_dicts() -> None:
    """Items are mutable objects: their saved form must not change when they do later."""
    step = StepState(items=[ItemState(status="running")])
    saved = step.to_json()
    assert step.items is not None
    step.items[0].status = "succeeded"
    assert saved["items"] == [asdict(ItemState(status="running"))]
