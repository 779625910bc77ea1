"""Render a document's page results in each output format: a registry of writers keyed by format name.

Every writer turns the results of one whole document into bytes (`Writer.render`) and names the
file they go in (`Writer.file_name`); where those bytes go is the caller's business. Results may
include failed and truncated pages; each format marks them in place:

- `md` (md task): the tidy markdown. A document of more than one page gets a marker line before
  every page, `<!-- kosmos: page N -->`, with a blank line on each side, so `csplit` or a regex can
  split it; a one-page document is just its markdown. A truncated page's marker reads
  `<!-- kosmos: page N truncated -->` and a failed page is only the marker
  `<!-- kosmos: page N failed: ERROR -->`; these two are written for one-page documents too.
- `txt` (ocr task): one `x0,y0,x1,y0,x1,y1,x0,y1,text` line per text line, the model card's format;
  a line whose box was unusable keeps its text with empty coordinates, `,,,,,,,,text`. Page markers
  follow the same rules as in markdown and read `# kosmos: page N` (`... truncated`,
  `... failed: ERROR`); a text line always starts with a digit or a comma, so they cannot be confused.
- `json` (both tasks): one object per document, described by the JSON Schema `result.schema.json`
  shipped in this package. For the ocr task a page's `text` is its lines' text, one per line.
- `jsonl` (both tasks): one page object per line, each also carrying `source`, `page_count` and
  `task`; `JsonlWriter.render_page` renders one page so pages can be streamed as they finish.
- `hocr` (ocr task): hOCR 1.2 in XHTML, one `ocr_page` per page and one `ocr_line` per line. hOCR
  requires a bbox on every line, so lines without a box are left out (they stay in txt and json).
- `pdf` (ocr task): a searchable PDF: the original PDF's pages (or each image placed on a page) under
  an invisible text layer fitted to each line's box. A failed page is kept without a text layer.

`--draw` images are per page and need the page's pixels, so they are not in the registry:
`draw_file_name` names them and `render_drawing` renders them.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, ClassVar
from xml.sax.saxutils import escape, quoteattr

from kosmos_cli.discovery import DRAWING_SUFFIX
from kosmos_cli.drawing import draw_boxes
from kosmos_cli.errors import InputError, KosmosError, UsageError
from kosmos_cli.parsing import format_ocr_lines, pixel_bbox_to_pdf
from kosmos_cli.rasterize import PYMUPDF_LOCK, load_page_image
from kosmos_cli.values import Document, Line, Matrix, Page, PageInfo, PageResult, Status, Task, safe_text

if TYPE_CHECKING:
    import pymupdf
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_DPI = 150.0  # page size of an image without a usable DPI of its own in the searchable PDF
MIN_IMAGE_DPI = 10.0  # smaller DPI values in image files are placeholders, not resolutions
MAX_PDF_PAGE_SIDE = 14400.0  # points (200 inches): the largest page common PDF readers accept
JPEG_QUALITY = 95  # re-encoding quality for JPEG inputs placed in the searchable PDF
TEXT_LAYER_FONT = "cjk"  # MuPDF's built-in Droid Sans Fallback: Latin, Greek, Cyrillic and CJK glyphs
TEXT_LAYER_FONT_NAME = "KosmosOCR"  # resource name of the text layer's font
INVISIBLE = 3  # PDF text render mode: neither fill nor stroke

# Characters XML 1.0 does not allow, even escaped.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class Writer(ABC):
    """Render the results of one document in one format."""

    format: ClassVar[str]  # name on the command line, e.g. "md"
    extension: ClassVar[str]  # file name suffix, e.g. ".md"
    tasks: ClassVar[frozenset[Task]]  # tasks whose results this format can hold
    reads_input: ClassVar[bool] = False  # opens the input again (run where a hostile file can be stopped)

    def __init__(self, *, password: str | None = None) -> None:
        self.password = password  # opens encrypted PDF inputs for formats that reread them

    def file_name(self, document: Document) -> str:
        """Return the output path of a document, relative to the output folder."""
        return document.name + self.extension

    def document_header(self, document: Document) -> bytes:
        """Return what goes before a document when several share one stream (stdout)."""
        return b""

    @abstractmethod
    def render(self, results: Sequence[PageResult]) -> bytes:
        """Render the results of one document, in any order, as this format's bytes."""

    def _pages(self, results: Sequence[PageResult]) -> list[PageResult]:
        """Return the results sorted by page, checking they are one document's and of a task held here."""
        if not results:
            raise ValueError("no page results to render")
        document = results[0].info.document
        for result in results:
            if result.info.document != document:
                raise ValueError(f"results of `{document.path}` and `{result.info.document.path}` mixed")
            if result.task not in self.tasks:
                raise ValueError(f"the {self.format} format cannot hold {result.task.value} results")
        return sorted(results, key=lambda result: result.info.page_index)


