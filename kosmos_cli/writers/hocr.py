"""hOCR 1.2 in XHTML (ocr task): one `ocr_page` per page and one `ocr_line` per line.

hOCR requires a bbox on every line, so lines without a box are left out (they stay in txt and json).
Each line holds its words as `ocrx_word` elements with their own boxes; their `x_wconf` is the line's
confidence (0-100), kosmos's figure being per line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from xml.sax.saxutils import escape, quoteattr

from kosmos_cli.values import BBox, PageResult, Status, Task, safe_text
from kosmos_cli.writers import DocumentWriter, Identity, register
from kosmos_cli.writers.text import comment_safe, page_note

# Characters XML 1.0 does not allow, even escaped.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _box(box: BBox) -> str:
    return " ".join(str(value) for value in box)


def xml_text(text: str) -> str:
    return escape(_XML_INVALID.sub("", text))


def xml_attribute(text: str) -> str:
    return quoteattr(_XML_INVALID.sub("", text))


@register
class HocrWriter(DocumentWriter):
    """hOCR: XHTML with `ocr_page` and `ocr_line` elements carrying bboxes."""

    format = "hocr"
    media_type = "application/xhtml+xml"
    extension = ".hocr"
    tasks = frozenset({Task.OCR})

    def render(
        self, results: Sequence[PageResult], source: bytes | None = None, identity: Identity = None
    ) -> bytes:
        """Render an XHTML document with one `ocr_page` per page."""
        pages = self.check(results)
        document = pages[0].info.document
        out = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"',
            '    "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">',
            '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">',
            " <head>",
            f"  <title>{xml_text(document.display_name)}</title>",
            '  <meta http-equiv="Content-Type" content="text/html;charset=utf-8"/>',
            '  <meta name="ocr-system" content="kosmos-transcribe"/>',
            '  <meta name="ocr-capabilities" content="ocr_page ocr_line ocrx_word ocrp_wconf"/>',
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
        out = [f'  <div class="ocr_page" id="page_{number}" title={xml_attribute("; ".join(properties))}>']
        if result.status is not Status.OK:
            note = page_note(result, always=True)
            out.append(f"   <!-- kosmos: {xml_text(comment_safe(note or ''))} -->")
        if result.status is not Status.FAILED:
            for index, line in enumerate(result.lines, start=1):
                if line.bbox is None:
                    continue
                line_id = f"line_{number}_{index}"
                content = xml_text(line.text)
                if line.words:
                    confidence = (
                        f"; x_wconf {round(line.confidence * 100)}" if line.confidence is not None else ""
                    )
                    content = " ".join(
                        f'<span class="ocrx_word" id="word_{number}_{index}_{position}" '
                        f'title="bbox {_box(word.bbox)}{confidence}">{xml_text(word.text)}</span>'
                        for position, word in enumerate(line.words, start=1)
                    )
                title = f"bbox {_box(line.bbox)}"
                out.append(f'   <span class="ocr_line" id="{line_id}" title="{title}">{content}</span>')
        out.append("  </div>")
        return out
