"""The ffmpeg command of each media kind, built, never concatenated: pure, no I/O.

ffmpeg-python assembles the filter graph and the argument list. What a pipeline gives only
ever lands in an argument as data: every file is an absolute path after ``-i``, prefixed
``file:`` (so a name starting with ``-`` is not an option, and ``concat:`` or ``http:``
are not protocols) and opened with ``-protocol_whitelist file`` (a playlist inside a
file cannot make ffmpeg fetch URLs); every other value is a number, a ``#rrggbb`` colour
or a name from a closed set, validated by the kind's config model before it gets here.
Text never reaches ffmpeg: cards are drawn with Pillow (``cards``).

Each command also says how long its output should last, for progress fractions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ffmpeg

from conveyor.contracts.kinds_media import RESOLUTIONS

__all__ = [
    "GLOBAL_ARGS",
    "PRESETS",
    "Clip",
    "FfmpegCommand",
    "Preset",
    "concat",
    "extract_audio",
    "fit_image",
    "slideshow",
    "still_video",
    "thumbnail",
    "transcode",
    "trim",
    "waveform",
]

GLOBAL_ARGS = ("-hide_banner", "-nostdin", "-nostats", "-v", "error", "-y")
"""Errors only on stderr (its last line is the step's error), no prompt, no stats."""
PROGRESS_ARGS = ("-progress", "pipe:1")


@dataclass(frozen=True)
class Preset:
    """A container and its codecs; ``video`` None for audio-only presets."""

    format: str
    extension: str
    mime: str
    video: dict[str, Any] | None
    audio: dict[str, Any]


_H264 = {"c:v": "libx264", "preset": "veryfast", "pix_fmt": "yuv420p"}
_AAC = {"c:a": "aac"}
PRESETS: dict[str, Preset] = {
    "mp4-h264": Preset("mp4", ".mp4", "video/mp4", {**_H264, "movflags": "+faststart"}, _AAC),
    "mp4-hevc": Preset(
        "mp4",
        ".mp4",
        "video/mp4",
        {
            "c:v": "libx265",
            "preset": "veryfast",
            "pix_fmt": "yuv420p",
            "tag:v": "hvc1",
            "x265-params": "log-level=error",
            "movflags": "+faststart",
        },
        _AAC,
    ),
    "mov-h264": Preset("mov", ".mov", "video/quicktime", _H264, _AAC),
    "mkv-h264": Preset("matroska", ".mkv", "video/x-matroska", _H264, _AAC),
    "webm-vp9": Preset(
        "webm",
        ".webm",
        "video/webm",
        {
            "c:v": "libvpx-vp9",
            "deadline": "realtime",
            "cpu-used": 8,
            "row-mt": 1,
            "pix_fmt": "yuv420p",
        },
        {"c:a": "libopus"},
    ),
    "m4a-aac": Preset("ipod", ".m4a", "audio/mp4", None, _AAC),
    "mp3": Preset("mp3", ".mp3", "audio/mpeg", None, {"c:a": "libmp3lame"}),
    "ogg-opus": Preset("ogg", ".ogg", "audio/ogg", None, {"c:a": "libopus"}),
    "wav": Preset("wav", ".wav", "audio/wav", None, {"c:a": "pcm_s16le"}),
    "flac": Preset("flac", ".flac", "audio/flac", None, {"c:a": "flac"}),
}
IMAGE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "png": ("image/png", {"c:v": "png"}),
    "jpg": ("image/jpeg", {"c:v": "mjpeg", "q:v": 2, "pix_fmt": "yuvj420p"}),
    "webp": ("image/webp", {"c:v": "libwebp", "quality": 85}),
}


@dataclass(frozen=True)
class FfmpegCommand:
    """ffmpeg's arguments (without the binary), where it writes, and how long the output
    should last (for progress; None when it is a single picture)."""

    args: list[str]
    output: Path
    duration_s: float | None = None
    mime: str = "application/octet-stream"

    def argv(self, binary: str, *, progress: bool = True) -> list[str]:
        return [binary, *GLOBAL_ARGS, *(PROGRESS_ARGS if progress else ()), *self.args]


