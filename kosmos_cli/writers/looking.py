"""`--attention`'s pictures, two PNGs per page (both tasks):

- `NAME.attention.png` (`NAME-p001.attention.png`): the page with each markdown block's region, or each
  OCR line's box, outlined and numbered as the JSON lists them;
- `NAME.heat.png`: one panel per block or line, numbered alike: the page dimmed under where that
  block's tokens looked, brightest where most of their attention went.

Drawn from the maps the run kept (`PageResult.attention`), so `kosmos convert` cannot remake them.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw, ImageFont

from kosmos_cli.blocks import markdown_blocks
from kosmos_cli.values import BBox, Document, Heat, Line, Page, PageResult, Point, Status, Task
from kosmos_cli.writers import PageWriter, page_file_name, register
from kosmos_cli.writers.drawing import draw_boxes

OVERVIEW_SUFFIX = ".attention.png"  # folder walks skip these, as they skip drawings
HEAT_SUFFIX = ".heat.png"
PANEL_SIDE = 360  # pixels of a heat panel's long side
PANEL_COLUMNS = 4
DIM = 0.35  # how much of the page's brightness a heat panel keeps under no attention
HEAT_COLOR = (255, 64, 0)
LABEL_HEIGHT = 18


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


class _AttentionPictures(PageWriter):
    tasks = frozenset({Task.MD, Task.OCR})
    option = "--attention"
    needs_folder = "PNG files"
    media_type = "image/png"
    suffix = ""

    def file_name(self, document: Document, page_index: int, page_count: int) -> str:
        return page_file_name(document, page_index, page_count, self.suffix)

    def render_page(self, page: Page | None, result: PageResult) -> bytes | None:
        """The page's picture; None for a page the model did not read (failed, or its text layer)."""
        if page is None or page.info != result.info:
            raise ValueError("the result is not the page's")
        if result.status is Status.FAILED or result.attention is None:
            return None
        return _png(self.picture(page, result))

    def picture(self, page: Page, result: PageResult) -> Image.Image:
        raise NotImplementedError


@register
class OverviewWriter(_AttentionPictures):
    """Each block's region (md) or line's box (ocr) outlined and numbered over the page."""

    format = "attention"
    suffix = OVERVIEW_SUFFIX

    def picture(self, page: Page, result: PageResult) -> Image.Image:
        if result.task is Task.OCR:
            outlined = list(result.lines)
        else:
            outlined = [
                Line(block.text or "-", None if region is None else _polygon(region.box))
                for block, region in zip(markdown_blocks(result.text), result.regions, strict=False)
            ]
        return draw_boxes(page.image, outlined, numbered=True, scale=page.scale)


@register
class HeatWriter(_AttentionPictures):
    """One panel per block or line: the page dimmed under where its tokens looked."""

    format = "heat"
    suffix = HEAT_SUFFIX

    def picture(self, page: Page, result: PageResult) -> Image.Image:
        assert result.attention is not None
        heats = result.attention.items
        scale = PANEL_SIDE / max(page.image.size)
        size = (max(1, round(page.image.width * scale)), max(1, round(page.image.height * scale)))
        thumbnail = page.image.convert("RGB").resize(size)
        dimmed = Image.blend(Image.new("RGB", size), thumbnail, DIM)
        rows = max(1, math.ceil(len(heats) / PANEL_COLUMNS))
        columns = min(PANEL_COLUMNS, max(1, len(heats)))
        sheet = Image.new("RGB", (columns * size[0], rows * (size[1] + LABEL_HEIGHT)), "white")
        draw = ImageDraw.Draw(sheet)
        font = ImageFont.load_default(size=LABEL_HEIGHT - 4)
        # The map is in the page's full-size pixels; the panel shows the image, which may be shrunk.
        to_panel = (scale * page.scale[0], scale * page.scale[1])
        for number, heat in enumerate(heats, start=1):
            left = ((number - 1) % columns) * size[0]
            top = ((number - 1) // columns) * (size[1] + LABEL_HEIGHT)
            label = f"{number}" if heat is None else f"{number}  on page {heat.spatial:.0%}"
            draw.text((left + 4, top + 2), label, fill="black", font=font)
            panel = dimmed if heat is None else _heated(thumbnail, dimmed, heat, to_panel)
            sheet.paste(panel, (left, top + LABEL_HEIGHT))
        return sheet


def _heated(
    thumbnail: Image.Image, dimmed: Image.Image, heat: Heat, scale: tuple[float, float]
) -> Image.Image:
    """The dimmed page brightened back, and tinted, where the heat is: its peak at full brightness."""
    import numpy as np

    x0, y0, x1, y1 = heat.box
    box = (round(x0 * scale[0]), round(y0 * scale[1]), round(x1 * scale[0]), round(y1 * scale[1]))
    placed = Heat(heat.grid, (box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)))
    density = placed.on_page(*thumbnail.size)
    peak = float(density.max())
    if peak <= 0:
        return dimmed
    weight = (density / peak)[..., None]
    tint = np.asarray(thumbnail, dtype=np.float32) * 0.5 + np.array(HEAT_COLOR, dtype=np.float32) * 0.5
    mixed = np.asarray(dimmed, dtype=np.float32) * (1 - weight) + tint * weight
    return Image.fromarray(mixed.clip(0, 255).astype(np.uint8))


def _polygon(box: BBox) -> tuple[Point, Point, Point, Point]:
    x0, y0, x1, y1 = box
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))
