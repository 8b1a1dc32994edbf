"""Every media kind end to end: pipelines through the scheduler, the media service running
real ffmpeg as its own process, the recorder; outputs found in the artifact store and
probed again here. Also a corrupt file, a path traversal, a timeout that must leave no
ffmpeg behind, and three media processes sharing a batch of jobs.

The media is made here with ffmpeg's lavfi sources, tiny (160x90, 2 s) to keep it fast.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import murmur2

from conveyor.contracts import run_id_for_request
from conveyor.media.probe import MediaProber, find_ffprobe
from tests.e2e.conftest import Stack, launch_stack

pytestmark = pytest.mark.e2e

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
PARTITIONS = 6  # CONVEYOR_KAFKA_PARTITIONS' default


def _make(args: list[str]) -> None:
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media_stack(
    kafka_bootstrap: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The scheduler, three media processes (one consumer group) and the recorder (no
    step-runner: nothing here needs it), with media made for the tests in the media root."""
    work = tmp_path_factory.mktemp("media-stack")
    root = work / "media"
    root.mkdir()
    _make(
        [
            *("-f", "lavfi", "-i", "testsrc=duration=2:size=160x90:rate=25"),
            *("-f", "lavfi", "-i", "sine=frequency=440:duration=2"),
            *("-shortest", "-pix_fmt", "yuv420p", str(root / "clip.mp4")),
        ]
    )
    _make(["-f", "lavfi", "-i", "testsrc=size=160x90", "-frames:v", "1", str(root / "pic.png")])
    (root / "corrupt.mp4").write_bytes(random.Random(5).randbytes(32 * 1024))
    outside = work / "outside.mp4"
    outside.write_bytes((root / "clip.mp4").read_bytes())
    (root / "escape.mp4").symlink_to(outside)
    with launch_stack(
        kafka_bootstrap=kafka_bootstrap,
        database_url=database_url,
        work=work,
        runners=("media", "media", "media"),
        # ffmpeg keeps both cores busy: a member must not be thrown out of the group for a
        # heartbeat that came a second late (the other tests' 2 s would allow it)
        extra_env={
            "CONVEYOR_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "CONVEYOR_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        },
    ) as s:
        yield s
        # The media processes stop at once, not one after another; each must stop cleanly.
        media = [p.process for p in s.services["media"] if p.process and p.alive()]
        for process in media:
            process.send_signal(signal.SIGTERM)
        assert [process.wait(35) for process in media] == [0] * len(media), s.tail(60)


def _artifact(stack: Stack, ref: dict[str, Any]) -> Path:
    """The file in the stack's local artifact store (launch_stack puts it beside media/)."""
    sha = ref["sha256"]
    path = stack.media_root.parent / "artifacts" / "sha256" / sha[:2] / sha
    assert path.is_file(), f"{ref['uri']} is not in the store at {path}"
    return path


def _probe(path: Path) -> dict[str, Any]:
    prober = MediaProber(root=path.parent, ffprobe=find_ffprobe(), ffmpeg=FFMPEG)
    return asyncio.run(prober.probe(path, size=path.stat().st_size, source=path.name))


