"""The ffmpeg commands of the media kinds, as argument lists: pure, no ffmpeg run here.

What a pipeline gives must stay data: a file name starting with ``-`` or naming another
protocol is a ``file:`` path after ``-i``; text never reaches ffmpeg at all (cards are
drawn with Pillow, see test_media_cards.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor.media import commands
from conveyor.media.commands import Clip
from conveyor.media.ffmpeg_process import ProgressParser

OUT = Path("/work/step-1/out.mp4")


def _inputs(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args) if arg == "-i"]


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_transcode_to_a_smaller_webm() -> None:
    clip = Clip(Path("/media/in.mp4"), duration=2.0)
    command = commands.transcode(
        clip, OUT, preset="webm-vp9", resolution="240p", video_kbps=300, audio_kbps=64
    )
    assert command.args == [
        *("-protocol_whitelist", "file", "-i", "file:/media/in.mp4"),
        *("-filter_complex", "[0:v:0]scale=-2:240[s0]"),
        *("-map", "[s0]", "-map", "0:a:0", "-f", "webm"),
        *("-b:a", "64k", "-b:v", "300k", "-c:a", "libopus", "-c:v", "libvpx-vp9"),
        *("-cpu-used", "8", "-deadline", "realtime", "-pix_fmt", "yuv420p", "-row-mt", "1"),
        "file:/work/step-1/out.mp4",
    ]
    assert (command.duration_s, command.mime) == (2.0, "video/webm")
    argv = command.argv("/usr/bin/ffmpeg")
    assert argv[:9] == [
        *("/usr/bin/ffmpeg", "-hide_banner", "-nostdin", "-nostats", "-v", "error", "-y"),
        *("-progress", "pipe:1"),
    ]


def test_an_audio_preset_drops_the_video() -> None:
    command = commands.transcode(
        Clip(Path("/media/in.mp4"), duration=3.0), OUT.with_suffix(".m4a"), preset="m4a-aac"
    )
    args = command.args
    assert "-filter_complex" not in args
    assert _option(args, "-map") == "0:a:0"
    assert "0:v:0" not in args
    assert (_option(args, "-f"), _option(args, "-c:a")) == ("ipod", "aac")
    assert command.mime == "audio/mp4"


def test_trim_seeks_before_the_input_and_limits_the_output() -> None:
    command = commands.trim(
        Clip(Path("/media/in.mp4"), duration=10.0), OUT, preset="mp4-h264", start=2.5, duration=3
    )
    args = command.args
    assert args[: args.index("-i") + 2] == [
        *("-protocol_whitelist", "file", "-ss", "2.5", "-i", "file:/media/in.mp4"),
    ]
    assert _option(args, "-t") == "3"
    assert command.duration_s == 3.0
    # without a length: up to the end
    rest = commands.trim(
        Clip(Path("/media/in.mp4"), duration=10.0), OUT, preset="mp4-h264", start=4, duration=None
    )
    assert "-t" not in rest.args
    assert rest.duration_s == 6.0


def test_thumbnail_is_one_frame_at_a_time() -> None:
    command = commands.thumbnail(
        Clip(Path("/media/in.mp4"), duration=10.0),
        Path("/w/t.jpg"),
        at=1.25,
        width=320,
        image_format="jpg",
    )
    args = command.args
    assert _option(args, "-ss") == "1.25"
    assert args.index("-ss") < args.index("-i")
    assert _option(args, "-filter_complex") == "[0:v:0]scale=320:-2[s0]"
    assert (_option(args, "-frames:v"), _option(args, "-update")) == ("1", "1")
    assert (_option(args, "-f"), _option(args, "-c:v")) == ("image2", "mjpeg")
    assert command.duration_s is None
    assert command.mime == "image/jpeg"


def test_concat_letterboxes_every_clip_and_gives_silence_to_a_silent_one() -> None:
    clips = [
        Clip(Path("/a/one.mp4"), duration=2.0),
        Clip(Path("/a/two.mp4"), duration=1.5, has_audio=False),
    ]
    command = commands.concat(clips, OUT, preset="mp4-h264", width=160, height=90, fps=25)
    args = command.args
    assert _inputs(args) == ["file:/a/one.mp4", "file:/a/two.mp4", "anullsrc=r=48000:cl=stereo"]
    silence = args.index("anullsrc=r=48000:cl=stereo")
    assert args[silence - 5 : silence] == ["-f", "lavfi", "-t", "1.5", "-i"]
    graph = _option(args, "-filter_complex")
    assert graph.count("scale=160:90:force_original_aspect_ratio=decrease") == 2
    assert graph.count("pad=160:90:(ow-iw)/2:(oh-ih)/2:color=0x000000") == 2
    assert "concat=a=1:n=2:v=1" in graph
    assert command.duration_s == 3.5


def test_concat_of_audio_only() -> None:
    clips = [Clip(Path("/a/1.wav"), 1.0, has_video=False), Clip(Path("/a/2.wav"), 2.0, False)]
    command = commands.concat(clips, Path("/w/o.m4a"), preset="m4a-aac", width=2, height=2, fps=1)
    graph = _option(command.args, "-filter_complex")
    assert "concat=a=1:n=2:v=0" in graph
    assert "scale" not in graph


def test_slideshow_with_a_generated_chord() -> None:
    command = commands.slideshow(
        [Path("/a/1.png"), Path("/a/2.png")],
        OUT,
        seconds_per_image=1.5,
        width=160,
        height=90,
        fps=25,
        fade=0.25,
        background="#112233",
        generated_audio={"generate": "chord", "frequency": 200, "volume": 0.5},
    )
    args = command.args
    assert _inputs(args) == [
        "file:/a/1.png",
        "file:/a/2.png",
        "sine=frequency=200:sample_rate=48000:duration=3",
        "sine=frequency=250:sample_rate=48000:duration=3",
        "sine=frequency=300:sample_rate=48000:duration=3",
    ]
    graph = _option(args, "-filter_complex")
    assert graph.count("loop=loop=-1:size=1:start=0") == 2
    assert "pad=160:90:(ow-iw)/2:(oh-ih)/2:color=0x112233" in graph
    assert "fade=d=0.25:st=1.25:t=out" in graph
    assert "amix=inputs=3" in graph
    assert "afade=d=0.5:st=2.5:t=out" in graph
    assert _option(args, "-t") == "3"
    assert (_option(args, "-c:v"), _option(args, "-c:a")) == ("libx264", "aac")
    assert command.duration_s == 3.0


def test_waveform_on_a_background() -> None:
    command = commands.waveform(
        Clip(Path("/a/song.mp3"), 30.0, has_video=False),
        Path("/w/wave.png"),
        width=640,
        height=120,
        colour="#38BDF8",
        background="#000000",
        split_channels=True,
    )
    args = command.args
    assert _inputs(args) == ["color=c=0x000000:s=640x120:d=1", "file:/a/song.mp3"]
    graph = _option(args, "-filter_complex")
    assert "showwavespic=colors=0x38bdf8:s=640x120:split_channels=1" in graph
    assert "overlay=format=auto" in graph


@pytest.mark.parametrize(
    "name",
    [
        "-i",
        "-filter_complex",
        "--help",
        "concat:/etc/passwd|x.mp4",
        "http://example.com/x.mp4",
        "a;b[0]:v,c='d'.mp4",
        "new\nline.mp4",
    ],
)
def test_hostile_file_names_stay_paths(name: str) -> None:
    """Whatever a file is called, it reaches ffmpeg as one ``file:`` argument after ``-i``,
    with only the file protocol allowed, and never inside the filter graph."""
    path = Path("/media") / name
    clips = [Clip(path, duration=1.0), Clip(Path("/media/ok.mp4"), duration=1.0)]
    built = [
        commands.transcode(clips[0], OUT, preset="mp4-h264", resolution="144p"),
        commands.thumbnail(clips[0], OUT, at=0, width=None, image_format="png"),
        commands.concat(clips, OUT, preset="mp4-h264", width=16, height=16, fps=1),
        commands.slideshow(
            [path],
            OUT,
            seconds_per_image=1,
            width=16,
            height=16,
            fps=1,
            fade=0,
            background="#000000",
            audio_file=path,
        ),
    ]
    for command in built:
        args = command.args
        assert f"file:{path}" in _inputs(args)
        for index, arg in enumerate(args):
            if str(path) in arg:
                assert arg == f"file:{path}"
                assert args[index - 1] == "-i"
                options = args[: index - 1]
                if "-i" in options:  # this input's options start after the previous one
                    options = options[len(options) - options[::-1].index("-i") + 1 :]
                assert options[options.index("-protocol_whitelist") + 1] == "file"
        if "-filter_complex" in args:
            assert str(path) not in _option(args, "-filter_complex")


def test_relative_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="absolute"):
        commands.transcode(Clip(Path("in.mp4")), OUT, preset="mp4-h264")


def test_a_colour_is_checked_again() -> None:
    with pytest.raises(ValueError, match="#rrggbb"):
        commands.waveform(
            Clip(Path("/a.wav")),
            Path("/w.png"),
            width=16,
            height=16,
            colour="red:x=1",
            background=None,
            split_channels=False,
        )


def test_progress_is_the_share_of_the_expected_duration() -> None:
    parser = ProgressParser(4.0)
    block = ["frame=10", "out_time_us=1000000", "out_time=00:00:01.000000", "progress=continue"]
    assert [parser.feed(line) for line in block] == [None, None, None, 0.25]
    assert parser.feed("out_time_ms=3000000") is None  # ffmpeg's misnamed microseconds
    assert parser.feed("progress=continue\n") == 0.75
    assert parser.feed("out_time_us=9000000") is None
    assert parser.feed("progress=continue") == 1.0  # never past the end
    assert parser.feed("out_time_us=N/A") is None
    assert parser.feed("progress=end") == 1.0
    unknown = ProgressParser(None)
    assert unknown.feed("out_time_us=5") is None
    assert unknown.feed("progress=continue") is None
    assert unknown.feed("progress=end") == 1.0
