"""Drawing line polygons on page images, and the `--draw` PNG files."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from kosmos_cli.values import Document, Line, Page, PageInfo, PageResult, Point, Status, Task
from kosmos_cli.writers import WriterOptions
from kosmos_cli.writers.drawing import BOX_COLOR, DrawingWriter, draw_boxes

BACKGROUND = (250, 240, 230)


def box(x0: int, y0: int, x1: int, y1: int) -> tuple[Point, Point, Point, Point]:
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def line(text: str, x0: int, y0: int, x1: int, y1: int) -> Line:
    return Line(text, box(x0, y0, x1, y1))


@pytest.mark.parametrize(
    ("size", "stroke"),
    [((200, 100), 1), ((1999, 1200), 2), ((3000, 800), 3)],
)
def test_draw_boxes_outlines_each_polygon(size: tuple[int, int], stroke: int) -> None:
    image = Image.new("RGB", size, BACKGROUND)
    lines = [line("a", 20, 30, 120, 60), Line("no box", None), line("b", 10, 70, 190, 95)]
    drawn = draw_boxes(image, lines)
    assert drawn.size == size and drawn.mode == "RGB"
    for x0, y0, x1, y1 in [(20, 30, 120, 60), (10, 70, 190, 95)]:
        # The outline runs along the edges, inside the box, `stroke` pixels wide.
        for x, y in [(x0, y0), (x1, y1), ((x0 + x1) // 2, y0), ((x0 + x1) // 2, y1), (x0, (y0 + y1) // 2)]:
            assert drawn.getpixel((x, y)) == BOX_COLOR
        assert drawn.getpixel((x0 + stroke - 1, (y0 + y1) // 2)) == BOX_COLOR
        assert drawn.getpixel((x0 + stroke, (y0 + y1) // 2)) == BACKGROUND
        assert drawn.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == BACKGROUND
        assert drawn.getpixel((x0 - 1, (y0 + y1) // 2)) == BACKGROUND
        assert drawn.getpixel((x1 + 1, (y0 + y1) // 2)) == BACKGROUND
    assert image.getpixel((20, 30)) == BACKGROUND  # the original is untouched


def test_draw_boxes_converts_any_mode() -> None:
    drawn = draw_boxes(Image.new("L", (50, 50), 200), [line("a", 5, 5, 40, 40)])
    assert drawn.mode == "RGB"
    assert drawn.getpixel((5, 5)) == BOX_COLOR
    assert drawn.getpixel((20, 20)) == (200, 200, 200)


def reddish(image: Image.Image, area: tuple[int, int, int, int]) -> int:
    """Count pixels in an area that are mostly red (label glyphs are anti-aliased)."""
    red, green, _ = image.crop(area).split()
    return sum(1 for r, g in zip(red.tobytes(), green.tobytes(), strict=True) if r > 200 and g < 120)


def test_numbers_sit_above_the_box_or_inside_at_the_top() -> None:
    image = Image.new("RGB", (400, 300), BACKGROUND)
    lines = [line("first", 10, 2, 200, 40), line("second", 10, 150, 200, 190)]
    plain = draw_boxes(image, lines)
    numbered = draw_boxes(image, lines, numbered=True)
    # Second box: a label above its top edge, nothing there without numbers.
    assert reddish(plain, (10, 120, 60, 149)) == 0
    assert reddish(numbered, (10, 120, 60, 149)) > 0
    # First box starts at the top of the image: its label goes just inside.
    assert reddish(plain, (12, 4, 60, 30)) == 0
    assert reddish(numbered, (12, 4, 60, 30)) > 0
    # Far from any label the two drawings agree.
    assert plain.crop((100, 200, 400, 300)).tobytes() == numbered.crop((100, 200, 400, 300)).tobytes()


@pytest.mark.parametrize(
    ("name", "page_index", "page_count", "expected"),
    [
        ("scan.png", 0, 1, "scan.png.boxes.png"),
        ("a/b.pdf", 0, 1, "a/b.pdf.boxes.png"),
        ("a/b.pdf", 0, 3, "a/b.pdf-p001.boxes.png"),
        ("report.pdf", 41, 120, "report.pdf-p042.boxes.png"),
        ("book.pdf", 1233, 2000, "book.pdf-p1234.boxes.png"),
    ],
)
def test_drawing_file_names(name: str, page_index: int, page_count: int, expected: str) -> None:
    assert DrawingWriter().file_name(Document(f"/in/{name}", name), page_index, page_count) == expected


def test_a_drawing_is_a_png_of_the_page() -> None:
    info = PageInfo(Document("/in/a.png", "a"), 0, 1, 120, 80)
    page = Page(info, Image.new("RGB", (120, 80), BACKGROUND))
    result = PageResult(info, Task.OCR, "x", lines=(line("x", 10, 10, 60, 30),))
    drawn = DrawingWriter(WriterOptions(numbered=False)).render_page(page, result)
    assert drawn is not None
    png = Image.open(io.BytesIO(drawn))
    assert png.format == "PNG" and png.size == (120, 80)
    assert png.convert("RGB").getpixel((10, 10)) == BOX_COLOR
    assert png.convert("RGB").getpixel((30, 20)) == BACKGROUND


def test_a_drawing_refuses_another_page() -> None:
    document = Document("/in/a.pdf", "a")
    page = Page(PageInfo(document, 0, 2, 10, 10), Image.new("RGB", (10, 10)))
    result = PageResult(PageInfo(document, 1, 2, 10, 10), Task.OCR, "")
    with pytest.raises(ValueError, match="not the page"):
        DrawingWriter().render_page(page, result)


def test_a_failed_page_gets_no_drawing() -> None:
    info = PageInfo(Document("/in/a.png", "a"), 0, 1, 10, 10)
    page = Page(info, Image.new("RGB", (10, 10)))
    failed = PageResult(info, Task.OCR, "", status=Status.FAILED, error="out of memory")
    assert DrawingWriter().render_page(page, failed) is None
