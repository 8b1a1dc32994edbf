"""media.probe on media made here with ffmpeg, with ffprobe and with the ffmpeg fallback."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
from faststream.kafka import KafkaBroker

from conveyor.contracts import StepReady
from conveyor.contracts.kinds import MediaProbeConfig
from conveyor.media.probe import MediaProber, find_ffmpeg, find_ffprobe
from conveyor.media.settings import MediaSettings
from conveyor.runtime import KafkaSettings
from conveyor.runtime.runner import StepControl, StepError, StepHarness

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def _make(args: list[str]) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "clips").mkdir()
    _make(
        [
            *("-f", "lavfi", "-i", "testsrc=duration=2:size=320x240:rate=25"),
            *("-f", "lavfi", "-i", "sine=frequency=440:duration=2"),
            *("-shortest", str(root / "clips" / "out.mp4")),
        ]
    )
    _make(
        [
            *("-f", "lavfi", "-i", "sine=frequency=220:duration=1"),
            *("-ac", "2", "-ar", "48000", str(root / "tone.wav")),
        ]
    )
    (root / "corrupt.mp4").write_bytes(random.Random(7).randbytes(64 * 1024))
    (root / "empty.mp4").write_bytes(b"")
    outside = tmp_path_factory.mktemp("outside") / "secret.mp4"
    shutil.copy(root / "clips" / "out.mp4", outside)
    (root / "escape.mp4").symlink_to(outside)
    (root / "inside-link.mp4").symlink_to(root / "clips" / "out.mp4")
    return root


MODES = ["ffprobe", "ffmpeg"]


@pytest.fixture(params=MODES)
def prober(request: pytest.FixtureRequest, media_root: Path) -> MediaProber:
    ffprobe = None
    if request.param == "ffprobe":
        ffprobe = find_ffprobe("auto")
        if ffprobe is None:
            pytest.skip("no ffprobe on PATH")
    return MediaProber(root=media_root, ffprobe=ffprobe, ffmpeg=FFMPEG, timeout_s=20)


async def _probe(prober: MediaProber, source: str) -> dict[str, Any]:
    return await prober(MediaProbeConfig(source=source), _step({"source": source}))


def _step(config: dict[str, Any], context: dict[str, Any] | None = None) -> StepReady:
    return StepReady(
        run_id=uuid.uuid4(),
        pipeline="p",
        version=1,
        step_id="probe",
        attempt=1,
        kind="media.probe",
        config=config,
        context=context or {},
    )


async def test_probe_video_with_audio(prober: MediaProber, media_root: Path) -> None:
    info = await _probe(prober, "clips/out.mp4")
    assert info["duration"] == pytest.approx(2.0, abs=0.1)
    assert "mp4" in info["format"]
    assert info["size"] == (media_root / "clips" / "out.mp4").stat().st_size
    assert isinstance(info["bit_rate"], int)
    assert info["bit_rate"] > 0
    video, audio = info["streams"]
    assert video == {
        "index": 0,
        "type": "video",
        "codec": "h264",
        "width": 320,
        "height": 240,
        "fps": 25.0,
        "sample_rate": None,
        "channels": None,
    }
    assert audio["type"] == "audio"
    assert audio["codec"] == "aac"
    assert (audio["sample_rate"], audio["channels"]) == (44100, 1)


async def test_probe_stereo_audio(prober: MediaProber) -> None:
    info = await _probe(prober, "tone.wav")
    assert info["duration"] == pytest.approx(1.0, abs=0.05)
    [audio] = info["streams"]
    assert (audio["type"], audio["codec"]) == ("audio", "pcm_s16le")
    assert (audio["sample_rate"], audio["channels"]) == (48000, 2)


async def test_modes_agree(media_root: Path) -> None:
    ffprobe = find_ffprobe("auto")
    if ffprobe is None:
        pytest.skip("no ffprobe on PATH")
    precise = await _probe(MediaProber(root=media_root, ffprobe=ffprobe, ffmpeg=FFMPEG), "tone.wav")
    fallback = await _probe(MediaProber(root=media_root, ffprobe=None, ffmpeg=FFMPEG), "tone.wav")
    assert precise["streams"] == fallback["streams"]
    assert precise["duration"] == pytest.approx(fallback["duration"], abs=0.01)


@pytest.mark.parametrize(
    "source",
    [
        "inside-link.mp4",
        "./clips/../clips/out.mp4",
        "{root}/clips/out.mp4",
        "file://{root}/clips/out.mp4",
        "file://localhost{root}/clips/out.mp4",
    ],
)
async def test_sources_inside_the_root(prober: MediaProber, media_root: Path, source: str) -> None:
    info = await _probe(prober, source.format(root=media_root))
    assert len(info["streams"]) == 2


@pytest.mark.parametrize(
    ("source", "error_type"),
    [
        ("../../etc/passwd", "PathOutsideRoot"),
        ("/etc/passwd", "PathOutsideRoot"),
        ("file:///etc/passwd", "PathOutsideRoot"),
        ("escape.mp4", "PathOutsideRoot"),
        ("clips/../../x.mp4", "PathOutsideRoot"),
        ("nothing-here.mp4", "MediaNotFound"),
        ("clips", "MediaNotFound"),
        ("-i", "InvalidMediaSource"),
        ("file://otherhost/x.mp4", "InvalidMediaSource"),
        ("s3://bucket/x.mp4", "InvalidMediaSource"),
    ],
)
async def test_sources_refused(prober: MediaProber, source: str, error_type: str) -> None:
    with pytest.raises(StepError) as caught:
        await _probe(prober, source)
    assert caught.value.type == error_type
    assert caught.value.retryable is False
    assert source in caught.value.message


@pytest.mark.parametrize("source", ["corrupt.mp4", "empty.mp4"])
async def test_corrupt_input_is_a_media_error(prober: MediaProber, source: str) -> None:
    with pytest.raises(StepError) as caught:
        await _probe(prober, source)
    assert caught.value.type == "MediaError"
    assert caught.value.retryable is False
    assert caught.value.message.startswith(f"{source}: ")
    assert "Invalid data" in caught.value.message or "no " in caught.value.message


def _children_running(names: tuple[str, ...]) -> list[str]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and comm.startswith(names):
            found.append(comm)
    return found


async def test_probe_timeout_kills_the_process(prober: MediaProber, media_root: Path) -> None:
    hasty = MediaProber(
        root=media_root, ffprobe=prober.ffprobe, ffmpeg=prober.ffmpeg, timeout_s=0.001
    )
    with pytest.raises(StepError) as caught:
        await _probe(hasty, "clips/out.mp4")
    assert caught.value.type == "MediaTimeout"
    assert caught.value.retryable is True
    assert _children_running(("ffprobe", "ffmpeg")) == []


async def test_through_the_harness(prober: MediaProber) -> None:
    harness = StepHarness(
        broker=KafkaBroker("127.0.0.1:1"),
        topics=KafkaSettings(topic_prefix="unit").topics,
        executors={"media.probe": prober},
    )
    ok = json.loads(
        await harness.run_step(
            _step({"source": "{{ input.video }}"}, {"input": {"video": "tone.wav"}})
        )
    )
    assert ok["type"] == "StepCompleted"
    assert ok["input"] == {"source": "tone.wav"}
    assert ok["output"]["streams"][0]["channels"] == 2
    failed = json.loads(await harness.run_step(_step({"source": "../../etc/passwd"})))
    assert failed["type"] == "StepFailed"
    assert failed["error"]["type"] == "PathOutsideRoot"
    assert "../../etc/passwd" in failed["error"]["message"]


def test_ffprobe_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVEYOR_FFPROBE", "off")
    monkeypatch.setenv("CONVEYOR_MEDIA_ROOT", str(tmp_path))
    settings = MediaSettings()
    assert settings.root == tmp_path
    assert find_ffprobe(settings.ffprobe) is None
    assert MediaSettings(ffprobe="auto").ffprobe == "auto"
    assert Path(find_ffmpeg(settings.ffmpeg)).exists()
    with pytest.raises(ValueError, match="no such executable"):
        find_ffprobe("/nonexistent/ffprobe")


@pytest.fixture
def hanging_tool(tmp_path: Path) -> tuple[str, Path]:
    """A stand-in for ffprobe that never answers and has a child of its own: whatever ends
    a probe must end both. It writes both pids to the directory returned."""
    pids = tmp_path / "pids"
    pids.mkdir()
    tool = tmp_path / "ffprobe"
    tool.write_text(
        "#!/bin/sh\n"
        f"echo $$ > {pids}/tool.tmp && mv {pids}/tool.tmp {pids}/tool\n"
        "sleep 30 &\n"
        f"echo $! > {pids}/child.tmp && mv {pids}/child.tmp {pids}/child\n"
        "wait\n"
    )
    tool.chmod(0o755)
    return str(tool), pids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie is dead, waiting to be reaped


async def _pids(pids: Path) -> list[int]:
    for _ in range(300):
        if (pids / "tool").exists() and (pids / "child").exists():
            return [int((pids / name).read_text()) for name in ("tool", "child")]
        await asyncio.sleep(0.01)
    raise AssertionError("the tool did not start")


async def _all_dead(pids: list[int]) -> bool:
    for _ in range(200):
        if not any(_alive(pid) for pid in pids):
            return True
        await asyncio.sleep(0.01)
    return False


def _hanging_harness(tool: str, media_root: Path) -> StepHarness:
    prober = MediaProber(root=media_root, ffprobe=find_ffprobe(tool), ffmpeg=FFMPEG)
    return StepHarness(
        broker=KafkaBroker("127.0.0.1:1"),
        topics=KafkaSettings(topic_prefix="unit").topics,
        executors={"media.probe": prober},
    )


async def test_step_timeout_kills_the_tool_and_its_children(
    hanging_tool: tuple[str, Path], media_root: Path
) -> None:
    tool, pids = hanging_tool
    harness = _hanging_harness(tool, media_root)
    step = _step({"source": "tone.wav"}).model_copy(update={"timeout_s": 0.5})
    began = time.monotonic()
    result = json.loads(await harness.run_step(step))
    assert result["error"]["type"] == "StepTimeout"
    assert time.monotonic() - began < 3  # not held up by a child that still has the pipes
    running = await _pids(pids)
    assert await _all_dead(running), f"left behind: {[p for p in running if _alive(p)]}"


async def test_cancelled_run_kills_the_tool_and_its_children(
    hanging_tool: tuple[str, Path], media_root: Path
) -> None:
    tool, pids = hanging_tool
    harness = _hanging_harness(tool, media_root)
    control = StepControl()
    task = asyncio.create_task(harness.run_step(_step({"source": "tone.wav"}), control=control))
    running = await _pids(pids)
    assert all(_alive(pid) for pid in running)
    control.cancelled, control.cancel_reason = True, "not needed"
    task.cancel()  # what the dispatcher does on CancelRun
    began = time.monotonic()
    result = json.loads(await task)
    assert time.monotonic() - began < 2
    assert result["error"]["type"] == "Cancelled"
    assert result["error"]["message"] == "the run was cancelled: not needed"
    assert await _all_dead(running), f"left behind: {[p for p in running if _alive(p)]}"


async def test_shutdown_cancel_kills_the_tool_and_publishes_nothing(
    hanging_tool: tuple[str, Path], media_root: Path
) -> None:
    tool, pids = hanging_tool
    harness = _hanging_harness(tool, media_root)
    task = asyncio.create_task(
        harness.run_step(_step({"source": "tone.wav"}), control=StepControl())
    )
    running = await _pids(pids)
    task.cancel()  # the drain gave up: no run was cancelled, so no result
    began = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - began < 2
    assert await _all_dead(running), f"left behind: {[p for p in running if _alive(p)]}"
