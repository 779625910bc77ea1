"""The searchable PDF (ocr task): the input's pages under an invisible text layer.

The original PDF's pages (or each image placed on a page) under an invisible text layer: each word
fitted to its box (`words.split_words`) at its line's height, so selecting or searching highlights
the words on the page. A failed page is kept as it was.

A page whose result came from its own text (`text_layer`, `--text-layer auto|only`) is kept as it
was: no second layer is stacked on text the page already has. On a page the model transcribed, an
old invisible layer (another engine's OCR) is replaced by kosmos's, as OCRmyPDF's `--redo-ocr` does
(MuPDF's redaction of invisible text only: visible text, images and drawings stay).
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING

from kosmos_cli.errors import InputError, KosmosError
from kosmos_cli.rasterize import page_pixels
from kosmos_cli.values import (
    BBox,
    Document,
    Line,
    PageInfo,
    PageResult,
    Status,
    Task,
    TextSource,
)
from kosmos_cli.writers import DocumentWriter, Identity, register

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


@register
class PdfWriter(DocumentWriter):
    """A searchable PDF: original pages (or images on pages) under an invisible text layer."""

    format = "pdf"
    media_type = "application/pdf"
    extension = ".pdf"
    tasks = frozenset({Task.OCR})
    needs_folder = "a PDF file"
    needs_source = True

    def render(
        self, results: Sequence[PageResult], source: bytes | None = None, identity: Identity = None
    ) -> bytes:
        """Build the PDF from the document's bytes as they were read (`source`), opened with the password.

        MuPDF errors on a damaged input (a broken outline, a bad page tree) fail this document only.
        """
        import pymupdf

        pages = self.check(results)
        if source is None:
            raise ValueError("the searchable PDF is built from the document's bytes: pass `source`")
        try:
            return self._build(pages, source)
        except (RuntimeError, ValueError, IndexError, pymupdf.mupdf.FzErrorBase) as error:
            document = pages[0].info.document
            raise InputError(
                f"cannot build the searchable PDF of `{document.display_name}`: {error}"
            ) from error

    def _build(self, pages: list[PageResult], source: bytes) -> bytes:
        import pymupdf

        document = pages[0].info.document
        # Only PDF pages have a pixel-to-PDF map (a PDF whose every page was unreadable falls to the image
        # path, where its pages cannot be placed either).
        if any(result.info.pixel_to_pdf is not None for result in pages):
            out = _open_source_pdf(source, document, self.options.password)
            if pages[-1].info.page_index >= out.page_count:
                raise InputError(f"`{document.display_name}` has fewer pages than were read")
            _select(out, [result.info.page_index for result in pages])
            _remove_scripts(out)
            targets = [(result, out[number]) for number, result in enumerate(pages)]
        else:
            out = pymupdf.open()
            placed = [result for result in pages if self._image_page(out, result, source)]
            # Pages are fetched once every page exists: MuPDF drops a Page object made before the
            # next new_page (a multi-page TIFF crashed here, issue 23).
            targets = [(result, out[number]) for number, result in enumerate(placed)]
            if not targets:
                raise InputError(
                    f"no page of `{document.display_name}` could be placed in the searchable PDF"
                )
        layer = pymupdf.open()  # the text layer is built apart so that only its own font gets subset
        written = [_write_text_layer(layer, page, result) for result, page in targets]
        layer.subset_fonts()
        for number, ((result, page), has_text) in enumerate(zip(targets, written, strict=True)):
            # A page the reader could not render is copied as it is: reading its content again (to
            # find old invisible text) would spin where the render did.
            if (
                _from_model(result)
                and result.info.pixel_to_pdf is not None
                and result.status is not Status.FAILED
            ):
                _remove_invisible_text(page)
            if has_text:
                _overlay(page, layer, number)
        # KEEP: an encrypted input gives an output that opens with the same password.
        encryption = pymupdf.mupdf.PDF_ENCRYPT_KEEP
        return out.tobytes(garbage=3, deflate=True, no_new_id=True, encryption=encryption)

    def _image_page(self, out: pymupdf.Document, result: PageResult, source: bytes) -> bool:
        """Place a page's image on a new page sized by its DPI; False for a failed, unreadable page."""
        try:
            image = page_pixels(result.info, source, password=self.options.password)
        except KosmosError as error:
            if result.status is not Status.FAILED:
                raise
            logger.warning(
                "page %d left out of the searchable PDF: %s", result.info.page_number, error.message
            )
            return False
        dpi_x, dpi_y = _page_dpi(image, result.info.dpi)
        width, height = image.size
        page = out.new_page(width=width * 72 / dpi_x, height=height * 72 / dpi_y)
        page.insert_image(page.rect, stream=_encode_image(image, result.info.document.path))
        return True