WRITERS: dict[str, type[Writer]] = {}


def register(cls: type[Writer]) -> type[Writer]:
    """Add a writer class to the registry under its format name."""
    WRITERS[cls.format] = cls
    return cls


def get_writer(name: str, *, task: Task, password: str | None = None) -> Writer:
    """Return the writer for a format name, checking that it can hold the task's results."""
    cls = WRITERS.get(name)
    if cls is None:
        raise UsageError(f"unknown format `{name}`", hint=f"use one of: {', '.join(formats_for(task))}")
    if task not in cls.tasks:
        raise UsageError(
            f"format `{name}` cannot hold `{task.value}` results",
            hint=f"for `kosmos {task.value}` use one of: {', '.join(formats_for(task))}",
        )
    return cls(password=password)


def formats_for(task: Task) -> list[str]:
    """Return the format names that can hold a task's results, in registry order."""
    return [name for name, cls in WRITERS.items() if task in cls.tasks]


# --- markdown and text --------------------------------------------------------------------------


def _one_line(message: str | None) -> str:
    return " ".join((message or "unknown error").split())


def _page_note(result: PageResult, *, always: bool) -> str | None:
    """Return `page N`, `page N truncated` or `page N failed: ERROR` for a marker, or None if none is due."""
    number = result.info.page_number
    if result.status is Status.FAILED:
        return f"page {number} failed: {_one_line(result.error)}"
    if result.status is Status.TRUNCATED:
        return f"page {number} truncated"
    return f"page {number}" if always else None


def _comment_safe(text: str) -> str:
    """Make text safe inside an HTML comment, which must not contain `--`."""
    return re.sub(r"-(?=-)", "- ", text)


def _join_pages(blocks: Sequence[str], separator: str) -> bytes:
    text = separator.join(block for block in blocks if block)
    return (text + "\n").encode("utf-8") if text else b""


@register
class MarkdownWriter(Writer):
    """Tidy markdown, pages separated by HTML comment markers."""

    format = "md"
    extension = ".md"
    tasks = frozenset({Task.MD})

    def document_header(self, document: Document) -> bytes:
        """Return a comment naming the document."""
        return f"<!-- kosmos: document {_comment_safe(document.display_name)} -->\n\n".encode()

    def render(self, results: Sequence[PageResult]) -> bytes:
        """Render the pages' markdown with page markers where due."""
        blocks = []
        for result in self._pages(results):
            note = _page_note(result, always=result.info.page_count > 1)
            parts = [f"<!-- kosmos: {_comment_safe(note)} -->"] if note else []
            if result.status is not Status.FAILED and result.text:
                parts.append(result.text)
            blocks.append("\n\n".join(parts))
        return _join_pages(blocks, "\n\n")


@register
class TextWriter(Writer):
    """The model card's `x0,y0,x1,y0,x1,y1,x0,y1,text` lines, pages separated by `# kosmos:` lines."""

    format = "txt"
    extension = ".txt"
    tasks = frozenset({Task.OCR})

    def document_header(self, document: Document) -> bytes:
        """Return a marker line naming the document."""
        return f"# kosmos: document {_one_line(document.display_name)}\n".encode()

    def render(self, results: Sequence[PageResult]) -> bytes:
        """Render the pages' lines with page markers where due."""
        blocks = []
        for result in self._pages(results):
            note = _page_note(result, always=result.info.page_count > 1)
            parts = [f"# kosmos: {note}"] if note else []
            if result.status is not Status.FAILED and result.lines:
                parts.append(format_ocr_lines(result.lines))
            blocks.append("\n".join(parts))
        return _join_pages(blocks, "\n")


