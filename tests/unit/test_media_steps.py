"""The media executors in process, with real ffmpeg and a local artifact store: a cancelled
run kills ffmpeg's process group, scratch directories never outlive their step, inputs
that cannot work fail with the reason."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
from faststream.kafka import KafkaBroker

from conveyor.contracts import StepReady
from conveyor.media.artifacts import LocalArtifactStore
from conveyor.media.executors import MediaSteps
from conveyor.media.probe import MediaProber
from conveyor.media.sources import SourceResolver
from conveyor.runtime import KafkaSettings
from conveyor.runtime.runner import StepControl, StepHarness

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    subprocess.run(
        [
            *(FFMPEG, "-hide_banner", "-loglevel", "error", "-y"),
            *("-f", "lavfi", "-i", "testsrc=duration=1:size=160x90:rate=25"),
            *("-pix_fmt", "yuv420p", str(root / "silent.mp4")),
        ],
        check=True,
    )
    (root / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture
async def harness(root: Path, tmp_path: Path) -> tuple[StepHarness, Path]:
    store = LocalArtifactStore(tmp_path / "artifacts")
    await store.prepare()
    resolver = SourceResolver(root=root, store=store, max_download_bytes=1 << 20, http_timeout_s=5)
    work = tmp_path / "work"
    prober = MediaProber(root=root, ffprobe=None, ffmpeg=FFMPEG, resolver=resolver, work_dir=work)
    steps = MediaSteps(prober=prober, resolver=resolver, store=store, ffmpeg=FFMPEG, work_dir=work)
    harness = StepHarness(
        broker=KafkaBroker("127.0.0.1:1"),
        topics=KafkaSettings(topic_prefix="unit").topics,
        executors=steps.executors(),
    )
    return harness, work


def _step(kind: str, config: dict[str, Any]) -> StepReady:
    return StepReady(
        run_id=uuid.uuid4(), pipeline="p", version=1, step_id="s", attempt=1, kind=kind,
        config=config,
    )  # fmt: skip


def _ffmpeg_children() -> list[tuple[int, int]]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == os.getpid() and comm.startswith("ffmpeg") and fields[0] != "Z":
            found.append((int(stat.parent.name), int(fields[2])))
    return found


async def test_a_cancelled_run_kills_ffmpeg_and_removes_the_scratch_directory(
    harness: tuple[StepHarness, Path], root: Path
) -> None:
    runner, work = harness
    endless = {"images": ["silent.mp4"], "seconds_per_image": 600, "width": 1920, "height": 1080}
    control = StepControl()
    task = asyncio.create_task(runner.run_step(_step("media.slideshow", endless), control=control))
    children: list[tuple[int, int]] = []
    for _ in range(1000):
        children = _ffmpeg_children()
        if children:
            break
        await asyncio.sleep(0.01)
    [(pid, group)] = children
    assert pid == group  # its own process group
    assert len(list(work.iterdir())) == 1  # the step's scratch directory
    control.cancelled, control.cancel_reason = True, "changed my mind"
    task.cancel()  # what the dispatcher does on CancelRun
    result = json.loads(await task)
    assert result["error"]["type"] == "Cancelled"
    assert _ffmpeg_children() == []
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)
    assert list(work.iterdir()) == []


@pytest.mark.parametrize(
    ("kind", "config", "error_type", "message"),
    [
        ("media.extract_audio", {"source": "silent.mp4"}, "MediaError", "no audio stream"),
        ("media.thumbnail", {"source": "silent.mp4", "at": 5}, "MediaError", "past the end"),
        ("media.transcode", {"source": "pic.png"}, "MediaError", "pic.png: "),
        ("media.slideshow", {"images": ["pic.png"]}, "MediaError", "pic.png"),
        ("media.concat", {"sources": "not a list"}, "ConfigError", "sources"),
        ("media.trim", {"source": "silent.mp4", "start": 3}, "MediaError", "past the end"),
        (
            "media.transcode",
            {"source": "silent.mp4", "preset": "mp3"},
            "MediaError",
            "no audio stream for the mp3 preset",
        ),
    ],
)
async def test_inputs_that_cannot_work_fail_with_the_reason(
    harness: tuple[StepHarness, Path], kind: str, config: dict[str, Any], error_type: str,
    message: str,
) -> None:  # fmt: skip
    runner, work = harness
    result = json.loads(await runner.run_step(_step(kind, config)))
    assert result["type"] == "StepFailed"
    assert result["error"]["type"] == error_type, result["error"]
    assert message in result["error"]["message"]
    assert str(work) not in result["error"]["message"]  # scratch paths never show
    assert not work.exists() or list(work.iterdir()) == []
