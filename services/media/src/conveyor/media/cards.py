"""Cards drawn with Pillow: a title and a text, wrapped and sized to fit, on a colour or
a picture.

Text is drawn here rather than by ffmpeg's drawtext because drawtext needs a font file and
a build with libfreetype, and its text lives inside a filter graph whose escaping rules
have caught many a program out; here a caption with quotes, colons, semicolons or new
lines is only ever text. The font is DejaVu Sans when the machine has it (most Debian
images do; it covers most scripts), else the one bundled with Pillow.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["Card", "draw_card"]

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
_FONTS = {False: "DejaVuSans.ttf", True: "DejaVuSans-Bold.ttf"}
_MARGIN = 0.08
_LINE_SPACING = 1.25
_TITLE_SCALE = 1.6


@dataclass(frozen=True)
class Card:
    width: int
    height: int
    title: str | None
    text: str | None
    background: str
    color: str
    font_size: int | None = None


@functools.lru_cache(maxsize=64)
def _font(size: int, *, bold: bool) -> Font:
    try:
        return ImageFont.truetype(_FONTS[bold], size)
    except OSError:
        return ImageFont.load_default(size)


def _width(font: Font, text: str) -> float:
    return float(font.getlength(text))


def _wrap(text: str, font: Font, max_width: float) -> list[str]:
    """Greedy word wrap by measured width; a word too long for a line is cut."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if _width(font, candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while _width(font, word) > max_width and len(word) > 1:
                cut = len(word)
                while cut > 1 and _width(font, word[:cut]) > max_width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


@dataclass(frozen=True)
class _Block:
    lines: list[tuple[str, Font, int]]  # text, font, line height
    height: int
    width: float


def _layout(card: Card, size: int, box_width: float) -> _Block:
    lines: list[tuple[str, Font, int]] = []
    parts = [(card.title, True, round(size * _TITLE_SCALE)), (card.text, False, size)]
    for index, (text, bold, font_size) in enumerate(parts):
        if not text:
            continue
        if lines and index:
            lines.append(("", _font(size, bold=False), round(size * 0.6)))  # a gap
        font = _font(font_size, bold=bold)
        step = round(font_size * _LINE_SPACING)
        lines.extend((line, font, step) for line in _wrap(text, font, box_width))
    width = max((_width(font, text) for text, font, _ in lines), default=0.0)
    return _Block(lines, sum(step for _, _, step in lines), width)


def _fitting_block(card: Card, box_width: float, box_height: float) -> _Block:
    """At the size asked for, else the largest size whose wrapped text fits the box."""
    if card.font_size is not None:
        return _layout(card, card.font_size, box_width)
    low, high = 6, max(6, int(box_height))
    best = _layout(card, low, box_width)
    while low <= high:
        middle = (low + high) // 2
        block = _layout(card, middle, box_width)
        if block.height <= box_height and block.width <= box_width:
            best, low = block, middle + 1
        else:
            high = middle - 1
    return best


def draw_card(card: Card, output: Path, *, picture: Path | None = None) -> None:
    """Write ``card`` as a PNG; ``picture`` (already ``width`` x ``height``) under it."""
    if picture is not None:
        with Image.open(picture) as opened:
            image = opened.convert("RGBA").resize((card.width, card.height))
    else:
        image = Image.new("RGBA", (card.width, card.height), card.background)
    margin = round(min(card.width, card.height) * _MARGIN)
    box_width, box_height = card.width - 2 * margin, card.height - 2 * margin
    block = _fitting_block(card, box_width, box_height)
    top = (card.height - block.height) / 2
    if picture is not None:
        # a veil of the background colour under the text keeps it readable on any picture
        veil = Image.new("RGBA", image.size, (0, 0, 0, 0))
        pad = margin / 2
        red, green, blue = (int(card.background[i : i + 2], 16) for i in (1, 3, 5))
        shade = (red, green, blue, 150)
        ImageDraw.Draw(veil).rectangle(
            (
                (card.width - block.width) / 2 - pad,
                top - pad,
                (card.width + block.width) / 2 + pad,
                top + block.height + pad,
            ),
            fill=shade,
        )
        image = Image.alpha_composite(image, veil)
    draw = ImageDraw.Draw(image)
    y = top
    for text, font, step in block.lines:
        if text:
            x = (card.width - _width(font, text)) / 2
            draw.text((x, y), text, font=font, fill=card.color)
        y += step
    image.convert("RGB").save(output, format="PNG")
