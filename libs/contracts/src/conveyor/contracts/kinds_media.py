"""The ``with`` blocks of the ``media.*`` kinds, served by the media runner (ffmpeg).

```yaml
- id: clip
  type: media.trim
  with: {source: "{{ input.video }}", start: 1.5, duration: 4}
- id: small
  type: media.transcode
  with: {source: "{{ steps.clip.output }}", preset: webm-vp9, resolution: 360p}
```

A ``source`` is an artifact reference (the output of another media step, as a dict or its
``artifact://`` uri), a path under the media root, a ``file://`` uri under it, or an
http(s) URL the runner downloads with a size limit. Every output is an artifact reference
``{uri, sha256, size, mime, duration, width, height, codecs}`` plus a few kind-specific
fields.

Choices are closed sets (presets, resolutions, formats) and numbers are bounded, so a
pipeline cannot ask ffmpeg for anything but what these models describe; no value is ever
passed to ffmpeg as an option of its own. A number, colour or choice may still be a
template at registration (``start: "{{ input.start }}"``): the runner validates it again,
strictly, once rendered.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

__all__ = [
    "AUDIO_PRESETS",
    "RESOLUTIONS",
    "VIDEO_PRESETS",
    "GeneratedAudio",
    "MediaConcatConfig",
    "MediaExtractAudioConfig",
    "MediaProbeConfig",
    "MediaRenderCardConfig",
    "MediaSlideshowConfig",
    "MediaThumbnailConfig",
    "MediaTranscodeConfig",
    "MediaTrimConfig",
    "MediaWaveformConfig",
    "is_template",
]

MAX_SECONDS = 24 * 3600.0


def is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _template_or(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A template is kept as it is (checked again once rendered); anything else must fit."""
    if is_template(value):
        return value
    return handler(value)


_Templated = WrapValidator(_template_or)

VideoPreset = Literal["mp4-h264", "mp4-hevc", "mov-h264", "mkv-h264", "webm-vp9"]
AudioPreset = Literal["m4a-aac", "mp3", "ogg-opus", "wav", "flac"]
VIDEO_PRESETS: tuple[str, ...] = VideoPreset.__args__  # type: ignore[attr-defined]
AUDIO_PRESETS: tuple[str, ...] = AudioPreset.__args__  # type: ignore[attr-defined]
Preset = Annotated[VideoPreset | AudioPreset, _Templated]
"""container-codec(s): ``mp4-h264`` is H.264 + AAC in MP4, ``webm-vp9`` VP9 + Opus in
WebM, ``m4a-aac`` AAC audio only, ``wav`` 16-bit PCM..."""

Resolution = Annotated[
    Literal["2160p", "1440p", "1080p", "720p", "480p", "360p", "240p", "144p"], _Templated
]
RESOLUTIONS = {"2160p": 2160, "1440p": 1440, "1080p": 1080, "720p": 720, "480p": 480}
RESOLUTIONS.update({"360p": 360, "240p": 240, "144p": 144})


def _artifact_reference(value: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(value.get("uri"), str):
        raise ValueError('an object source is an artifact reference, with a "uri"')
    return value


Source = (
    Annotated[str, Field(min_length=1, max_length=4096)]
    | Annotated[dict[str, Any], AfterValidator(_artifact_reference)]
)
"""An artifact reference (dict or uri), a path or file:// uri under the media root, or an
http(s) URL; a template rendering to any of those."""
Sources = (
    Annotated[list[Source], Field(min_length=1, max_length=200)]
    | Annotated[str, Field(pattern=r"\{\{|\{%")]
)
"""A list of sources, or a template rendering to one (a fan-in's outputs)."""

Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS), _Templated]
Length = Annotated[float, Field(gt=0, le=MAX_SECONDS), _Templated]
Percent = Annotated[str, Field(pattern=r"^(100(\.0+)?|\d{1,2}(\.\d+)?)%$")]
Colour = Annotated[str, Field(pattern=r"^#[0-9a-fA-F]{6}$"), _Templated]
"""``#rrggbb``."""
Side = Annotated[int, Field(ge=16, le=7680), _Templated]
"""A frame side in pixels."""
Kbps = Annotated[int, Field(ge=8, le=100_000), _Templated]
Fps = Annotated[int, Field(ge=1, le=120), _Templated]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MediaProbeConfig(_Config):
    """Probe a media file: duration, container and streams (codecs, frame size, rates)."""

    source: Source


class MediaTranscodeConfig(_Config):
    """Re-encode ``source`` with a preset, optionally scaled to a height (aspect kept)."""

    source: Source
    preset: Preset = "mp4-h264"
    resolution: Resolution | None = None
    video_bitrate_kbps: Kbps | None = None
    audio_bitrate_kbps: Kbps | None = None
    fps: Fps | None = None


class MediaThumbnailConfig(_Config):
    """One frame of ``source`` as an image, at ``at`` seconds or a percentage (``"12%"``)."""

    source: Source
    at: (
        Annotated[float, Field(ge=0, le=MAX_SECONDS)]
        | Percent
        | Annotated[str, Field(pattern=r"\{\{|\{%")]
    ) = "10%"
    width: Side | None = None
    """Scale to this width, height following the aspect ratio; default: the frame's own."""
    format: Annotated[Literal["png", "jpg", "webp"], _Templated] = "png"


