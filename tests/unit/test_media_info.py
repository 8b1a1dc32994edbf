"""Reading ffmpeg's banner and ffprobe's JSON into one shape, on text ffmpeg really prints."""

from __future__ import annotations

from conveyor.media.media_info import from_ffmpeg_banner, from_ffprobe_json

MKV_BANNER = """\
Input #0, matroska,webm, from 'file:/media/movie, part 1.mkv':
  Metadata:
    ENCODER         : Lavf60.3.100
  Duration: 01:02:03.50, start: 0.000000, bitrate: 4521 kb/s
  Chapters:
    Chapter #0:0: start 0.000000, end 60.000000
  Stream #0:0(eng): Video: hevc (Main 10), yuv420p10le(tv, bt2020nc/bt2020/smpte2084), \
1920x1080 [SAR 1:1 DAR 16:9], 29.97 fps, 29.97 tbr, 1k tbn (default)
    Metadata:
      DURATION        : 01:02:03.500000000
  Stream #0:1(eng): Audio: eac3, 48000 Hz, 5.1(side), fltp, 640 kb/s (default)
  Stream #0:2(fre): Audio: opus, 48000 Hz, 3 channels, fltp
  Stream #0:3(eng): Subtitle: subrip
At least one output file must be specified
"""

IMAGE_BANNER = """\
Input #0, png_pipe, from 'file:/media/frame.png':
  Duration: N/A, bitrate: N/A
  Stream #0:0: Video: png, rgb24(pc), 640x480, 25 tbr, 25 tbn
At least one output file must be specified
"""


def test_banner_of_a_film() -> None:
    info = from_ffmpeg_banner(MKV_BANNER, size=123)
    assert info is not None
    assert info["format"] == "matroska,webm"
    assert info["duration"] == 3723.5
    assert info["bit_rate"] == 4_521_000
    assert info["size"] == 123
    video, surround, odd, subtitle = info["streams"]
    assert (video["codec"], video["width"], video["height"], video["fps"]) == (
        "hevc",
        1920,
        1080,
        29.97,
    )
    assert (surround["codec"], surround["sample_rate"], surround["channels"]) == ("eac3", 48000, 6)
    assert odd["channels"] == 3
    assert subtitle == {
        "index": 3,
        "type": "subtitle",
        "codec": "subrip",
        "width": None,
        "height": None,
        "fps": None,
        "sample_rate": None,
        "channels": None,
    }


def test_banner_of_an_image() -> None:
    info = from_ffmpeg_banner(IMAGE_BANNER, size=1)
    assert info is not None
    assert (info["duration"], info["bit_rate"], info["format"]) == (None, None, "png_pipe")
    [image] = info["streams"]
    assert (image["width"], image["height"], image["fps"]) == (640, 480, 25.0)


def test_banner_without_input() -> None:
    text = "[in#0 @ 0x1] Error opening input: Invalid data found when processing input\n"
    assert from_ffmpeg_banner(text, size=0) is None


def test_ffprobe_json() -> None:
    data = {
        "format": {"format_name": "mov,mp4", "duration": "10.010000", "bit_rate": "800000"},
        "streams": [
            {
                "index": 0,
                "codec_type": "video",
                "codec_name": "h264",
                "width": 1280,
                "height": 720,
                "avg_frame_rate": "0/0",
                "r_frame_rate": "30000/1001",
            },
            {
                "index": 1,
                "codec_type": "audio",
                "codec_name": "aac",
                "sample_rate": "44100",
                "channels": 2,
            },
            {"index": 2, "codec_type": "data", "codec_name": "bin_data"},
        ],
    }
    info = from_ffprobe_json(data, size=9)
    assert (info["duration"], info["bit_rate"], info["format"]) == (10.01, 800_000, "mov,mp4")
    video, audio, data_stream = info["streams"]
    assert video["fps"] == 29.97
    assert (audio["sample_rate"], audio["channels"], audio["fps"]) == (44100, 2, None)
    assert (data_stream["type"], data_stream["codec"]) == ("data", "bin_data")
