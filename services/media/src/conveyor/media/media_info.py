"""What a probe reports, in one shape whichever tool read the file.

``{"duration", "format", "size", "bit_rate", "streams": [{"index", "type", "codec",
"width", "height", "fps", "sample_rate", "channels"}]}``. ffprobe's JSON is the precise
source; without ffprobe, ffmpeg's banner (``ffmpeg -i FILE`` on stderr) says the same
things in text, rounded as ffmpeg prints them (bit rates in kb/s).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["from_ffmpeg_banner", "from_ffprobe_json"]

_INPUT = re.compile(r"^Input #0, (?P<format>.+?), from ", re.MULTILINE)
_DURATION = re.compile(
    r"^\s*Duration: (?P<duration>N/A|(?P<h>\d+):(?P<m>\d{2}):(?P<s>\d{2}(?:\.\d+)?))"
    r".*?bitrate: (?P<bit_rate>N/A|\d+) kb/s",
    re.MULTILINE,
)
_STREAM = re.compile(
    r"^\s*Stream #0:(?P<index>\d+)(?:\[[^\]]*\])?(?:\([^)]*\))?: (?P<type>\w+): (?P<rest>.*)$",
    re.MULTILINE,
)
_CODEC = re.compile(r"^(?P<codec>[\w.-]+)")
_RESOLUTION = re.compile(r"(?:^|[\s,])(?P<w>\d{1,5})x(?P<h>\d{1,5})(?=[\s,\[]|$)")
_FPS = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<k>k?) (?:fps|tbr)\b")
_SAMPLE_RATE = re.compile(r"(?P<rate>\d+) Hz(?:, (?P<layout>[^,]+))?")
_CHANNELS = re.compile(r"^(?P<n>\d+) channels")
_LAYOUT_CHANNELS = {
    "mono": 1,
    "stereo": 2,
    "2.1": 3,
    "3.0": 3,
    "3.0(back)": 3,
    "quad": 4,
    "4.0": 4,
    "4.1": 5,
    "5.0": 5,
    "5.1": 6,
    "6.0": 6,
    "6.1": 7,
    "7.0": 7,
    "7.1": 8,
}


def _stream(
    *,
    index: int,
    type: str,
    codec: str | None,
    width: int | None = None,
    height: int | None = None,
    fps: float | None = None,
    sample_rate: int | None = None,
    channels: int | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "type": type,
        "codec": codec,
        "width": width,
        "height": height,
        "fps": fps,
        "sample_rate": sample_rate,
        "channels": channels,
    }


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _rate(value: str | None) -> float | None:
    """``"30000/1001"`` -> 29.97; ``"0/0"`` (no rate) -> None."""
    if not value:
        return None
    num, _, den = value.partition("/")
    try:
        rate = float(num) / float(den or 1)
    except (ValueError, ZeroDivisionError):
        return None
    return round(rate, 3) if rate > 0 else None


def from_ffprobe_json(data: dict[str, Any], *, size: int) -> dict[str, Any]:
    fmt = data.get("format") or {}
    streams: list[dict[str, Any]] = []
    for raw in data.get("streams") or []:
        kind = raw.get("codec_type") or "unknown"
        is_video = kind == "video"
        is_audio = kind == "audio"
        streams.append(
            _stream(
                index=int(raw.get("index", len(streams))),
                type=kind,
                codec=raw.get("codec_name"),
                width=_int(raw.get("width")) if is_video else None,
                height=_int(raw.get("height")) if is_video else None,
                fps=(_rate(raw.get("avg_frame_rate")) or _rate(raw.get("r_frame_rate")))
                if is_video
                else None,
                sample_rate=_int(raw.get("sample_rate")) if is_audio else None,
                channels=_int(raw.get("channels")) if is_audio else None,
            )
        )
    return {
        "duration": _float(fmt.get("duration")),
        "format": fmt.get("format_name"),
        "size": size,
        "bit_rate": _int(fmt.get("bit_rate")),
        "streams": streams,
    }


def from_ffmpeg_banner(text: str, *, size: int) -> dict[str, Any] | None:
    """Parse ``ffmpeg -hide_banner -i FILE``'s stderr; None when no input was opened."""
    head = _INPUT.search(text)
    if head is None:
        return None
    duration: float | None = None
    bit_rate: int | None = None
    match = _DURATION.search(text, head.end())
    if match is not None:
        if match["h"] is not None:
            duration = int(match["h"]) * 3600 + int(match["m"]) * 60 + float(match["s"])
        bit_rate = None if match["bit_rate"] == "N/A" else int(match["bit_rate"]) * 1000
    streams = [_banner_stream(m) for m in _STREAM.finditer(text, head.end())]
    return {
        "duration": duration,
        "format": head["format"],
        "size": size,
        "bit_rate": bit_rate,
        "streams": streams,
    }


def _banner_stream(match: re.Match[str]) -> dict[str, Any]:
    kind = match["type"].lower()
    rest = match["rest"]
    codec = _CODEC.match(rest)
    fields: dict[str, Any] = {}
    if kind == "video":
        resolution = _RESOLUTION.search(rest)
        if resolution is not None:
            fields["width"], fields["height"] = int(resolution["w"]), int(resolution["h"])
        fps = _FPS.search(rest)
        if fps is not None:
            fields["fps"] = round(float(fps["n"]) * (1000 if fps["k"] else 1), 3)
    elif kind == "audio":
        audio = _SAMPLE_RATE.search(rest)
        if audio is not None:
            fields["sample_rate"] = int(audio["rate"])
            fields["channels"] = _channels(audio["layout"])
    return _stream(
        index=int(match["index"]),
        type=kind,
        codec=codec["codec"] if codec is not None else None,
        **fields,
    )


def _channels(layout: str | None) -> int | None:
    if not layout:
        return None
    layout = layout.strip()
    counted = _CHANNELS.match(layout)
    if counted is not None:
        return int(counted["n"])
    return _LAYOUT_CHANNELS.get(layout) or _LAYOUT_CHANNELS.get(layout.split("(", 1)[0])