@dataclass(frozen=True)
class Clip:
    """An input file as probed: what the command needs to know about it."""

    path: Path
    duration: float | None = None
    has_video: bool = True
    has_audio: bool = True
    width: int | None = None
    height: int | None = None
    fps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _file(path: Path, **options: Any) -> Any:
    """An input node for a local file: absolute, ``file:`` only, no other protocol."""
    if not path.is_absolute():
        raise ValueError(f"ffmpeg inputs are absolute paths, not {str(path)!r}")
    return ffmpeg.input(f"file:{path}", protocol_whitelist="file", **options)


def _lavfi(graph: str, **options: Any) -> Any:
    """A generated input; ``graph`` is built here from numbers, never from user text."""
    return ffmpeg.input(graph, f="lavfi", **options)


def _hex(colour: str) -> str:
    """``#rrggbb`` -> ``0xrrggbb``, ffmpeg's colour syntax."""
    if len(colour) != 7 or not colour.startswith("#"):
        raise ValueError(f"a colour is #rrggbb, not {colour!r}")
    int(colour[1:], 16)
    return "0x" + colour[1:].lower()


def _compile(
    streams: Sequence[Any], output: Path, *, duration_s: float | None, mime: str, **options: Any
) -> FfmpegCommand:
    args = ffmpeg.output(*streams, f"file:{output}", **options).get_args()
    return FfmpegCommand(args=list(args), output=output, duration_s=duration_s, mime=mime)


