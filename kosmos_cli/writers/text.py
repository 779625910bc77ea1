"""Markdown (md task) and the model card's text lines (ocr task), with page markers where due.

- `md`: the tidy markdown. A document of more than one page gets a marker line before every page,
  `<!-- kosmos: page N -->`, with a blank line on each side, so `csplit` or a regex can split it; a
  one-page document is just its markdown. A truncated page's marker reads
  `<!-- kosmos: page N truncated -->` and a failed page is only the marker
  `<!-- kosmos: page N failed: ERROR -->`; these two are written for one-page documents too.
- `txt`: one `x0,y0,x1,y0,x1,y1,x0,y1,text` line per text line, the model card's format; a line
  whose box was unusable keeps its text with empty coordinates, `,,,,,,,,text`. Page markers follow
  the same rules as in markdown and read `# kosmos: page N` (`... truncated`, `... failed: ERROR`);
  a text line always starts with a digit or a comma, so they cannot be confused.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from kosmos_cli.values import Document, Line, PageResult, Status, Task
from kosmos_cli.writers import DocumentWriter, Identity, register


def one_line(message: str | None) -> str:
    return " ".join((message or "unknown error").split())


def page_note(result: PageResult, *, always: bool) -> str | None:
    """Return `page N`, `page N truncated` or `page N failed: ERROR` for a marker, or None if none is due."""
    number = result.info.page_number
    if result.status is Status.FAILED:
        return f"page {number} failed: {one_line(result.error)}"
    if result.status is Status.TRUNCATED:
        return f"page {number} truncated"
    return f"page {number}" if always else None


def comment_safe(text: str) -> str:
    """Make text safe inside an HTML comment, which must not contain `--`."""
    return re.sub(r"-(?=-)", "- ", text)


def _marked_pages(
    pages: Sequence[PageResult],
    *,
    marker: Callable[[str], str],
    body: Callable[[PageResult], str],
    separator: str,
) -> bytes:
    """Join the pages' bodies by `separator`, each after its page marker where one is due."""
    blocks = []
    for result in pages:
        note = page_note(result, always=result.info.page_count > 1)
        parts = [marker(note)] if note else []
        if result.status is not Status.FAILED and (text := body(result)):
            parts.append(text)
        blocks.append(separator.join(parts))
    joined = separator.join(block for block in blocks if block)
    return (joined + "\n").encode("utf-8") if joined else b""


@register
class MarkdownWriter(DocumentWriter):
    """Tidy markdown, pages separated by HTML comment markers."""

    format = "md"
    media_type = "text/markdown; charset=utf-8"
    extension = ".md"
    tasks = frozenset({Task.MD})

    def document_header(self, document: Document) -> bytes:
        """Return a comment naming the document."""
        return f"<!-- kosmos: document {comment_safe(document.display_name)} -->\n\n".encode()

    def render(
        self, results: Sequence[PageResult], source: bytes | None = None, identity: Identity = None
    ) -> bytes:
        """Render the pages' markdown with page markers where due."""
        return _marked_pages(
            self.check(results),
            marker=lambda note: f"<!-- kosmos: {comment_safe(note)} -->",
            body=lambda result: result.text,
            separator="\n\n",
        )


@register
class TextWriter(DocumentWriter):
    """The model card's `x0,y0,x1,y0,x1,y1,x0,y1,text` lines, pages separated by `# kosmos:` lines."""

    format = "txt"
    media_type = "text/plain; charset=utf-8"
    extension = ".txt"
    tasks = frozenset({Task.OCR})

    def document_header(self, document: Document) -> bytes:
        """Return a marker line naming the document."""
        return f"# kosmos: document {one_line(document.display_name)}\n".encode()

    def render(
        self, results: Sequence[PageResult], source: bytes | None = None, identity: Identity = None
    ) -> bytes:
        """Render the pages' lines with page markers where due."""
        return _marked_pages(
            self.check(results),
            marker=lambda note: f"# kosmos: {note}",
            body=lambda result: format_ocr_lines(result.lines),
            separator="\n",
        )


def format_ocr_line(line: Line) -> str:
    """Format one line as `x0,y0,x1,y0,x1,y1,x0,y1,text`; a line without a box gets empty fields."""
    if line.polygon is None:
        return ",,,,,,,," + line.text
    coordinates = ",".join(f"{x},{y}" for x, y in line.polygon)
    return f"{coordinates},{line.text}"


def format_ocr_lines(lines: Iterable[Line]) -> str:
    """Format lines in the model card's txt format, one per line, with no trailing newline."""
    return "\n".join(format_ocr_line(line) for line in lines)
