"""PAGE XML 2019-07-15 (ocr task): one file per page, for eScriptorium, Transkribus and OCR-D.

A PAGE file describes one page image, so each page gets its own: `NAME.page.xml` for a one-page
input, `NAME-p001.page.xml`... for the pages of a PDF. The page's lines sit in one `TextRegion`;
each `TextLine` has its box as `Coords`, a `Baseline` estimated from the box, its `Word`s with
their boxes, and `TextEquiv` with `conf`, the line's confidence. Lines without a box are left
out; a page that failed gets no file. `Created` is the time of writing, or `SOURCE_DATE_EPOCH`.
"""

from __future__ import annotations

import os
import time

from kosmos_cli import __version__
from kosmos_cli.values import BBox, Document, Line, Page, PageResult, Status, Task, enclosing
from kosmos_cli.writers import PageWriter, page_file_name, register
from kosmos_cli.writers.hocr import xml_attribute, xml_text

NAMESPACE = "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15"
PAGE_SUFFIX = ".page.xml"
BASELINE_SHARE = 0.8  # the baseline's height in a line's box, from its top: where Latin text sits


@register
class PageXmlWriter(PageWriter):
    """PAGE XML: a region, its lines with baselines, their words, and the text, for each page."""

    format = "page"
    media_type = "application/xml"
    tasks = frozenset({Task.OCR})
    needs_folder = "a PAGE XML file per page"
    needs_pixels = False

    def file_name(self, document: Document, page_index: int, page_count: int) -> str:
        """Return `NAME.page.xml` for a one-page document, else `NAME-p001.page.xml` (1-based)."""
        return page_file_name(document, page_index, page_count, PAGE_SUFFIX)

    def render_page(self, page: Page | None, result: PageResult) -> bytes | None:
        """Return the page's PAGE XML; None for a failed page."""
        if result.status is Status.FAILED:
            return None
        info = result.info
        creator = f"kosmos {__version__}" + (f", model {self.options.model}" if self.options.model else "")
        created = time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time())))
        )
        lines = [line for line in result.lines if line.bbox is not None]
        out = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<PcGts xmlns="{NAMESPACE}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
            f' xsi:schemaLocation="{NAMESPACE} {NAMESPACE}/pagecontent.xsd">',
            " <Metadata>",
            f"  <Creator>{xml_text(creator)}</Creator>",
            f"  <Created>{created}</Created>",
            f"  <LastChange>{created}</LastChange>",
            " </Metadata>",
            f" <Page imageFilename={xml_attribute(info.document.display_name)}"
            f' imageWidth="{info.width}" imageHeight="{info.height}">',
        ]
        if lines:
            region = enclosing(line.bbox for line in lines if line.bbox is not None)
            out += ['  <TextRegion id="region_1">', f'   <Coords points="{_points(region)}"/>']
            for index, line in enumerate(lines, start=1):
                out.extend(_line(line, index))
            text = "\n".join(line.text for line in lines)
            out += [f"   {_text_equiv(text, None)}", "  </TextRegion>"]
        out += [" </Page>", "</PcGts>", ""]
        return "\n".join(out).encode("utf-8")


def _line(line: Line, index: int) -> list[str]:
    assert line.bbox is not None
    x0, y0, x1, y1 = line.bbox
    baseline = round(y0 + BASELINE_SHARE * (y1 - y0))
    out = [
        f'   <TextLine id="line_{index}">',
        f'    <Coords points="{_points(line.bbox)}"/>',
        f'    <Baseline points="{x0},{baseline} {x1},{baseline}"/>',
    ]
    for position, word in enumerate(line.words, start=1):
        out += [
            f'    <Word id="word_{index}_{position}">',
            f'     <Coords points="{_points(word.bbox)}"/>',
            f"     {_text_equiv(word.text, line.confidence)}",
            "    </Word>",
        ]
    out += [f"    {_text_equiv(line.text, line.confidence)}", "   </TextLine>"]
    return out


def _text_equiv(text: str, confidence: float | None) -> str:
    conf = f' conf="{confidence}"' if confidence is not None else ""
    return f"<TextEquiv{conf}><Unicode>{xml_text(text)}</Unicode></TextEquiv>"


def _points(box: BBox) -> str:
    x0, y0, x1, y1 = box
    return f"{x0},{y0} {x1},{y0} {x1},{y1} {x0},{y1}"