class MediaExtractAudioConfig(_Config):
    """The audio of ``source`` as an audio file of its own."""

    source: Source
    preset: Annotated[AudioPreset, _Templated] = "m4a-aac"
    bitrate_kbps: Kbps | None = None
    sample_rate: (
        Annotated[Literal[8000, 16000, 22050, 24000, 32000, 44100, 48000], _Templated] | None
    ) = None
    channels: Annotated[Literal[1, 2], _Templated] | None = None


class MediaTrimConfig(_Config):
    """The part of ``source`` from ``start`` to ``end`` (or for ``duration``), re-encoded so
    that the cut is frame-accurate. Without ``end`` or ``duration``: up to the end."""

    source: Source
    start: Seconds = 0.0
    end: Length | None = None
    duration: Length | None = None
    preset: Preset | None = None
    """Default: mp4-h264 for a video, m4a-aac for audio only."""

    @model_validator(mode="after")
    def _one_end(self) -> MediaTrimConfig:
        if self.end is not None and self.duration is not None:
            raise ValueError("give end or duration, not both")
        numbers = isinstance(self.start, float) and isinstance(self.end, float)
        if numbers and self.end is not None and self.end <= self.start:
            raise ValueError(f"end ({self.end:g}s) must be after start ({self.start:g}s)")
        return self


class MediaConcatConfig(_Config):
    """``sources`` one after another. Clips are scaled (letterboxed) to the first clip's
    frame size, or to ``width`` x ``height``; a clip without audio gets silence."""

    sources: Sources
    preset: Preset | None = None
    """Default: mp4-h264 when any clip has video, m4a-aac when all are audio."""
    width: Side | None = None
    height: Side | None = None
    fps: Fps | None = None

    @model_validator(mode="after")
    def _size(self) -> MediaConcatConfig:
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither")
        if isinstance(self.sources, list) and len(self.sources) < 2:
            raise ValueError("concat needs at least two sources")
        return self


def _even(config: Any, *, what: str) -> None:
    for name in ("width", "height"):
        value = getattr(config, name)
        if isinstance(value, int) and value % 2:
            raise ValueError(f"{name} must be even for {what} (H.264 needs even sides)")


class MediaRenderCardConfig(_Config):
    """Text on a colour or an image, as a PNG or a short MP4 (the image held still)."""

    title: Annotated[str, Field(max_length=300)] | None = None
    text: Annotated[str, Field(max_length=2000)] | None = None
    width: Side = 1280
    height: Side = 720
    background: Colour = "#1e293b"
    background_image: Source | None = None
    """An image (or a video: its first frame), scaled to cover the card."""
    color: Colour = "#f8fafc"
    font_size: Annotated[int, Field(ge=6, le=600), _Templated] | None = None
    """The text's size in pixels (a title is 1.6x); default: as large as fits."""
    format: Annotated[Literal["png", "mp4"], _Templated] = "png"
    duration: Annotated[float, Field(gt=0, le=600), _Templated] = 3.0
    """For mp4: how long the card shows."""
    fps: Fps = 25

    @model_validator(mode="after")
    def _something_to_show(self) -> MediaRenderCardConfig:
        if not (self.title or self.text):
            raise ValueError("a card needs a title or a text")
        if self.format == "mp4":
            _even(self, what="an mp4 card")
        return self


class GeneratedAudio(_Config):
    """A track made by ffmpeg itself (lavfi), as long as the video: ``{generate: sine}``."""

    generate: Annotated[Literal["sine", "chord", "silence"], _Templated]
    frequency: Annotated[float, Field(ge=20, le=20000), _Templated] = 440.0
    volume: Annotated[float, Field(ge=0, le=1), _Templated] = 0.3


class MediaSlideshowConfig(_Config):
    """``images`` (each for ``seconds_per_image``) as an MP4, letterboxed to ``width`` x
    ``height``, with optional ``audio``: a source (cut or padded with silence to the video's
    length) or a generated track."""

    images: Sources
    seconds_per_image: Annotated[float, Field(ge=0.1, le=600), _Templated] = 3.0
    width: Side = 1280
    height: Side = 720
    fps: Fps = 25
    fade: Annotated[float, Field(ge=0, le=5), _Templated] = 0.0
    """Fade each image in and out over this many seconds."""
    background: Colour = "#000000"
    audio: GeneratedAudio | Source | None = None

    @model_validator(mode="after")
    def _fits(self) -> MediaSlideshowConfig:
        _even(self, what="a slideshow")
        fade, each = self.fade, self.seconds_per_image
        if isinstance(fade, float) and isinstance(each, float) and 2 * fade > each:
            raise ValueError(
                f"fade ({fade:g}s) in and out must fit in seconds_per_image ({each:g}s)"
            )
        return self


class MediaWaveformConfig(_Config):
    """A picture of the audio of ``source``: a PNG, transparent unless ``background``."""

    source: Source
    width: Side = 1280
    height: Side = 240
    color: Colour = "#38bdf8"
    background: Colour | None = None
    split_channels: Annotated[bool, _Templated] = False
