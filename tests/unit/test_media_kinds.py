"""The media kinds' configs, checked at registration: closed sets, bounded numbers,
#rrggbb colours, seconds or "12%"; templates accepted there and checked once rendered."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
from pydantic import ValidationError

from conveyor.contracts import KIND_CONFIGS, RUNNER_KINDS, PipelineInvalid, load_pipeline
from conveyor.contracts.kinds_media import (
    GeneratedAudio,
    MediaConcatConfig,
    MediaRenderCardConfig,
    MediaSlideshowConfig,
    MediaThumbnailConfig,
    MediaTranscodeConfig,
    MediaTrimConfig,
)

MEDIA_KINDS = [
    "media.probe",
    "media.transcode",
    "media.thumbnail",
    "media.extract_audio",
    "media.trim",
    "media.concat",
    "media.render_card",
    "media.slideshow",
    "media.waveform",
]


def test_every_media_kind_is_served_by_the_media_runner() -> None:
    assert list(RUNNER_KINDS["media"]) == MEDIA_KINDS
    assert all(kind in KIND_CONFIGS for kind in MEDIA_KINDS)


def test_a_pipeline_of_media_steps_registers() -> None:
    spec = load_pipeline(
        textwrap.dedent(
            """
            name: video
            input: {clip: {type: string}, at: {type: number, default: 1}}
            steps:
              - {id: small, type: media.transcode,
                 with: {source: "{{ input.clip }}", preset: webm-vp9, resolution: 360p}}
              - {id: cut, type: media.trim,
                 with: {source: "{{ steps.small.output }}", start: "{{ input.at }}", end: 4}}
              - {id: cards, type: media.render_card, for_each: "{{ [1, 2] }}",
                 with: {text: "Card {{ item }}: it's \\"quoted\\"; a:b", width: 640, height: 360}}
              - {id: show, type: media.slideshow, needs: [cards, cut],
                 with: {images: "{{ steps.cards.output }}", width: 640, height: 360,
                        audio: {generate: chord, frequency: 330}}}
              - {id: thumb, type: media.thumbnail, with: {source: "{{ steps.show.output }}",
                 at: "50%"}}
            """
        ),
        source="video.yaml",
    )
    assert [s.type for s in spec.steps][-1] == "media.thumbnail"


def _problems(kind: str, config: dict[str, Any]) -> list[str]:
    text = f"name: p\nsteps:\n  - id: a\n    type: {kind}\n    with: {config!r}\n"
    with pytest.raises(PipelineInvalid) as caught:
        load_pipeline(text.replace("'", '"'), source="p.yaml")
    return [f"{p.field}: {p.message}" for p in caught.value.problems]


@pytest.mark.parametrize(
    ("kind", "config", "fragment"),
    [
        ("media.transcode", {"source": "a.mp4", "preset": "avi-divx"}, "with.preset"),
        ("media.transcode", {"source": "a.mp4", "resolution": "4k"}, "with.resolution"),
        ("media.transcode", {"source": "a.mp4", "video_bitrate_kbps": 1}, "greater than or"),
        ("media.transcode", {"source": "a.mp4", "codec": "x"}, "with.codec: unknown field"),
        ("media.transcode", {"source": ""}, "with.source"),
        ("media.thumbnail", {"source": "a.mp4", "at": "120%"}, "with.at"),
        ("media.thumbnail", {"source": "a.mp4", "at": -1}, "with.at"),
        ("media.thumbnail", {"source": "a.mp4", "format": "bmp"}, "with.format"),
        ("media.trim", {"source": "a.mp4", "start": 5, "end": 2}, "must be after start"),
        ("media.trim", {"source": "a.mp4", "end": 3, "duration": 1}, "not both"),
        ("media.concat", {"sources": ["a.mp4"]}, "at least two"),
        ("media.concat", {"sources": "a.mp4"}, "with.sources"),
        ("media.concat", {"sources": ["a", "b"], "width": 640}, "both width and height"),
        ("media.render_card", {"width": 640}, "a title or a text"),
        ("media.render_card", {"text": "x", "background": "red"}, "with.background"),
        ("media.render_card", {"text": "x", "color": "#12345"}, "with.color"),
        ("media.render_card", {"text": "x", "width": 99999}, "with.width"),
        ("media.render_card", {"text": "x", "format": "mp4", "width": 641}, "must be even"),
        ("media.slideshow", {"images": []}, "with.images"),
        ("media.slideshow", {"images": ["a"], "fade": 2, "seconds_per_image": 3}, "must fit"),
        ("media.slideshow", {"images": ["a"], "audio": {"generate": "noise"}}, "with.audio"),
        ("media.waveform", {"source": "a.mp3", "color": "#zzzzzz"}, "with.color"),
        ("media.extract_audio", {"source": "a.mp4", "preset": "mp4-h264"}, "with.preset"),
        ("media.extract_audio", {"source": "a.mp4", "channels": 6}, "with.channels"),
    ],
)
def test_bad_configs_are_refused_at_registration(
    kind: str, config: dict[str, Any], fragment: str
) -> None:
    problems = _problems(kind, config)
    assert any(fragment in p for p in problems), problems


def test_templates_wait_for_the_runner_which_checks_them_strictly() -> None:
    template = MediaTranscodeConfig.model_validate(
        {"source": "{{ input.a }}", "preset": "{{ input.p }}", "fps": "{{ input.fps }}"}
    )
    assert template.preset == "{{ input.p }}"
    rendered = {"source": "a.mp4", "preset": "mp4-h264", "fps": 30}
    assert MediaTranscodeConfig.model_validate(rendered).fps == 30
    with pytest.raises(ValidationError, match="preset"):
        MediaTranscodeConfig.model_validate({**rendered, "preset": "rendered-to-junk"})
    with pytest.raises(ValidationError, match="fps"):
        MediaTranscodeConfig.model_validate({**rendered, "fps": "thirty"})


def test_thumbnail_time_is_seconds_or_a_percentage() -> None:
    assert MediaThumbnailConfig(source="a", at=2.5).at == 2.5
    assert MediaThumbnailConfig(source="a", at="12.5%").at == "12.5%"
    assert MediaThumbnailConfig(source="a", at="100%").at == "100%"
    assert MediaThumbnailConfig(source="a").at == "10%"
    assert MediaThumbnailConfig.model_validate({"source": "a", "at": "3"}).at == 3.0


def test_sources_may_be_artifact_references() -> None:
    ref = {"uri": "artifact://sha256/" + "a" * 64, "sha256": "a" * 64, "mime": "video/mp4"}
    assert MediaTrimConfig(source=ref, start=1).source == ref
    concat = MediaConcatConfig.model_validate({"sources": [ref, "b.mp4"]})
    assert concat.sources == [ref, "b.mp4"]
    fan_in = MediaConcatConfig.model_validate({"sources": "{{ steps.cards.output }}"})
    assert fan_in.sources == "{{ steps.cards.output }}"


def test_slideshow_audio_is_a_source_or_a_generated_track() -> None:
    generated = MediaSlideshowConfig.model_validate(
        {"images": ["a"], "audio": {"generate": "sine"}}
    )
    assert generated.audio == GeneratedAudio(generate="sine")
    ref = {"uri": "artifact://sha256/" + "b" * 64}
    assert MediaSlideshowConfig.model_validate({"images": ["a"], "audio": ref}).audio == ref
    assert MediaSlideshowConfig.model_validate({"images": ["a"], "audio": "x.mp3"}).audio == "x.mp3"


def test_card_text_is_any_text() -> None:
    hostile = "it's \"quoted\"; a:b, [0:v] -vf x=1\n%{pts} \\ '"
    card = MediaRenderCardConfig(title=hostile, text=hostile)
    assert card.text == hostile


def test_every_kind_is_named_once_in_step_kind_and_served_by_one_runner() -> None:
    from typing import get_args

    from conveyor.contracts.kinds import KIND_CONFIGS, RUNNER_KINDS, StepKind

    assert set(get_args(StepKind)) == set(KIND_CONFIGS)
    served = [kind for kinds in RUNNER_KINDS.values() for kind in kinds]
    assert sorted(served) == sorted(KIND_CONFIGS)