def _streams(info: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [s for s in info["streams"] if s["type"] == kind]


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


EVERY_KIND = """
name: {name}
steps:
  - {{id: probe, type: media.probe, needs: [], with: {{source: clip.mp4}}}}
  - {{id: small, type: media.transcode, needs: [],
     with: {{source: clip.mp4, preset: webm-vp9, resolution: 144p}}}}
  - {{id: thumb, type: media.thumbnail, needs: [small],
     with: {{source: "{{{{ steps.small.output }}}}", at: "50%", width: 80}}}}
  - {{id: sound, type: media.extract_audio, needs: [], with: {{source: clip.mp4, preset: mp3}}}}
  - {{id: cut, type: media.trim, needs: [], with: {{source: clip.mp4, start: 0.5, duration: 1}}}}
  - {{id: joined, type: media.concat, needs: [cut],
     with: {{sources: ["{{{{ steps.cut.output }}}}", clip.mp4]}}}}
  - id: card
    type: media.render_card
    needs: []
    with:
      title: "It's \\"quoted\\"; a:b [0:v] -vf x=1"
      text: "--help\\n%{{pts}} \\\\ '"
      width: 160
      height: 90
      format: mp4
      duration: 1
  - {{id: still, type: media.render_card, needs: [],
     with: {{text: "a still card", width: 160, height: 90, background: "#0f766e"}}}}
  - {{id: show, type: media.slideshow, needs: [still],
     with: {{images: ["{{{{ steps.still.output }}}}", pic.png], seconds_per_image: 0.5,
            width: 160, height: 90, audio: {{generate: sine, frequency: 330}}}}}}
  - {{id: wave, type: media.waveform, needs: [sound],
     with: {{source: "{{{{ steps.sound.output.uri }}}}", width: 160, height: 40,
            background: "#000000"}}}}
"""


def test_every_media_kind_runs_end_to_end_and_its_outputs_probe_right(
    media_stack: Stack,
) -> None:
    name = _name("every-kind")
    media_stack.register(EVERY_KIND.format(name=name))
    run = media_stack.wait_for_run(media_stack.trigger(name), timeout=120)
    assert run["status"] == "succeeded", run
    steps = {s["step_id"]: s for s in run["steps"]}
    assert all(s["attempt"] == 1 for s in run["steps"])
    out = {step_id: s["output"] for step_id, s in steps.items()}

    probe = out["probe"]
    assert probe["duration"] == pytest.approx(2.0, abs=0.1)
    assert {s["type"] for s in probe["streams"]} == {"video", "audio"}

    def check(step_id: str, *, duration: float | None, size: tuple[int, int] | None) -> Any:
        ref = out[step_id]
        assert ref["uri"] == f"artifact://sha256/{ref['sha256']}"
        info = _probe(_artifact(media_stack, ref))
        assert info["size"] == ref["size"]
        if duration is not None:
            assert info["duration"] == pytest.approx(duration, abs=0.15), step_id
            assert ref["duration"] == pytest.approx(duration, abs=0.15), step_id
        if size is not None:
            [video] = _streams(info, "video")
            assert (video["width"], video["height"]) == size, step_id
            assert (ref["width"], ref["height"]) == size, step_id
        assert ref["codecs"] == [s["codec"] for s in info["streams"]], step_id
        return info

    small = check("small", duration=2.0, size=(256, 144))
    assert out["small"]["mime"] == "video/webm"
    assert [s["codec"] for s in small["streams"]] == ["vp9", "opus"]

    check("thumb", duration=None, size=(80, 46))
    assert (out["thumb"]["mime"], out["thumb"]["codecs"], out["thumb"]["at"]) == (
        "image/png",
        ["png"],
        pytest.approx(1.0, abs=0.05),
    )

    sound = check("sound", duration=2.0, size=None)
    assert [s["codec"] for s in sound["streams"]] == ["mp3"]

    cut = check("cut", duration=1.0, size=(160, 90))
    assert [s["codec"] for s in cut["streams"]] == ["h264", "aac"]

    joined = check("joined", duration=3.0, size=(160, 90))
    assert [s["codec"] for s in joined["streams"]] == ["h264", "aac"]
    assert out["joined"]["clips"] == 2

    card = check("card", duration=1.0, size=(160, 90))
    assert [s["codec"] for s in card["streams"]] == ["h264"]
    assert steps["card"]["input"]["title"] == 'It\'s "quoted"; a:b [0:v] -vf x=1'

    check("still", duration=None, size=(160, 90))
    assert out["still"]["mime"] == "image/png"

    show = check("show", duration=1.0, size=(160, 90))
    assert [s["codec"] for s in show["streams"]] == ["h264", "aac"]

    check("wave", duration=None, size=(160, 40))

    # ffmpeg's progress was reported while the steps ran
    assert steps["joined"]["progress_message"] == "joining 2 clips"
    assert steps["joined"]["progress"] is not None


FAILING = """
name: {name}
input: {{file: {{type: string}}}}
steps:
  - id: convert
    type: media.transcode
    retry: {{max_attempts: 1}}
    with: {{source: "{{{{ input.file }}}}", preset: mp4-h264}}
"""


@pytest.mark.parametrize(
    ("source", "error_type", "fragment"),
    [
        ("corrupt.mp4", "MediaError", "corrupt.mp4: "),
        ("../../etc/passwd", "PathOutsideRoot", "outside the media root"),
        ("escape.mp4", "PathOutsideRoot", "outside the media root"),
        ("-i", "InvalidMediaSource", "must not start with '-'"),
    ],
)
def test_bad_sources_fail_the_step_with_a_clear_error(
    media_stack: Stack, source: str, error_type: str, fragment: str
) -> None:
    name = _name("bad-source")
    media_stack.register(FAILING.format(name=name))
    run = media_stack.wait_for_run(media_stack.trigger(name, {"file": source}), timeout=60)
    assert run["status"] == "failed", run
    [step] = run["steps"]
    error = step["error"]
    assert (error["type"], error["retryable"]) == (error_type, False), error
    assert fragment in error["message"]
    assert "Traceback" not in (error.get("traceback") or "")
    if source == "corrupt.mp4":
        assert "Invalid data" in error["message"]


def _ffmpeg_children(parent: int) -> list[tuple[int, int]]:
    """(pid, process group) of each ffmpeg process whose parent is ``parent``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[1]) == parent and comm.startswith("ffmpeg") and fields[0] != "Z":
            found.append((int(stat.parent.name), int(fields[2])))
    return found


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


SLOW = """
name: {name}
steps:
  - id: endless
    type: media.slideshow
    timeout: 2s
    retry: {{max_attempts: 1}}
    with: {{images: [pic.png], seconds_per_image: 600, width: 1920, height: 1080}}
"""


def _media_pids(stack: Stack) -> list[int]:
    return [p.pid for p in stack.services["media"] if p.pid is not None]


def test_a_step_timeout_leaves_no_ffmpeg_behind(media_stack: Stack) -> None:
    name = _name("slow")
    media_stack.register(SLOW.format(name=name))
    run_id = media_stack.trigger(name)
    deadline = time.monotonic() + 30
    seen: list[tuple[int, int]] = []
    while not seen and time.monotonic() < deadline:
        seen = [child for pid in _media_pids(media_stack) for child in _ffmpeg_children(pid)]
        time.sleep(0.02)
    assert seen, "ffmpeg never started"
    [(pid, pgid)] = seen
    assert pgid == pid  # a process group of its own
    run = media_stack.wait_for_run(run_id, timeout=60)
    assert run["status"] == "failed", run
    [step] = run["steps"]
    assert step["error"]["type"] == "StepTimeout", step["error"]
    assert step["progress_message"] == "making a slideshow of 1 images"
    assert _group_members(pgid) == []
    assert [c for pid in _media_pids(media_stack) for c in _ffmpeg_children(pid)] == []


def _partition(run_id: uuid.UUID) -> int:
    return (murmur2(str(run_id).encode()) & 0x7FFFFFFF) % PARTITIONS


def _spread_event_ids(per_partition: int) -> list[uuid.UUID]:
    """Trigger event ids whose runs land ``per_partition`` on every partition: whatever
    partitions a member holds, it gets some of the batch."""
    chosen: dict[int, list[uuid.UUID]] = {p: [] for p in range(PARTITIONS)}
    while any(len(ids) < per_partition for ids in chosen.values()):
        event_id = uuid.uuid4()
        ids = chosen[_partition(run_id_for_request(event_id))]
        if len(ids) < per_partition:
            ids.append(event_id)
    return [event_id for ids in chosen.values() for event_id in ids]


async def _group_state(bootstrap: str, group: str) -> tuple[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_consumer_groups([group])
        [described] = response.groups
        return str(described[2]), len(described[5])
    finally:
        await admin.close()


def test_three_media_processes_share_a_batch_of_jobs(media_stack: Stack) -> None:
    group = f"{media_stack.topics.prefix}.media"
    deadline = time.monotonic() + 40
    state: tuple[str, int] = ("", 0)
    stable = 0
    while stable < 5 and time.monotonic() < deadline:  # stable for a second, not a moment
        state = asyncio.run(_group_state(media_stack.bootstrap, group))
        stable = stable + 1 if state == ("Stable", 3) else 0
        time.sleep(0.2)
    assert stable == 5, f"the media group is {state}\n{media_stack.tail()}"

    name = _name("batch")
    media_stack.register(
        f"""
name: {name}
steps:
  - {{id: probe, type: media.probe, with: {{source: clip.mp4}}}}
"""
    )
    pids = set(_media_pids(media_stack))
    assert len(pids) == 3
    workers: set[int] = set()
    # One job per partition reaches every member that holds a partition. A rebalance
    # after the check above hands a member's partitions to the others (CI once saw a batch
    # done by two of the three); that is the group doing its job, so a batch that missed a
    # process is followed by another, at most three in all.
    for _batch in range(3):
        run_ids = []
        for event_id in _spread_event_ids(per_partition=1):
            body = {"pipeline": name, "input": {}, "event_id": str(event_id)}
            media_stack.produce(media_stack.topics.runs_requested, json.dumps(body).encode())
            run_ids.append(run_id_for_request(event_id))
        runs = [media_stack.wait_for_run(r, timeout=90) for r in run_ids]
        assert all(r["status"] == "succeeded" for r in runs), [r["status"] for r in runs]
        for run in runs:
            [attempt] = run["steps"]  # each job once, by one process
            workers.add(int(attempt["worker"].rsplit(":", 1)[1]))
            events = media_stack.get(f"/runs/{run['id']}/events").json()["items"]
            assert [e["type"] for e in events].count("StepCompleted") == 1
        if workers == pids:
            break
    assert workers == pids, media_stack.tail()  # each process did some