# --- JSON and JSON lines ------------------------------------------------------------------------


def page_object(result: PageResult) -> dict[str, Any]:
    """Return the JSON object of one page, keys in schema order."""
    info = result.info
    text = "\n".join(line.text for line in result.lines) if result.task is Task.OCR else result.text
    failed = result.status is Status.FAILED
    return {
        "page_number": info.page_number,
        "width": info.width,
        "height": info.height,
        "dpi": info.dpi,
        "status": result.status.value,
        "error": result.error,
        "text": "" if failed else text,
        "lines": [] if failed else [_line_object(line, info.pixel_to_pdf) for line in result.lines],
    }


def _line_object(line: Line, pixel_to_pdf: Matrix | None) -> dict[str, Any]:
    bbox = line.bbox
    data: dict[str, Any] = {
        "text": line.text,
        "polygon": [list(point) for point in line.polygon] if line.polygon else None,
        "bbox": list(bbox) if bbox else None,
    }
    if pixel_to_pdf is not None:
        data["pdf_bbox"] = list(pixel_bbox_to_pdf(bbox, pixel_to_pdf)) if bbox else None
    return data


def _json_bytes(value: dict[str, Any], *, indent: int | None) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=indent) + "\n").encode("utf-8")


def _document_fields(info: PageInfo, task: Task) -> dict[str, Any]:
    return {"source": info.document.display_name, "page_count": info.page_count, "task": task.value}


@register
class JsonWriter(Writer):
    """One JSON object per document."""

    format = "json"
    extension = ".json"
    tasks = frozenset({Task.MD, Task.OCR})

    def render(self, results: Sequence[PageResult]) -> bytes:
        """Render the document object, pages in order."""
        pages = self._pages(results)
        first = pages[0]
        document = _document_fields(first.info, first.task)
        document["pages"] = [page_object(result) for result in pages]
        return _json_bytes(document, indent=2)


@register
class JsonlWriter(Writer):
    """One JSON object per page, each on its own line, for pipelines."""

    format = "jsonl"
    extension = ".jsonl"
    tasks = frozenset({Task.MD, Task.OCR})

    def render(self, results: Sequence[PageResult]) -> bytes:
        """Render every page as one line, pages in order."""
        return b"".join(self.render_page(result) for result in self._pages(results))

    def render_page(self, result: PageResult) -> bytes:
        """Render one page as one line, for streaming pages as they finish."""
        self._pages([result])
        return _json_bytes({**_document_fields(result.info, result.task), **page_object(result)}, indent=None)


# --- hOCR ---------------------------------------------------------------------------------------


def _xml_text(text: str) -> str:
    return escape(_XML_INVALID.sub("", text))


def _xml_attribute(text: str) -> str:
    return quoteattr(_XML_INVALID.sub("", text))


