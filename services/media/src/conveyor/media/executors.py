"""The executors of the media kinds that make files: transcode, thumbnail, extract_audio,
trim, concat, render_card, slideshow, waveform.

Each step works in a scratch directory of its own (removed whatever happens): its sources
are resolved there (artifacts, files under the media root, downloads), probed (a corrupt
or non-media input fails here, in ffmpeg's words, naming the source as the pipeline gave
it), turned into an ffmpeg command (``commands``), run with progress reported as the
output grows (``ffmpeg_process``), and the output is probed and put in the artifact store.
The step's output is the artifact reference, plus a field or two of its kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor.contracts import StepReady
from conveyor.contracts.kinds_media import (
    AUDIO_PRESETS,
    GeneratedAudio,
    MediaConcatConfig,
    MediaExtractAudioConfig,
    MediaRenderCardConfig,
    MediaSlideshowConfig,
    MediaThumbnailConfig,
    MediaTranscodeConfig,
    MediaTrimConfig,
    MediaWaveformConfig,
    is_template,
)
from conveyor.media import commands
from conveyor.media._workdir import step_workdir
from conveyor.media.artifacts import ArtifactStore
from conveyor.media.cards import Card, draw_card
from conveyor.media.commands import Clip, FfmpegCommand
from conveyor.media.errors import MediaError
from conveyor.media.ffmpeg_process import ProgressParser, media_error, run_tool
from conveyor.media.probe import MediaProber, source_label
from conveyor.media.sources import SourceResolver
from conveyor.runtime.runner import Executor, InvalidStepConfig, report_progress

__all__ = ["MediaSteps"]

_IMAGE_CODECS = frozenset({"png", "mjpeg", "webp", "gif", "bmp", "tiff", "jpegxl", "jpeg2000"})


@dataclass
class _Job:
    """One step's work: its scratch directory and the names its local files stand for."""

    steps: MediaSteps
    step: StepReady
    workdir: Path
    names: dict[str, str] = field(default_factory=dict)

    async def local(self, source: str | Mapping[str, Any]) -> tuple[Path, str]:
        label = source_label(source)
        path = await self.steps.resolver.resolve(source, workdir=self.workdir)
        if str(path) in self.names:
            # The same file again (a clip joined twice, two equal cards): ffmpeg needs an
            # input of its own for each, and ffmpeg-python merges equal inputs into one.
            link = self.workdir / f"input-{len(self.names)}{path.suffix}"
            await asyncio.to_thread(link.symlink_to, path)
            path = link
        self.names[str(path)] = label
        return path, label

    async def open(self, source: str | Mapping[str, Any]) -> tuple[Clip, str]:
        """The source as a local file, probed."""
        path, label = await self.local(source)
        size = (await asyncio.to_thread(path.stat)).st_size
        info = await self.steps.prober.probe(path, size=size, source=label)
        clip = _clip(path, info)
        if clip.has_video and not (clip.width and clip.height):
            # ffmpeg found a stream it cannot decode (a truncated or fake picture, say)
            raise MediaError(f"{label}: its video cannot be decoded (no frame size found)")
        return clip, label

    def output(self, name: str) -> Path:
        return self.workdir / name

    async def run(self, command: FfmpegCommand, *, subject: str, doing: str) -> None:
        """Run ``command``, reporting progress as ``doing``; fail in ffmpeg's words."""
        parser = ProgressParser(command.duration_s)
        report_progress(0.0 if command.duration_s else None, doing)

        def on_line(line: str) -> None:
            fraction = parser.feed(line)
            if fraction is not None:
                report_progress(fraction, doing)

        result = await run_tool(
            command.argv(self.steps.ffmpeg),
            timeout_s=self.steps.timeout_s,
            what=f"{doing} ({subject})",
            on_stdout_line=on_line,
        )
        names = {**self.names, str(self.workdir): "<workdir>"}
        if result.returncode != 0:
            raise media_error(result.stderr, names=names, subject=subject)
        exists = await asyncio.to_thread(command.output.is_file)
        if not exists or (await asyncio.to_thread(command.output.stat)).st_size == 0:
            raise MediaError(f"{subject}: ffmpeg wrote no output ({doing})")

    async def keep(self, path: Path, *, mime: str, **extra: Any) -> dict[str, Any]:
        """Probe the finished ``path`` and put it in the store; the step's output."""
        size = (await asyncio.to_thread(path.stat)).st_size
        info = await self.steps.prober.probe(path, size=size, source="the output")
        clip = _clip(path, info)
        still = mime.startswith("image/")
        ref = await self.steps.store.put_file(
            path,
            mime=mime,
            run_id=self.step.run_id,
            duration=None if still else _rounded(clip.duration),
            width=clip.width,
            height=clip.height,
            codecs=[s["codec"] for s in info["streams"] if s.get("codec")],
        )
        return {**ref.model_dump(mode="json"), **extra}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _clip(path: Path, info: Mapping[str, Any]) -> Clip:
    streams = info.get("streams") or []
    video = next((s for s in streams if s.get("type") == "video"), None)
    audio = next((s for s in streams if s.get("type") == "audio"), None)
    duration = info.get("duration")
    # A picture is a video stream of one frame (png, jpeg, ...), with no length to speak of.
    is_picture = video is not None and audio is None and video.get("codec") in _IMAGE_CODECS
    return Clip(
        path=path,
        duration=None if is_picture else duration,
        has_video=video is not None,
        has_audio=audio is not None,
        width=video.get("width") if video else None,
        height=video.get("height") if video else None,
        fps=video.get("fps") if video else None,
        extra={"picture": is_picture},
    )