def _select(pdf: pymupdf.Document, page_indices: list[int]) -> None:
    """Keep only some pages; an outline MuPDF cannot follow (one with a cycle) is dropped, not fatal."""
    import pymupdf

    try:
        pdf.select(page_indices)
    except pymupdf.mupdf.FzErrorBase:
        pdf.xref_set_key(pdf.pdf_catalog(), "Outlines", "null")
        pdf.select(page_indices)


def _remove_scripts(pdf: pymupdf.Document) -> None:
    """Drop the JavaScript and automatic actions the input carries: the output shows text, runs nothing.

    An object MuPDF cannot find (a broken cross-reference entry: `cannot find object in xref`) holds
    no action MuPDF could run either, and is left as it is; `PyMuPDF`'s own save copes with it.
    """
    import pymupdf

    catalog = pdf.pdf_catalog()
    for key in ("OpenAction", "AA", "Names/JavaScript"):
        if pdf.xref_get_key(catalog, key)[0] != "null":
            pdf.xref_set_key(catalog, key, "null")
    for xref in range(1, pdf.xref_length()):
        try:
            _remove_object_scripts(pdf, xref)
        except (RuntimeError, pymupdf.mupdf.FzErrorBase) as error:
            logger.debug("object %d of the input skipped: %s", xref, error)


def _remove_object_scripts(pdf: pymupdf.Document, xref: int) -> None:
    if not pdf.xref_is_stream(xref) and pdf.xref_object(xref, compressed=True).startswith("<<"):
        if pdf.xref_get_key(xref, "AA")[0] != "null":
            pdf.xref_set_key(xref, "AA", "null")
        if pdf.xref_get_key(xref, "A/S")[1] == "/JavaScript":
            pdf.xref_set_key(xref, "A", "null")
        if pdf.xref_get_key(xref, "S")[1] == "/JavaScript":
            pdf.xref_set_key(xref, "JS", "()")


def _open_source_pdf(source: bytes, document: Document, password: str | None) -> pymupdf.Document:
    import pymupdf

    try:
        pdf = pymupdf.open(stream=source, filetype="pdf")
    except (pymupdf.FileDataError, RuntimeError, OSError) as error:
        raise InputError(
            f"cannot open `{document.display_name}` to build the searchable PDF: {error}"
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
    lines = [line for line in result.lines if line.bbox is not None] if _from_model(result) else []
    if not lines:
        return False
    to_page = _pixel_to_unrotated(result.info, page)
    font = _text_layer_font()
    shape = target.new_shape()
    wrote = False
    for text, (x0, y0, x1, y1) in _pieces(lines):
        text = "".join(char for char in text if font.has_glyph(ord(char)))  # e.g. emoji have no glyph
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


def _from_model(result: PageResult) -> bool:
    """Whether the model transcribed the page, so kosmos's layer goes on it (not failed, not its own text)."""
    return result.status is not Status.FAILED and result.text_source is TextSource.MODEL


def _remove_invisible_text(page: pymupdf.Page) -> None:
    """Remove a page's invisible text (an earlier OCR layer); visible text and everything else stay."""
    import pymupdf

    spans = (
        span
        for block in page.get_text("dict")["blocks"]
        for line in block.get("lines", ())
        for span in line["spans"]
    )
    if all(span["alpha"] > 0 for span in spans):
        return  # nothing to remove: the page's content is left byte for byte
    page.add_redact_annot(page.cropbox, fill=False)  # type: ignore[arg-type]  # False: no fill
    page.apply_redactions(
        images=pymupdf.mupdf.PDF_REDACT_IMAGE_NONE,
        graphics=pymupdf.mupdf.PDF_REDACT_LINE_ART_NONE,
        text=pymupdf.mupdf.PDF_REDACT_TEXT_REMOVE_INVISIBLE,
    )


def _pieces(lines: Sequence[Line]) -> list[tuple[str, BBox]]:
    """Return what the text layer places and where: each word on its box, at its line's height.

    A word keeps its line's top and bottom, so the words of a line share one baseline and size; a
    line without words (read before kosmos split them) is placed whole on its box.
    """
    pieces = []
    for line in lines:
        assert line.bbox is not None
        _, top, _, bottom = line.bbox
        if line.words:
            pieces += [(word.text, (word.bbox[0], top, word.bbox[2], bottom)) for word in line.words]
        else:
            pieces.append((line.text, line.bbox))
    return pieces


def _overlay(page: pymupdf.Page, layer: pymupdf.Document, number: int) -> None:
    """Show text layer page `number` over `page`, their unrotated spaces matched point for point."""
    import pymupdf

    crop, media = page.cropbox, page.mediabox
    # Where the crop box sits in PDF user space; show_pdf_page takes the target through
    # `~page.transformation_matrix`, so the rectangle is handed over pre-multiplied by it.
    left, bottom = crop.x0, media.y1 - crop.y1
    target = pymupdf.Rect(left, bottom, left + crop.width, bottom + crop.height) * page.transformation_matrix
    page.show_pdf_page(target, layer, number)