@register
class HocrWriter(Writer):
    """hOCR: XHTML with `ocr_page` and `ocr_line` elements carrying bboxes."""

    format = "hocr"
    extension = ".hocr"
    tasks = frozenset({Task.OCR})

    def render(self, results: Sequence[PageResult]) -> bytes:
        """Render an XHTML document with one `ocr_page` per page."""
        pages = self._pages(results)
        document = pages[0].info.document
        out = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"',
            '    "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">',
            '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">',
            " <head>",
            f"  <title>{_xml_text(document.display_name)}</title>",
            '  <meta http-equiv="Content-Type" content="text/html;charset=utf-8"/>',
            '  <meta name="ocr-system" content="kosmos-cli"/>',
            '  <meta name="ocr-capabilities" content="ocr_page ocr_line"/>',
            f'  <meta name="ocr-number-of-pages" content="{pages[0].info.page_count}"/>',
            " </head>",
            " <body>",
        ]
        for result in pages:
            out.extend(self._page(result))
        out += [" </body>", "</html>", ""]
        return "\n".join(out).encode("utf-8")

    def _page(self, result: PageResult) -> list[str]:
        info = result.info
        number = info.page_number
        # hOCR numbers physical pages from 0.
        properties = [f"bbox 0 0 {info.width} {info.height}", f"ppageno {info.page_index}"]
        if info.document.label is None:
            image = safe_text(info.document.path).replace("\\", "\\\\").replace('"', '\\"')
            properties.insert(0, f'image "{image}"')
        out = [f'  <div class="ocr_page" id="page_{number}" title={_xml_attribute("; ".join(properties))}>']
        if result.status is not Status.OK:
            note = _page_note(result, always=True)
            out.append(f"   <!-- kosmos: {_xml_text(_comment_safe(note or ''))} -->")
        if result.status is not Status.FAILED:
            for index, line in enumerate(result.lines, start=1):
                if line.bbox is None:
                    continue
                box = " ".join(str(value) for value in line.bbox)
                out.append(
                    f'   <span class="ocr_line" id="line_{number}_{index}" title="bbox {box}">'
                    f"{_xml_text(line.text)}</span>"
                )
        out.append("  </div>")
        return out


# --- searchable PDF -----------------------------------------------------------------------------


@register
class PdfWriter(Writer):
    """A searchable PDF: original pages (or images on pages) under an invisible text layer."""

    format = "pdf"
    extension = ".pdf"
    tasks = frozenset({Task.OCR})
    reads_input = True

    def render(self, results: Sequence[PageResult]) -> bytes:
        """Build the PDF; PDF inputs are reopened (with the password) to copy their pages.

        MuPDF errors on a damaged input (a broken outline, a bad page tree) fail this document only.
        """
        import pymupdf

        pages = self._pages(results)
        with PYMUPDF_LOCK:  # pages may be being read in another thread, and PyMuPDF is not thread-safe
            try:
                return self._build(pages)
            except (RuntimeError, ValueError, IndexError, pymupdf.mupdf.FzErrorBase) as error:
                document = pages[0].info.document
                raise InputError(
                    f"cannot build the searchable PDF of `{document.display_name}`: {error}"
                ) from error

    def _build(self, pages: list[PageResult]) -> bytes:
        import pymupdf

        document = pages[0].info.document
        # Only PDF pages have a pixel-to-PDF map (a PDF whose every page was unreadable falls to the image
        # path, where its pages cannot be placed either).
        if any(result.info.pixel_to_pdf is not None for result in pages):
            out = _open_source_pdf(document, self.password)
            if pages[-1].info.page_index >= out.page_count:
                raise InputError(f"`{document.display_name}` changed since it was read: it has fewer pages")
            _select(out, [result.info.page_index for result in pages])
            _remove_scripts(out)
            targets = [(result, out[number]) for number, result in enumerate(pages)]
        else:
            out = pymupdf.open()
            targets = [
                (result, page) for result in pages if (page := self._image_page(out, result)) is not None
            ]
            if not targets:
                raise InputError(
                    f"no page of `{document.display_name}` could be placed in the searchable PDF"
                )
        layer = pymupdf.open()  # the text layer is built apart so that only its own font gets subset
        written = [_write_text_layer(layer, page, result) for result, page in targets]
        layer.subset_fonts()
        for number, ((_, page), has_text) in enumerate(zip(targets, written, strict=True)):
            if has_text:
                _overlay(page, layer, number)
        # KEEP: an encrypted input gives an output that opens with the same password.
        encryption = pymupdf.mupdf.PDF_ENCRYPT_KEEP
        return out.tobytes(garbage=3, deflate=True, no_new_id=True, encryption=encryption)

    def _image_page(self, out: pymupdf.Document, result: PageResult) -> pymupdf.Page | None:
        """Place a page's image on a new page sized by its DPI; None for a failed, unreadable page."""
        try:
            image = load_page_image(result.info, password=self.password)
        except KosmosError as error:
            if result.status is not Status.FAILED:
                raise
            logger.warning(
                "page %d left out of the searchable PDF: %s", result.info.page_number, error.message
            )
            return None
        dpi_x, dpi_y = _page_dpi(image, result.info.dpi)
        width, height = image.size
        page = out.new_page(width=width * 72 / dpi_x, height=height * 72 / dpi_y)
        page.insert_image(page.rect, stream=_encode_image(image, result.info.document.path))
        return page


