"""The media runner's subscriber in memory, through FastStream's TestKafkaBroker."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
from faststream.kafka import TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

from conveyor.contracts import StepReady
from conveyor.media import create_service
from conveyor.media.settings import MediaSettings
from conveyor.runtime import KafkaSettings


@pytest.fixture
def media_root(tmp_path: Path) -> Path:
    subprocess.run(
        [
            *(imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error"),
            *("-f", "lavfi", "-i", "sine=frequency=440:duration=1", str(tmp_path / "a.wav")),
        ],
        check=True,
    )
    return tmp_path


async def test_probe_step_round_trip(topic_prefix: str, media_root: Path) -> None:
    kafka = KafkaSettings(topic_prefix=topic_prefix)
    settings = MediaSettings(
        root=media_root, ffprobe="off", artifact_dir=media_root.parent / "artifacts"
    )
    service = create_service(kafka=kafka, settings=settings)
    assert service.prober.mode == "ffmpeg"
    topics = kafka.topics
    completed: list[dict[str, Any]] = []
    dead: list[dict[str, Any]] = []

    @service.broker.subscriber(topics.steps_completed, topics.runs_events)
    async def collect(msg: KafkaMessage) -> None:
        completed.append(json.loads(msg.body))

    @service.broker.subscriber(topics.dlq)
    async def collect_dead(msg: KafkaMessage) -> None:
        dead.append(json.loads(msg.body))

    step = StepReady(
        run_id=uuid.uuid4(),
        pipeline="p",
        version=1,
        step_id="probe",
        attempt=1,
        kind="media.probe",
        config={"source": "{{ input.file }}"},
        context={"input": {"file": "a.wav"}},
    )
    async with TestKafkaBroker(service.broker) as broker:
        await broker.publish(step.model_dump_json().encode(), topics.ready("media.probe"))
        await broker.publish(b"\xff\xfe", topics.ready("media.probe"))
        await service.dispatcher.idle()  # the handler returns once the step started

    # StepStarted only if the probe took longer than the runner's announce_after_ms
    assert [e["type"] for e in completed] in (["StepCompleted"], ["StepStarted", "StepCompleted"])
    output = completed[-1]["output"]
    assert output["duration"] == 1.0
    assert output["streams"][0]["sample_rate"] == 44100
    [letter] = dead
    assert letter["consumer_group"] == f"{topic_prefix}.media"
