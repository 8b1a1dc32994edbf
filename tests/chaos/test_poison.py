"""Ten kinds of poison message, put on every partition of the topics the services read:
each is dead-lettered by every consumer group that reads it, lands in the recorder's error
log, and runs triggered right behind them on the same partitions still complete."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from conveyor.contracts import DeadLetter, Topics
from conveyor.runtime.guard import DEAD_LETTER_VALUE_BYTES, MAX_MESSAGE_BYTES
from tests.chaos.conftest import (
    ChaosStack,
    history_mismatches,
    read_topic,
    register_pipeline,
    wait_until,
)

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]

MARKER_HEADER = "x-chaos-marker"


@dataclass(frozen=True)
class Poison:
    kind: str
    topic: Callable[[Topics], str]
    body: Callable[[str], bytes]
    """The message for a marker (a JSON body carries it too; the header always does)."""
    groups: tuple[str, ...]
    """The consumer groups that read the topic and must dead-letter it."""
    reason: str
    """What the dead letter's reason must say."""
    every_partition: bool = True


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


POISONS = [
    Poison(
        "malformed JSON",
        lambda t: t.runs_requested,
        lambda m: b'{"pipeline": "' + m.encode() + b'", "input": {',
        ("scheduler",),
        "not JSON",
    ),
    Poison(
        "wrong schema",
        lambda t: t.pipelines,
        lambda m: _json({"type": "PipelineRegistered", "marker": m}),
        ("run-recorder",),
        "name: Field required",
    ),
    Poison(
        "unknown schema version",
        lambda t: t.runs_control,
        lambda m: _json(
            {"type": "CancelRun", "schema_version": 2, "run_id": str(uuid.uuid4()), "reason": m}
        ),
        ("scheduler", "run-recorder"),
        "schema_version",
    ),
    Poison(
        "oversized payload",
        lambda t: t.steps_completed,
        lambda m: _json(
            {
                "type": "StepCompleted",
                "run_id": str(uuid.uuid4()),
                "step_id": "big",
                "attempt": 1,
                "output": m + "x" * MAX_MESSAGE_BYTES,
            }
        ),
        ("scheduler", "run-recorder"),
        f"over the {MAX_MESSAGE_BYTES}-byte limit",
        every_partition=False,
    ),
    Poison(
        "unknown pipeline",
        lambda t: t.runs_requested,
        lambda m: _json({"pipeline": f"no-such-{m}", "input": {}}),
        ("scheduler",),
        "no pipeline named",
    ),
    Poison(
        "unknown step kind",
        lambda t: t.ready("transform"),
        lambda m: _json(
            {
                "type": "StepReady",
                "run_id": str(uuid.uuid4()),
                "pipeline": m,
                "version": 1,
                "step_id": "beam",
                "attempt": 1,
                "kind": "teleport",
            }
        ),
        ("step-runner",),
        "'teleport'",
    ),
    Poison(
        "missing run",
        lambda t: t.steps_completed,
        lambda m: _json(
            {
                "type": "StepCompleted",
                "run_id": str(uuid.uuid4()),
                "step_id": "ghost",
                "attempt": 1,
                "output": m,
            }
        ),
        ("scheduler",),  # the recorder keeps it: a result may be read before its run
        "does not exist",
    ),
    Poison(
        "wrong types",
        lambda t: t.runs_events,
        lambda m: _json({"type": "RunCompleted", "run_id": 42, "status": [m]}),
        ("run-recorder",),
        "run_id: UUID input should be",
    ),
    Poison("empty body", lambda t: t.ready("http"), lambda m: b"", ("step-runner",), "empty"),
    Poison(
        "binary garbage",
        lambda t: t.ready("media.probe"),
        lambda m: b"\xff\xfe\x00\x9c" + os.urandom(200),
        ("media",),
        "not JSON",
    ),
]


async def _produce_all(
    bootstrap: str, messages: list[tuple[str, int, bytes, bytes | None, str]]
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_request_size=4 << 20)
    await producer.start()
    try:
        for topic, partition, value, key, marker in messages:
            await producer.send_and_wait(
                topic,
                value,
                key=key,
                partition=partition,
                headers=[(MARKER_HEADER, marker.encode())],
            )
    finally:
        await producer.stop()