def _select(pdf: pymupdf.Document, page_indices: list[int]) -> None:
    """Keep only some pages; an outline MuPDF cannot follow (one with a cycle) is dropped, not fatal."""
    import pymupdf

    try:
        pdf.select(page_indices)
    except pymupdf.mupdf.FzErrorBase:
        pdf.xref_set_key(pdf.pdf_catalog(), "Outlines", "null")
        pdf.select(page_indices)


def _remove_scripts(pdf: pymupdf.Document) -> None:
    """Drop the JavaScript and automatic actions the input carries: the output shows text, runs nothing."""
    catalog = pdf.pdf_catalog()
    for key in ("OpenAction", "AA", "Names/JavaScript"):
        if pdf.xref_get_key(catalog, key)[0] != "null":
            pdf.xref_set_key(catalog, key, "null")
    for xref in range(1, pdf.xref_length()):
        if not pdf.xref_is_stream(xref) and pdf.xref_object(xref, compressed=True).startswith("<<"):
            if pdf.xref_get_key(xref, "AA")[0] != "null":
                pdf.xref_set_key(xref, "AA", "null")
            if pdf.xref_get_key(xref, "A/S")[1] == "/JavaScript":
                pdf.xref_set_key(xref, "A", "null")
            if pdf.xref_get_key(xref, "S")[1] == "/JavaScript":
                pdf.xref_set_key(xref, "JS", "()")


def _open_source_pdf(document: Document, password: str | None) -> pymupdf.Document:
    import pymupdf

    try:
        pdf = pymupdf.open(document.path, filetype="pdf")
    except (pymupdf.FileDataError, RuntimeError, OSError) as error:
        raise InputError(
            f"cannot reopen `{document.display_name}` to build the searchable PDF: {error}"
        ) from error
    if pdf.needs_pass and not pdf.authenticate(password or ""):
        raise InputError(
            f"`{document.display_name}` is encrypted and the password does not open it",
            hint="pass the right one with --password",
        )
    return pdf


def _pixel_to_unrotated(info: PageInfo, page: pymupdf.Page) -> pymupdf.Matrix:
    """Return the map from image pixels to the page's unrotated MuPDF space (crop box origin, y down)."""
    import pymupdf

    if info.pixel_to_pdf is None:  # an image placed on a page of its own
        return pymupdf.Matrix(page.rect.width / info.width, 0, 0, page.rect.height / info.height, 0, 0)
    crop, media = page.cropbox, page.mediabox  # PyMuPDF gives the crop box flipped inside the media box
    pdf_to_unrotated = pymupdf.Matrix(1, 0, 0, -1, -crop.x0, media.y1 - crop.y0)
    return pymupdf.Matrix(*info.pixel_to_pdf) * pdf_to_unrotated


def _page_dpi(image: Image.Image, render_dpi: float | None) -> tuple[float, float]:
    """Return the (x, y) DPI to place an image at: render DPI, else its own if usable, else a default."""
    if render_dpi:
        dpi_x = dpi_y = render_dpi
    else:
        try:
            dpi_x, dpi_y = (float(value) for value in image.info.get("dpi", ()))
        except (TypeError, ValueError):
            dpi_x = dpi_y = DEFAULT_IMAGE_DPI
    if not all(math.isfinite(value) and value >= MIN_IMAGE_DPI for value in (dpi_x, dpi_y)):
        dpi_x = dpi_y = DEFAULT_IMAGE_DPI
    # Pages stay within what readers accept.
    width, height = image.size
    return max(dpi_x, width * 72 / MAX_PDF_PAGE_SIDE), max(dpi_y, height * 72 / MAX_PDF_PAGE_SIDE)