def _number(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


def _letterbox(stream: Any, *, width: int, height: int, fps: float, colour: str) -> Any:
    return (
        stream.filter("scale", width, height, force_original_aspect_ratio="decrease")
        .filter("pad", width, height, "(ow-iw)/2", "(oh-ih)/2", color=_hex(colour))
        .filter("setsar", 1)
        .filter("fps", fps=_number(fps))
        .filter("format", "yuv420p")
    )


def _stereo(stream: Any) -> Any:
    return stream.filter("aresample", 48000).filter(
        "aformat", sample_fmts="fltp", channel_layouts="stereo"
    )


def _encode_options(
    preset: Preset, *, video: bool, audio: bool, video_kbps: int | None, audio_kbps: int | None
) -> dict[str, Any]:
    options: dict[str, Any] = {"f": preset.format}
    if video and preset.video is not None:
        options.update(preset.video)
        if video_kbps is not None:
            options["b:v"] = f"{video_kbps}k"
    if audio:
        options.update(preset.audio)
        if audio_kbps is not None and preset.audio["c:a"] not in ("pcm_s16le", "flac"):
            options["b:a"] = f"{audio_kbps}k"
    return options


def transcode(
    clip: Clip,
    output: Path,
    *,
    preset: str,
    resolution: str | None = None,
    video_kbps: int | None = None,
    audio_kbps: int | None = None,
    fps: int | None = None,
    start: float | None = None,
    duration: float | None = None,
) -> FfmpegCommand:
    """Re-encode ``clip`` with ``preset`` (also what ``trim`` does, from ``start`` for
    ``duration``): the first video and the first audio stream, as the preset has room."""
    chosen = PRESETS[preset]
    source = _file(clip.path, **({"ss": _number(start)} if start else {}))
    video = clip.has_video and chosen.video is not None
    audio = clip.has_audio
    if not video and not audio:
        raise ValueError("nothing to encode: no video for this preset and no audio")
    streams = []
    if video:
        stream = source["v:0"]
        if resolution is not None:
            stream = stream.filter("scale", -2, RESOLUTIONS[resolution])
        if fps is not None:
            stream = stream.filter("fps", fps=fps)
        streams.append(stream)
    if audio:
        streams.append(source["a:0"])
    options = _encode_options(
        chosen, video=video, audio=audio, video_kbps=video_kbps, audio_kbps=audio_kbps
    )
    remaining = None if clip.duration is None else max(clip.duration - (start or 0.0), 0.0)
    if duration is not None:
        options["t"] = _number(duration)
        remaining = duration if remaining is None else min(duration, remaining)
    return _compile(streams, output, duration_s=remaining, mime=chosen.mime, **options)


def trim(
    clip: Clip, output: Path, *, preset: str, start: float, duration: float | None
) -> FfmpegCommand:
    """Seek to ``start`` before decoding (fast, and exact since frames are re-encoded)."""
    return transcode(clip, output, preset=preset, start=start, duration=duration)


def extract_audio(
    clip: Clip,
    output: Path,
    *,
    preset: str,
    bitrate_kbps: int | None = None,
    sample_rate: int | None = None,
    channels: int | None = None,
) -> FfmpegCommand:
    chosen = PRESETS[preset]
    options = _encode_options(
        chosen, video=False, audio=True, video_kbps=None, audio_kbps=bitrate_kbps
    )
    if sample_rate is not None:
        options["ar"] = sample_rate
    if channels is not None:
        options["ac"] = channels
    stream = _file(clip.path)["a:0"]
    return _compile([stream], output, duration_s=clip.duration, mime=chosen.mime, **options)


def thumbnail(
    clip: Clip, output: Path, *, at: float, width: int | None, image_format: str
) -> FfmpegCommand:
    """One frame at ``at`` seconds (seeking before decoding: only a few frames are read)."""
    mime, codec = IMAGE_FORMATS[image_format]
    stream = _file(clip.path, ss=_number(at))["v:0"]
    if width is not None:
        stream = stream.filter("scale", width, -2)
    return _compile(
        [stream], output, duration_s=None, mime=mime, f="image2", update=1, **{"frames:v": 1},
        **codec,
    )  # fmt: skip


def fit_image(source: Path, output: Path, *, width: int, height: int) -> FfmpegCommand:
    """The first frame of an image (or video), scaled and cropped to cover width x height,
    as a PNG: a card's background."""
    stream = (
        _file(source)["v:0"]
        .filter("scale", width, height, force_original_aspect_ratio="increase")
        .filter("crop", width, height)
        .filter("setsar", 1)
    )
    return _compile(
        [stream], output, duration_s=None, mime="image/png", f="image2", update=1,
        **{"frames:v": 1, "c:v": "png"},
    )  # fmt: skip


def still_video(image: Path, output: Path, *, duration: float, fps: int) -> FfmpegCommand:
    """A picture held still for ``duration`` seconds, as H.264 in MP4."""
    stream = _file(image)["v:0"].filter("loop", loop=-1, size=1, start=0)
    stream = stream.filter("trim", duration=_number(duration)).filter("setpts", "PTS-STARTPTS")
    stream = stream.filter("fps", fps=fps).filter("format", "yuv420p")
    options = {**_H264, "tune": "stillimage", "movflags": "+faststart", "f": "mp4"}
    return _compile([stream], output, duration_s=duration, mime="video/mp4", **options)


def concat(
    clips: Sequence[Clip],
    output: Path,
    *,
    preset: str,
    width: int,
    height: int,
    fps: float,
) -> FfmpegCommand:
    """``clips`` one after another through the concat filter: each video letterboxed to
    width x height at ``fps``, each audio resampled to 48 kHz stereo; a clip without audio
    gets silence as long as it is, when any clip has audio."""
    chosen = PRESETS[preset]
    video = chosen.video is not None
    audio = any(c.has_audio for c in clips)
    if video and not all(c.has_video for c in clips):
        raise ValueError("a video concat needs video in every clip")
    parts: list[Any] = []
    for clip in clips:
        source = _file(clip.path)
        if video:
            parts.append(
                _letterbox(source["v:0"], width=width, height=height, fps=fps, colour="#000000")
            )
        if audio:
            if clip.has_audio:
                parts.append(_stereo(source["a:0"]))
            else:
                length = _number(clip.duration or 0.0)
                parts.append(_lavfi("anullsrc=r=48000:cl=stereo", t=length)["a"])
    joined = ffmpeg.concat(*parts, v=int(video), a=int(audio)).node
    streams = [joined[i] for i in range(int(video) + int(audio))]
    options = _encode_options(chosen, video=video, audio=audio, video_kbps=None, audio_kbps=None)
    total = sum(c.duration or 0.0 for c in clips) or None
    return _compile(streams, output, duration_s=total, mime=chosen.mime, **options)


def _generated_audio(kind: str, *, frequency: float, volume: float, duration: float) -> Any:
    length = _number(duration)
    if kind == "silence":
        return _lavfi("anullsrc=r=48000:cl=stereo", t=length)["a"]
    tones = [frequency] if kind == "sine" else [frequency, frequency * 5 / 4, frequency * 3 / 2]
    sources = [
        _lavfi(f"sine=frequency={_number(f)}:sample_rate=48000:duration={length}")["a"]
        for f in tones
    ]
    mixed = sources[0] if len(sources) == 1 else ffmpeg.filter(sources, "amix", inputs=len(tones))
    return mixed.filter("volume", _number(volume))


def slideshow(
    images: Sequence[Path],
    output: Path,
    *,
    seconds_per_image: float,
    width: int,
    height: int,
    fps: int,
    fade: float,
    background: str,
    audio_file: Path | None = None,
    generated_audio: dict[str, Any] | None = None,
) -> FfmpegCommand:
    """Each image held for ``seconds_per_image`` (the first frame of a video, likewise),
    letterboxed, optionally faded in and out; audio cut to the video's length, padded
    with silence when shorter, and faded out over the last half second."""
    each = _number(seconds_per_image)
    slides = []
    for image in images:
        stream = _file(image)["v:0"].filter("loop", loop=-1, size=1, start=0)
        stream = stream.filter("trim", duration=each).filter("setpts", "PTS-STARTPTS")
        stream = _letterbox(stream, width=width, height=height, fps=fps, colour=background)
        if fade > 0:
            stream = stream.filter("fade", t="in", st=0, d=_number(fade))
            stream = stream.filter(
                "fade", t="out", st=_number(seconds_per_image - fade), d=_number(fade)
            )
        slides.append(stream)
    total = seconds_per_image * len(images)
    video = slides[0] if len(slides) == 1 else ffmpeg.concat(*slides, v=1, a=0)
    streams = [video]
    if audio_file is not None or generated_audio is not None:
        if audio_file is not None:
            sound = _stereo(_file(audio_file)["a:0"]).filter("apad")
        else:
            assert generated_audio is not None
            sound = _generated_audio(
                generated_audio["generate"],
                frequency=float(generated_audio.get("frequency", 440.0)),
                volume=float(generated_audio.get("volume", 0.3)),
                duration=total,
            )
        out_fade = min(0.5, total / 4)
        sound = sound.filter("atrim", duration=_number(total)).filter(
            "afade", t="out", st=_number(total - out_fade), d=_number(out_fade)
        )
        streams.append(sound)
    options: dict[str, Any] = {**_H264, "movflags": "+faststart", "f": "mp4", "t": _number(total)}
    if len(streams) > 1:
        options.update(_AAC)
    return _compile(streams, output, duration_s=total, mime="video/mp4", **options)


def waveform(
    clip: Clip,
    output: Path,
    *,
    width: int,
    height: int,
    colour: str,
    background: str | None,
    split_channels: bool,
) -> FfmpegCommand:
    """The first audio stream drawn as one picture (transparent without ``background``)."""
    wave = _file(clip.path)["a:0"].filter(
        "showwavespic",
        s=f"{width}x{height}",
        colors=_hex(colour),
        split_channels=int(split_channels),
    )
    if background is not None:
        canvas = _lavfi(f"color=c={_hex(background)}:s={width}x{height}:d=1")["v"]
        wave = ffmpeg.filter([canvas, wave], "overlay", format="auto").filter("format", "rgb24")
    return _compile(
        [wave], output, duration_s=None, mime="image/png", f="image2", update=1,
        **{"frames:v": 1, "c:v": "png"},
    )  # fmt: skip