def test_ten_kinds_of_poison_are_dead_lettered_and_runs_behind_them_complete(
    chaos_stack: ChaosStack,
) -> None:
    s = chaos_stack.stack
    prefix = s.topics.prefix
    marker = uuid.uuid4().hex
    name = register_pipeline(s, chaos_stack.step_server.url, prefix="after-poison")

    messages, sent = [], {}
    for poison in POISONS:
        topic = poison.topic(s.topics)
        partitions = range(6) if poison.every_partition else range(1)
        for partition in partitions:
            body = poison.body(marker)
            tag = f"{marker}/{poison.kind}/{partition}"
            sent[tag] = body
            messages.append((topic, partition, body, name.encode(), tag))
    asyncio.run(_produce_all(s.bootstrap, messages))
    # Right behind the poison, on partitions that all carry some: ordinary runs.
    run_ids = [s.trigger(name, {"n": n}) for n in range(3)]

    expected = {
        (f"{marker}/{p.kind}/{partition}", f"{prefix}.{group}", p.topic(s.topics), partition)
        for p in POISONS
        for partition in (range(6) if p.every_partition else range(1))
        for group in p.groups
    }

    def letters_of(records: list[Any]) -> dict[tuple[str, str, str, int], DeadLetter]:
        found = {}
        for record in records:
            letter = DeadLetter.model_validate_json(record.value)
            tag = letter.headers.get(MARKER_HEADER, "")
            if tag.startswith(marker):
                key = (tag, letter.consumer_group, letter.source_topic, letter.partition)
                found[key] = letter
        return found

    records = read_topic(
        s.bootstrap, s.topics.dlq, until=lambda r: expected <= set(letters_of(r)), timeout=90
    )
    letters = letters_of(records)
    assert set(letters) == expected, sorted(expected ^ set(letters))

    by_kind = {p.kind: p for p in POISONS}
    for (tag, _group, _topic, _partition), letter in letters.items():
        kind = tag.split("/")[1]
        assert by_kind[kind].reason in letter.reason, (kind, letter.reason)
        kept = base64.b64decode(letter.value_b64)
        if kind == "oversized payload":
            assert kept == sent[tag][:DEAD_LETTER_VALUE_BYTES]
            assert f"keeps the first {DEAD_LETTER_VALUE_BYTES} of its" in letter.reason
        else:
            assert kept == sent[tag], kind  # byte for byte

    # The recorder files every dead letter, once, and lists it in its error log.
    ids = {str(letter.event_id) for letter in letters.values()}
    recorded = s.wait_for(
        "/dead-letters",
        lambda body: ids <= {d["event_id"] for d in body["items"]},
        limit=500,
        timeout=60,
    )["items"]
    assert len([d for d in recorded if d["event_id"] in ids]) == len(ids)
    errors = s.get("/errors", scope="dead_letter", limit=500).json()["items"]
    logged = {e["event_id"]: e for e in errors if e["event_id"] in ids}
    assert set(logged) == ids
    for letter in letters.values():
        entry = logged[str(letter.event_id)]
        assert (entry["type"], entry["message"]) == ("DeadLetter", letter.reason.split("\n")[0])

    # A trigger for an unknown pipeline fails its run too, for whoever holds the run id.
    unknown = s.get("/runs", pipeline=f"no-such-{marker}", limit=50).json()["items"]
    assert len(unknown) == 6
    assert {(r["status"], r["error"]["type"]) for r in unknown} == {("failed", "UnknownPipeline")}

    runs = [s.wait_for_run(run_id, timeout=90) for run_id in run_ids]
    assert [r["status"] for r in runs] == ["succeeded"] * 3, runs
    problems = history_mismatches(chaos_stack.database_url, run_ids)
    assert not problems, "\n".join(problems)
    wait_until(
        lambda: all(any(p.alive() for p in group) for group in s.services.values()),
        timeout=1,
        what="every service still running",
    )