def _encode_image(image: Image.Image, path: str) -> bytes:
    """Encode a page image as JPEG when it came from one (photos stay small), else losslessly as PNG."""
    buffer = io.BytesIO()
    if PurePath(path).suffix.lower() in {".jpg", ".jpeg"}:
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


@functools.cache
def _text_layer_font() -> pymupdf.Font:
    import pymupdf

    return pymupdf.Font(TEXT_LAYER_FONT)


def _write_text_layer(layer: pymupdf.Document, page: pymupdf.Page, result: PageResult) -> bool:
    """Add a page shaped like `page`'s unrotated space to `layer` holding the lines' invisible text."""
    import pymupdf

    crop = page.cropbox
    target = layer.new_page(width=crop.width, height=crop.height)
    lines = (
        [line for line in result.lines if line.bbox is not None] if result.status is not Status.FAILED else []
    )
    if not lines:
        return False
    to_page = _pixel_to_unrotated(result.info, page)
    font = _text_layer_font()
    shape = target.new_shape()
    wrote = False
    for line in lines:
        text = "".join(char for char in line.text if font.has_glyph(ord(char)))  # e.g. emoji have no glyph
        assert line.bbox is not None
        x0, y0, x1, y1 = line.bbox
        size = (y1 - y0) / (font.ascender - font.descender)
        # Readers lay text out with the font's /W widths, which PyMuPDF writes truncated to 1/1000 em.
        length = size * sum(int(font.glyph_advance(ord(char)) * 1000) for char in text) / 1000
        if length <= 0:
            continue
        if not wrote:
            target.insert_font(fontname=TEXT_LAYER_FONT_NAME, fontbuffer=font.buffer)
            wrote = True
        # Lay the text out in pixels along the box's bottom, stretch it to the box's width, then map it to
        # the page. Shape applies `morph` in PDF space (y up), so the y-down map is conjugated by a flip.
        origin = pymupdf.Point(x0, y1 + font.descender * size) * to_page
        linear = pymupdf.Matrix((x1 - x0) / length, 0, 0, 1, 0, 0) * pymupdf.Matrix(
            to_page.a, to_page.b, to_page.c, to_page.d, 0, 0
        )
        morph = pymupdf.Matrix(linear.a, -linear.b, -linear.c, linear.d, 0, 0)
        shape.insert_text(
            origin,
            text,
            fontsize=size,
            fontname=TEXT_LAYER_FONT_NAME,
            render_mode=INVISIBLE,
            morph=(origin, morph),
        )
    if wrote:
        shape.commit()
    return wrote


def _overlay(page: pymupdf.Page, layer: pymupdf.Document, number: int) -> None:
    """Show text layer page `number` over `page`, their unrotated spaces matched point for point."""
    import pymupdf

    crop, media = page.cropbox, page.mediabox
    # Where the crop box sits in PDF user space; show_pdf_page takes the target through
    # `~page.transformation_matrix`, so the rectangle is handed over pre-multiplied by it.
    left, bottom = crop.x0, media.y1 - crop.y1
    target = pymupdf.Rect(left, bottom, left + crop.width, bottom + crop.height) * page.transformation_matrix
    page.show_pdf_page(target, layer, number)


# --- drawings -----------------------------------------------------------------------------------


def draw_file_name(document: Document, page_index: int, page_count: int) -> str:
    """Return a page drawing's path relative to the output folder: `NAME.boxes.png`, `NAME-p001.boxes.png`.

    The name never equals an input's: walks skip `*.boxes.png`, and NAME keeps the input's suffix.
    """
    if page_count == 1:
        return f"{document.name}{DRAWING_SUFFIX}"
    return f"{document.name}-p{page_index + 1:03}{DRAWING_SUFFIX}"


def render_drawing(page: Page, result: PageResult, *, numbered: bool = False) -> bytes:
    """Return the PNG of a page with its lines' polygons drawn, optionally numbered."""
    if page.info != result.info:
        raise ValueError("the result is not the page's")
    buffer = io.BytesIO()
    scale = (page.image.width / page.info.width, page.image.height / page.info.height)
    draw_boxes(page.image, result.lines, numbered=numbered, scale=scale).save(buffer, format="PNG")
    return buffer.getvalue()
