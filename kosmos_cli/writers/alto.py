"""ALTO 4.4 (ocr task): the archives' layout format, one `Page` per page, words as `String` elements.

Each page's lines sit in one `TextBlock` of its `PrintSpace`; each line holds its words as `String`
elements with their boxes (`words.split_words`) and `WC`, the line's confidence, separated by `SP`.
Measurements are pixels of the page image. Lines without a box are left out, as ALTO positions
every line (they stay in txt and json); a failed page is an empty `Page` with a comment saying why.
"""

from __future__ import annotations

from collections.abc import Sequence

from kosmos_cli import __version__
from kosmos_cli.values import BBox, Line, PageResult, Status, Task, enclosing
from kosmos_cli.writers import DocumentWriter, Identity, register
from kosmos_cli.writers.hocr import xml_attribute, xml_text
from kosmos_cli.writers.text import comment_safe, page_note

NAMESPACE = "http://www.loc.gov/standards/alto/ns-v4#"
SCHEMA_LOCATION = "http://www.loc.gov/alto/v4/alto-4-4.xsd"


@register
class AltoWriter(DocumentWriter):
    """ALTO 4.4 XML: pages, lines and words with boxes in pixels, and kosmos's processing step."""

    format = "alto"
    media_type = "application/xml"
    extension = ".alto.xml"
    tasks = frozenset({Task.OCR})

    def render(
        self, results: Sequence[PageResult], source: bytes | None = None, identity: Identity = None
    ) -> bytes:
        """Render an ALTO document with one `Page` per page, in page order."""
        pages = self.check(results)
        document = pages[0].info.document
        model = self.options.model or "Kosmos-2.5"
        out = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            f'<alto xmlns="{NAMESPACE}" xmlns:xlink="http://www.w3.org/1999/xlink"'
            ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
            f' xsi:schemaLocation="{NAMESPACE} {SCHEMA_LOCATION}">',
            " <Description>",
            "  <MeasurementUnit>pixel</MeasurementUnit>",
            "  <sourceImageInformation>",
            f"   <fileName>{xml_text(document.display_name)}</fileName>",
            "  </sourceImageInformation>",
            '  <Processing ID="kosmos">',
            "   <processingCategory>contentGeneration</processingCategory>",
            f"   <processingStepSettings>model: {xml_text(model)}</processingStepSettings>",
            "   <processingSoftware>",
            "    <softwareCreator>kosmos-transcribe</softwareCreator>",
            "    <softwareName>kosmos</softwareName>",
            f"    <softwareVersion>{__version__}</softwareVersion>",
            "    <applicationDescription>Kosmos-2.5 transcription, kosmos ocr</applicationDescription>",
            "   </processingSoftware>",
            "  </Processing>",
            " </Description>",
            " <Layout>",
        ]
        for result in pages:
            out.extend(self._page(result))
        out += [" </Layout>", "</alto>", ""]
        return "\n".join(out).encode("utf-8")

    def _page(self, result: PageResult) -> list[str]:
        info = result.info
        number = info.page_number
        size = f' WIDTH="{info.width}" HEIGHT="{info.height}"' if info.width and info.height else ""
        out = [f'  <Page ID="page_{number}" PHYSICAL_IMG_NR="{number}"{size} PROCESSINGREFS="kosmos">']
        if result.status is not Status.OK:
            out.append(f"   <!-- kosmos: {xml_text(comment_safe(page_note(result, always=True) or ''))} -->")
        lines = (
            [line for line in result.lines if line.bbox is not None]
            if result.status is not Status.FAILED
            else []
        )
        if lines:
            block = enclosing(line.bbox for line in lines if line.bbox is not None)
            out.append(f'   <PrintSpace HPOS="0" VPOS="0" WIDTH="{info.width}" HEIGHT="{info.height}">')
            out.append(f'    <TextBlock ID="block_{number}"{_position(block)}>')
            for index, line in enumerate(lines, start=1):
                out.extend(_line(line, f"{number}_{index}"))
            out += ["    </TextBlock>", "   </PrintSpace>"]
        out.append("  </Page>")
        return out


def _line(line: Line, key: str) -> list[str]:
    assert line.bbox is not None
    words = line.words or ()
    confidence = f' WC="{line.confidence}"' if line.confidence is not None else ""
    out = [f'     <TextLine ID="line_{key}"{_position(line.bbox)}>']
    if not words:  # a line read before kosmos split words: its text as one String on its box
        out.append(f"      <String CONTENT={xml_attribute(line.text)}{_position(line.bbox)}{confidence}/>")
    for position, word in enumerate(words, start=1):
        if position > 1:
            out.append("      <SP/>")
        out.append(
            f'      <String ID="word_{key}_{position}" CONTENT={xml_attribute(word.text)}'
            f"{_position(word.bbox)}{confidence}/>"
        )
    out.append("     </TextLine>")
    return out


def _position(box: BBox) -> str:
    x0, y0, x1, y1 = box
    return f' HPOS="{x0}" VPOS="{y0}" WIDTH="{x1 - x0}" HEIGHT="{y1 - y0}"'