def _rendered(config: Any, *names: str) -> None:
    """A field that is still a template after rendering (its value rendered to a template
    text) cannot be used: fail as a config error, naming it."""
    for name in names:
        if is_template(getattr(config, name)):
            raise InvalidStepConfig(f"{name}: {getattr(config, name)!r} is not a valid value")


def _even(value: float) -> int:
    return max(2, int(value) // 2 * 2)


class MediaSteps:
    """Executors of the media kinds that make files; see the module's docstring."""

    def __init__(
        self,
        *,
        prober: MediaProber,
        resolver: SourceResolver,
        store: ArtifactStore,
        ffmpeg: str,
        work_dir: Path,
        timeout_s: float = 1800.0,
    ) -> None:
        self.prober = prober
        self.resolver = resolver
        self.store = store
        self.ffmpeg = ffmpeg
        self.work_dir = work_dir
        self.timeout_s = timeout_s

    def executors(self) -> dict[str, Executor]:
        return {
            "media.transcode": self.transcode,
            "media.thumbnail": self.thumbnail,
            "media.extract_audio": self.extract_audio,
            "media.trim": self.trim,
            "media.concat": self.concat,
            "media.render_card": self.render_card,
            "media.slideshow": self.slideshow,
            "media.waveform": self.waveform,
        }

    async def _job(
        self, step: StepReady, work: Callable[[_Job], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        async with step_workdir(self.work_dir) as workdir:
            return await work(_Job(self, step, workdir))

    # --- one input, one output --------------------------------------------------------

    async def transcode(self, config: MediaTranscodeConfig, step: StepReady) -> dict[str, Any]:
        _rendered(config, "preset", "resolution", "video_bitrate_kbps", "audio_bitrate_kbps")
        _rendered(config, "fps")

        async def work(job: _Job) -> dict[str, Any]:
            clip, label = await job.open(config.source)
            _check_preset(clip, label, config.preset)
            preset = commands.PRESETS[config.preset]
            command = commands.transcode(
                clip,
                job.output("out" + preset.extension),
                preset=config.preset,
                resolution=config.resolution,
                video_kbps=config.video_bitrate_kbps,
                audio_kbps=config.audio_bitrate_kbps,
                fps=config.fps,
            )
            await job.run(command, subject=label, doing=f"transcoding to {config.preset}")
            return await job.keep(command.output, mime=command.mime)

        return await self._job(step, work)

    async def trim(self, config: MediaTrimConfig, step: StepReady) -> dict[str, Any]:
        _rendered(config, "start", "end", "duration", "preset")
        if config.end is not None and config.end <= config.start:
            raise InvalidStepConfig(
                f"end ({config.end:g}s) must be after start ({config.start:g}s)"
            )

        async def work(job: _Job) -> dict[str, Any]:
            clip, label = await job.open(config.source)
            if clip.duration is not None and config.start >= clip.duration:
                raise MediaError(
                    f"{label}: start {config.start:g}s is past the end ({clip.duration:g}s)"
                )
            preset = config.preset or ("mp4-h264" if clip.has_video else "m4a-aac")
            _check_preset(clip, label, preset)
            length = config.duration
            if config.end is not None:
                length = config.end - config.start
            command = commands.trim(
                clip,
                job.output("out" + commands.PRESETS[preset].extension),
                preset=preset,
                start=config.start,
                duration=length,
            )
            await job.run(command, subject=label, doing="trimming")
            return await job.keep(command.output, mime=command.mime, start=config.start)

        return await self._job(step, work)

    async def extract_audio(
        self, config: MediaExtractAudioConfig, step: StepReady
    ) -> dict[str, Any]:
        _rendered(config, "preset", "bitrate_kbps", "sample_rate", "channels")

        async def work(job: _Job) -> dict[str, Any]:
            clip, label = await job.open(config.source)
            if not clip.has_audio:
                raise MediaError(f"{label}: no audio stream to extract")
            command = commands.extract_audio(
                clip,
                job.output("out" + commands.PRESETS[config.preset].extension),
                preset=config.preset,
                bitrate_kbps=config.bitrate_kbps,
                sample_rate=config.sample_rate,
                channels=config.channels,
            )
            await job.run(command, subject=label, doing="extracting the audio")
            return await job.keep(command.output, mime=command.mime)

        return await self._job(step, work)

    async def thumbnail(self, config: MediaThumbnailConfig, step: StepReady) -> dict[str, Any]:
        _rendered(config, "at", "width", "format")

        async def work(job: _Job) -> dict[str, Any]:
            clip, label = await job.open(config.source)
            if not clip.has_video:
                raise MediaError(f"{label}: no video stream to take a picture of")
            at = _thumbnail_time(config.at, clip, label)
            command = commands.thumbnail(
                clip,
                job.output(f"thumbnail.{config.format}"),
                at=at,
                width=config.width,
                image_format=config.format,
            )
            await job.run(command, subject=label, doing="taking a picture")
            return await job.keep(command.output, mime=command.mime, at=round(at, 3))

        return await self._job(step, work)

    async def waveform(self, config: MediaWaveformConfig, step: StepReady) -> dict[str, Any]:
        _rendered(config, "width", "height", "color", "background", "split_channels")

        async def work(job: _Job) -> dict[str, Any]:
            clip, label = await job.open(config.source)
            if not clip.has_audio:
                raise MediaError(f"{label}: no audio stream to draw")
            command = commands.waveform(
                clip,
                job.output("waveform.png"),
                width=config.width,
                height=config.height,
                colour=config.color,
                background=config.background,
                split_channels=config.split_channels,
            )
            await job.run(command, subject=label, doing="drawing the waveform")
            return await job.keep(command.output, mime=command.mime)

        return await self._job(step, work)

    # --- several inputs, or none ------------------------------------------------------

    async def concat(self, config: MediaConcatConfig, step: StepReady) -> dict[str, Any]:
        _rendered(config, "sources", "preset", "width", "height", "fps")
        sources = _source_list(config.sources, "sources")
        if len(sources) < 2:
            raise InvalidStepConfig("sources: concat needs at least two sources")

        async def work(job: _Job) -> dict[str, Any]:
            opened = [await job.open(source) for source in sources]
            clips = [clip for clip, _ in opened]
            for clip, label in opened:
                if clip.duration is None:
                    raise MediaError(f"{label}: a still picture has no length to join")
            any_video = any(c.has_video for c in clips)
            preset = config.preset or ("mp4-h264" if any_video else "m4a-aac")
            if preset not in AUDIO_PRESETS:
                silent = [label for clip, label in opened if not clip.has_video]
                if silent:
                    raise MediaError(
                        f"{silent[0]}: no video stream; a video concat needs video in every "
                        "clip (use an audio preset to join the sound only)"
                    )
            first = next((c for c in clips if c.has_video), clips[0])
            width = config.width or _even(first.width or 1280)
            height = config.height or _even(first.height or 720)
            command = commands.concat(
                clips,
                job.output("out" + commands.PRESETS[preset].extension),
                preset=preset,
                width=width,
                height=height,
                fps=config.fps or first.fps or 25,
            )
            await job.run(command, subject=step.kind, doing=f"joining {len(clips)} clips")
            return await job.keep(command.output, mime=command.mime, clips=len(clips))

        return await self._job(step, work)

    async def render_card(self, config: MediaRenderCardConfig, step: StepReady) -> dict[str, Any]:
        _rendered(config, "width", "height", "background", "color", "font_size", "format")
        _rendered(config, "duration", "fps")
        card = Card(
            width=config.width,
            height=config.height,
            title=config.title,
            text=config.text,
            background=config.background,
            color=config.color,
            font_size=config.font_size,
        )

        async def work(job: _Job) -> dict[str, Any]:
            picture = None
            if config.background_image is not None:
                clip, label = await job.open(config.background_image)
                source = clip.path
                fit = commands.fit_image(
                    source, job.output("background.png"), width=card.width, height=card.height
                )
                await job.run(fit, subject=label, doing="fitting the background")
                picture = fit.output
            png = job.output("card.png")
            report_progress(None, "drawing the card")
            await asyncio.to_thread(draw_card, card, png, picture=picture)
            if config.format == "png":
                return await job.keep(png, mime="image/png")
            command = commands.still_video(
                png, job.output("card.mp4"), duration=config.duration, fps=config.fps
            )
            await job.run(command, subject=step.kind, doing="encoding the card")
            return await job.keep(command.output, mime=command.mime)

        return await self._job(step, work)

    async def slideshow(self, config: MediaSlideshowConfig, step: StepReady) -> dict[str, Any]:
        _rendered(config, "images", "seconds_per_image", "width", "height", "fps", "fade")
        _rendered(config, "background")
        images = _source_list(config.images, "images")
        generated = config.audio if isinstance(config.audio, GeneratedAudio) else None
        if generated is not None:
            _rendered(generated, "generate", "frequency", "volume")

        async def work(job: _Job) -> dict[str, Any]:
            # probed first: an image that is not one fails here, named as given
            paths = [(await job.open(image))[0].path for image in images]
            audio_file = None
            if config.audio is not None and generated is None:
                audio, label = await job.open(config.audio)  # type: ignore[arg-type]
                if not audio.has_audio:
                    raise MediaError(f"{label}: no audio stream for the slideshow")
                audio_file = audio.path
            command = commands.slideshow(
                paths,
                job.output("slideshow.mp4"),
                seconds_per_image=config.seconds_per_image,
                width=config.width,
                height=config.height,
                fps=config.fps,
                fade=config.fade,
                background=config.background,
                audio_file=audio_file,
                generated_audio=generated.model_dump() if generated else None,
            )
            doing = f"making a slideshow of {len(paths)} images"
            await job.run(command, subject=step.kind, doing=doing)
            return await job.keep(command.output, mime=command.mime, images=len(paths))

        return await self._job(step, work)


def _source_list(value: Any, name: str) -> Sequence[str | Mapping[str, Any]]:
    if not isinstance(value, list) or not value:
        raise InvalidStepConfig(f"{name}: expected a non-empty list of sources, got {value!r}")
    for index, item in enumerate(value):
        if not isinstance(item, str | Mapping):
            raise InvalidStepConfig(
                f"{name}.{index}: a source is text or an artifact reference, not {item!r}"
            )
    return value


def _check_preset(clip: Clip, label: str, preset: str) -> None:
    video_preset = commands.PRESETS[preset].video is not None
    if video_preset and not clip.has_video:
        raise MediaError(
            f"{label}: no video stream for the {preset} preset "
            f"(an audio preset fits: {', '.join(AUDIO_PRESETS)})"
        )
    if not video_preset and not clip.has_audio:
        raise MediaError(f"{label}: no audio stream for the {preset} preset")


def _thumbnail_time(at: float | str, clip: Clip, label: str) -> float:
    """``at`` in seconds: a percentage of the duration, kept a frame inside the end."""
    duration = clip.duration
    frame = 1 / (clip.fps or 25)
    if isinstance(at, str):
        if duration is None:
            if clip.extra.get("picture"):
                return 0.0
            raise MediaError(f"{label}: its duration is unknown, so {at} cannot be placed")
        seconds = duration * float(at.rstrip("%")) / 100
        return max(0.0, min(seconds, duration - frame))
    if duration is not None and at >= duration:
        raise MediaError(f"{label}: {at:g}s is past the end ({duration:g}s)")
    return float(at)
