"""Cards drawn with Pillow: text wrapped and sized to fit, hostile text only ever text."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from conveyor.media.cards import Card, _fitting_block, _font, _wrap, draw_card


def _ink(path: Path, colour: tuple[int, int, int]) -> int:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        width, height = rgb.size
        return sum(1 for x in range(width) for y in range(height) if rgb.getpixel((x, y)) == colour)


def test_a_card_is_a_png_of_the_size_asked_with_the_text_drawn(tmp_path: Path) -> None:
    out = tmp_path / "card.png"
    card = Card(320, 180, "Sea otters", "hold hands while they sleep", "#102030", "#ffffff")
    draw_card(card, out)
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (320, 180))
        assert image.getpixel((0, 0))[:3] == (0x10, 0x20, 0x30)
    assert _ink(out, (255, 255, 255)) > 200


def test_hostile_text_is_only_text(tmp_path: Path) -> None:
    hostile = "it's \"quoted\"; a:b, [0:v] -vf drawtext=text=x\n%{pts} \\ '\n\n--help"
    out = tmp_path / "card.png"
    draw_card(Card(640, 360, hostile, hostile, "#000000", "#ffffff"), out)
    assert _ink(out, (255, 255, 255)) > 500


def test_text_wraps_and_shrinks_to_fit() -> None:
    card = Card(320, 180, "A title", "word " * 60, "#000000", "#ffffff")
    block = _fitting_block(card, box_width=280, box_height=140)
    assert block.height <= 140
    assert block.width <= 280
    assert len(block.lines) > 3
    font = _font(20, bold=False)
    assert _wrap("x" * 500, font, 100)[0] != "x" * 500  # a word too long for a line is cut
    assert _wrap("one\ntwo", font, 1000) == ["one", "two"]


def test_a_card_over_a_picture(tmp_path: Path) -> None:
    picture = tmp_path / "red.png"
    Image.new("RGB", (160, 90), (255, 0, 0)).save(picture)
    out = tmp_path / "card.png"
    draw_card(Card(160, 90, "Hi", None, "#000000", "#ffffff"), out, picture=picture)
    with Image.open(out) as image:
        assert image.getpixel((1, 1))[:3] == (255, 0, 0)
    assert _ink(out, (255, 255, 255)) > 10
