"""`--draw` (ocr task): a PNG per page with each line's polygon drawn, as the model card's example does."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from kosmos_cli.values import Document, Line, Page, PageResult, Status, Task
from kosmos_cli.writers import PageWriter, page_file_name, register

DRAWING_SUFFIX = ".boxes.png"  # NAME.boxes.png, NAME-p001.boxes.png; folder walks skip these
BOX_COLOR = (255, 0, 0)  # RGB of polygon outlines and numbers
LABEL_BACKGROUND = (255, 255, 255)  # RGB behind line numbers so they stay legible
PIXELS_PER_STROKE = 1000  # one pixel of outline width per this many pixels of the image's long side
LABEL_HEIGHT_SHARE = 0.012  # line-number height as a share of the image's long side
MIN_LABEL_HEIGHT = 10  # pixels


def draw_boxes(
    image: Image.Image,
    lines: Sequence[Line],
    *,
    numbered: bool = False,
    scale: tuple[float, float] = (1.0, 1.0),
) -> Image.Image:
    """Return an RGB copy of the image with each line's polygon outlined, optionally numbered from 1.

    `scale` maps the lines' pixels onto the image's, for an image shrunk from the page they are in.
    """
    canvas = image.convert("RGB")  # always a copy, even when the image is RGB already
    draw = ImageDraw.Draw(canvas)
    long_side = max(canvas.size)
    stroke = max(1, round(long_side / PIXELS_PER_STROKE))
    font = ImageFont.load_default(size=max(MIN_LABEL_HEIGHT, round(long_side * LABEL_HEIGHT_SHARE)))
    for number, line in enumerate(lines, start=1):
        if line.polygon is None:
            continue
        polygon = [(round(x * scale[0]), round(y * scale[1])) for x, y in line.polygon]
        draw.polygon(polygon, outline=BOX_COLOR, width=stroke)
        if numbered:
            x0, y0 = polygon[0]
            label = str(number)
            _, top, _, bottom = draw.textbbox((0, 0), label, font=font)
            # Above the box's top-left corner when there is room, else just inside it.
            above = y0 - (bottom - top) - stroke
            origin = (x0, (above if above >= 0 else y0 + stroke) - top)
            draw.rectangle(draw.textbbox(origin, label, font=font), fill=LABEL_BACKGROUND)
            draw.text(origin, label, fill=BOX_COLOR, font=font)
    return canvas


@register
class DrawingWriter(PageWriter):
    """A PNG of each page with its lines' polygons drawn, numbered with --numbered."""

    format = "draw"
    media_type = "image/png"
    tasks = frozenset({Task.OCR})
    option = "--draw"
    needs_folder = "PNG files"

    def file_name(self, document: Document, page_index: int, page_count: int) -> str:
        """Return `NAME.boxes.png` for a one-page document, else `NAME-p001.boxes.png` (1-based)."""
        return page_file_name(document, page_index, page_count, DRAWING_SUFFIX)

    def render_page(self, page: Page | None, result: PageResult) -> bytes | None:
        """Return the PNG of the page with its lines drawn; None for a failed page."""
        if page is None or page.info != result.info:
            raise ValueError("the result is not the page's")
        if result.status is Status.FAILED:
            return None
        buffer = io.BytesIO()
        draw_boxes(page.image, result.lines, numbered=self.options.numbered, scale=page.scale).save(
            buffer, "PNG"
        )
        return buffer.getvalue()
