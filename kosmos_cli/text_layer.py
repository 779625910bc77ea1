"""A PDF page's own text (`--text-layer`): is it real, its lines and words, and does it replace the model.

`read_text_layer` runs in the reader process, beside rendering, on the open PyMuPDF page. It sorts the page
into one of three kinds (`LayerKind`):

- DIGITAL: at least MIN_LAYER_CHARS visible characters, images covering less than MAX_IMAGE_COVER
  of the page, and almost every glyph mapped to a character: text the page was made with;
- OCR: text that is invisible (PDF render mode 3, how OCR engines lay text over a scan) or sits on
  a page mostly covered by images: another engine's reading of pixels;
- NONE: no text, too little, or glyphs that map to no characters (U+FFFD).

`layer_result` then decides, by the job's mode, whether a page's result comes from that layer:

- `auto`: DIGITAL pages give their own lines; the others go to the model;
- `ignore`: every page goes to the model;
- `only`: DIGITAL and OCR pages give their own lines, the others fail; the model never loads.

`kosmos md` always runs the model: a text layer has no markdown structure (headings, tables, lists).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from kosmos_cli.errors import InputError
from kosmos_cli.values import (
    LayerKind,
    Line,
    Page,
    PageResult,
    TextLayer,
    TextSource,
    Word,
    failed_result,
)

if TYPE_CHECKING:
    import pymupdf

    from kosmos_cli.config import Job

MIN_LAYER_CHARS = 8  # visible non-space characters a page needs for its text to count as its own
MAX_IMAGE_COVER = 0.5  # share of the page images may cover before its text may be a scan's OCR
MAX_UNMAPPED = 0.1  # share of U+FFFD characters (glyphs with no Unicode) above which the text is unusable
_UNMAPPED = "\ufffd"


def read_text_layer(page: pymupdf.Page, to_pixels: pymupdf.Matrix, size: tuple[int, int]) -> TextLayer:
    """Read and classify a PyMuPDF page's own text; `to_pixels` maps its unrotated space to the image.

    Lines and words are in the rendered image's pixels (`size`), in the page's content order; a line
    wholly outside the image (text beyond the crop box) is left out.
    """
    import pymupdf

    flags = pymupdf.TEXT_PRESERVE_WHITESPACE | pymupdf.TEXT_MEDIABOX_CLIP
    textpage = page.get_textpage(flags=flags)
    words_of: dict[tuple[int, int], list[Word]] = defaultdict(list)
    for x0, y0, x1, y1, text, block, line, _ in textpage.extractWORDS():
        box = _pixel_box((x0, y0, x1, y1), to_pixels, size)
        if box is not None:
            words_of[block, line].append(Word(text, box))
    visible: list[Line] = []
    every: list[Line] = []
    counts = {"visible": 0, "invisible": 0, "unmapped": 0}
    for block in textpage.extractDICT()["blocks"]:
        for number, line in enumerate(block.get("lines", ())):
            spans = line["spans"]
            text = "".join(span["text"] for span in spans).strip()
            shown = any(span["alpha"] > 0 for span in spans)
            for span in spans:
                characters = sum(not char.isspace() for char in span["text"])
                counts["visible" if span["alpha"] > 0 else "invisible"] += characters
                counts["unmapped"] += span["text"].count(_UNMAPPED)
            box = _pixel_box(line["bbox"], to_pixels, size)
            if not text or box is None:
                continue
            x0, y0, x1, y1 = box
            words = tuple(words_of[block["number"], number])
            found = Line(text, ((x0, y0), (x1, y0), (x1, y1), (x0, y1)), words=words)
            every.append(found)
            if shown:
                visible.append(found)
    total = counts["visible"] + counts["invisible"]
    if total < MIN_LAYER_CHARS or counts["unmapped"] > MAX_UNMAPPED * total:
        return TextLayer(LayerKind.NONE)
    if counts["visible"] >= MIN_LAYER_CHARS and _image_cover(page) < MAX_IMAGE_COVER:
        return TextLayer(LayerKind.DIGITAL, tuple(visible))
    return TextLayer(LayerKind.OCR, tuple(every))


def _pixel_box(
    rect: tuple[float, float, float, float], to_pixels: pymupdf.Matrix, size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """Map a box in the page's unrotated space to whole pixels inside the image; None when none of it is."""
    import pymupdf

    mapped = pymupdf.Rect(rect) * to_pixels  # a multiple of 90 degrees keeps boxes upright
    width, height = size
    x0, y0 = max(0, round(mapped.x0)), max(0, round(mapped.y0))
    x1, y1 = min(width, round(mapped.x1)), min(height, round(mapped.y1))
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def _image_cover(page: pymupdf.Page) -> float:
    """Return the share of the page its images cover, overlaps counted twice (so at most about 1)."""
    import pymupdf

    area = page.rect.width * page.rect.height
    if area <= 0:
        return 0.0
    bounds = pymupdf.Rect(0, 0, page.cropbox.width, page.cropbox.height)  # the unrotated page
    covered = 0.0
    for image in page.get_image_info():
        shown = pymupdf.Rect(image["bbox"]) & bounds
        if not shown.is_empty:
            covered += shown.width * shown.height
    return min(1.0, covered / area)


def layer_result(page: Page, job: Job) -> PageResult | None:
    """Return a page's result from its own text layer, or None when the model must transcribe it.

    With `only`, a page without a text layer (an image, a scan) is a failed result: the model never runs.
    """
    if not job.reads_text_layer:
        return None
    layer = page.text_layer
    usable = (LayerKind.DIGITAL,) if job.text_layer == "auto" else (LayerKind.DIGITAL, LayerKind.OCR)
    if layer is None or layer.kind not in usable:
        if job.text_layer == "auto":
            return None
        error = InputError(
            "no text layer of its own (--text-layer only)"
            if page.info.pixel_to_pdf is not None
            else "an image has no text layer: only PDF pages do (--text-layer only)",
            hint="use --text-layer auto to transcribe such pages with the model",
        )
        return failed_result(page.info, job.task, error)
    return PageResult(
        page.info,
        job.task,
        "\n".join(line.text for line in layer.lines),
        lines=layer.lines,
        text_source=TextSource.PDF_TEXT,
    )
