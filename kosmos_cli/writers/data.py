"""JSON and JSON lines, for both tasks.

- `json`: one object per document, described by the JSON Schema `result.schema.json` shipped in this
  package. A page's `text` is its markdown (md) or its lines' text, one per line (ocr).
- `jsonl`: one page object per line, each also carrying `source`, `page_count` and `task`; pages can
  be printed as they finish (`JsonlWriter.stream_page`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from kosmos_cli.pages import page_index
from kosmos_cli.values import (
    BBox,
    Document,
    Line,
    Matrix,
    PageInfo,
    PageResult,
    Status,
    Task,
    TextSource,
    Word,
)
from kosmos_cli.writers import DocumentWriter, register

SCHEMA_VERSION = 4  # `result.schema.json`'s `schema_version`


def page_object(result: PageResult) -> dict[str, Any]:
    """Return the JSON object of one page, keys in schema order."""
    info = result.info
    failed = result.status is Status.FAILED
    return {
        "page_number": info.page_number,
        "width": info.width,
        "height": info.height,
        "dpi": info.dpi,
        "pixel_to_pdf": list(info.pixel_to_pdf) if info.pixel_to_pdf is not None else None,
        "status": result.status.value,
        "error": result.error,
        "truncation": result.truncation,
        "text_source": result.text_source.value,
        "text": "" if failed else result.text,
        "raw": result.raw,
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
    data["confidence"] = line.confidence
    data["min_confidence"] = line.min_confidence
    data["words"] = [word.to_dict() for word in line.words]
    return data


def _json_bytes(value: dict[str, Any], *, indent: int | None) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=indent) + "\n").encode("utf-8")


def _document_fields(info: PageInfo, task: Task, model: str) -> dict[str, Any]:
    document = info.document
    path = recorded_path(document)
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "source": document.display_name,
        "path": path if path is None or _is_text(path) else None,
    }
    if path is not None and fields["path"] is None:  # bytes that are not UTF-8: kept exactly, as hex
        fields["path_bytes"] = os.fsencode(path).hex()
    fields |= {"model": model or None, "page_count": info.page_count, "task": task.value}
    return fields


def recorded_path(document: Document) -> str | None:
    """Where a document's input is, for `kosmos convert` from any folder: its absolute path (or URI), as
    the file system names it; None for stdin, pipes and URIs that carry credentials."""
    if document.label is not None:
        return None
    if "://" in document.path:
        return document.path
    return os.path.abspath(document.path)


def _is_text(path: str) -> bool:
    """Whether a path is Unicode text (no byte that was not UTF-8, `surrogateescape`d)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_results(data: bytes, name: str) -> tuple[list[PageResult], str]:
    """Read back the pages of a document `JsonWriter` or `JsonlWriter` wrote (any schema version) and
    the model named.

    The document is named `name` (its outputs' stem). What version 1 lacked reads as unknown: no raw
    output, confidences or words, no pixel-to-PDF map; pages of versions before 3 came from the model;
    paths of versions before 4 may be relative to the folder the run started in.
    Raises ValueError, KeyError or TypeError for a file that is not kosmos's JSON or JSON lines.
    """
    try:
        value = json.loads(data)
    except json.JSONDecodeError:
        try:
            lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        except json.JSONDecodeError:
            lines = []
        if not lines or not all(isinstance(line, dict) and "page_number" in line for line in lines):
            raise ValueError("neither JSON nor JSON lines") from None
        value = {**lines[0], "pages": sorted(lines, key=lambda page: page["page_number"])}
    else:
        if isinstance(value, dict) and "page_number" in value:  # JSON lines of a one-page document
            value = {**value, "pages": [value]}
    newer = isinstance(value, dict) and value.get("schema_version", 1) > SCHEMA_VERSION
    if not isinstance(value, dict) or not value.get("pages") or newer:
        raise ValueError("not a result kosmos wrote (or one of a newer kosmos)")
    path = value.get("path")
    if path is None and value.get("path_bytes") is not None:
        path = os.fsdecode(bytes.fromhex(value["path_bytes"]))
    document = Document(path or value["source"], name, label=None if path else value["source"])
    task = Task(value["task"])
    pages = [_page_from_object(page, document, value["page_count"], task) for page in value["pages"]]
    return pages, value.get("model") or ""


def _page_from_object(page: dict[str, Any], document: Document, page_count: int, task: Task) -> PageResult:
    matrix = page.get("pixel_to_pdf")
    info = PageInfo(
        document,
        page_index(page["page_number"]),
        page_count,
        page["width"],
        page["height"],
        page["dpi"],
        tuple(matrix) if matrix is not None else None,
    )
    lines = tuple(
        Line(
            line["text"],
            tuple(tuple(point) for point in line["polygon"]) if line["polygon"] else None,  # type: ignore[arg-type]
            line.get("confidence"),
            line.get("min_confidence"),
            tuple(Word.from_dict(word) for word in line.get("words", ())),
        )
        for line in page["lines"]
    )
    return PageResult(
        info,
        task,
        page["text"],
        lines=lines,
        raw=page.get("raw", ""),
        status=Status(page["status"]),
        error=page["error"],
        truncation=page.get("truncation"),
        text_source=TextSource(page.get("text_source", TextSource.MODEL.value)),
    )


MD_MARK = ".md"  # before .json and .jsonl in md results' names: md and ocr results share a folder


class _TaskNamed(DocumentWriter):
    """A format of both tasks: md results are `NAME.md.json`, ocr results `NAME.json` (as ever), so a
    folder holds both and a rerun of one never takes the other's file for its own."""

    tasks = frozenset({Task.MD, Task.OCR})

    def file_name(self, document: Document) -> str:
        mark = MD_MARK if self.options.task is Task.MD else ""
        return document.name + mark + self.extension


def result_stem(file_name: str) -> str:
    """Return the name a JSON or JSON lines file of kosmos's is named after (`NAME.md.json`: NAME)."""
    for extension in (".json", ".jsonl"):
        if file_name.endswith(extension):
            return file_name.removesuffix(extension).removesuffix(MD_MARK)
    return file_name


@register
class JsonWriter(_TaskNamed):
    """One JSON object per document."""

    format = "json"
    extension = ".json"

    def render(self, results: Sequence[PageResult], source: bytes | None = None) -> bytes:
        """Render the document object, pages in order."""
        pages = self.check(results)
        first = pages[0]
        document = _document_fields(first.info, first.task, self.options.model)
        document["pages"] = [page_object(result) for result in pages]
        return _json_bytes(document, indent=2)


@register
class JsonlWriter(_TaskNamed):
    """One JSON object per page, each on its own line, for pipelines."""

    format = "jsonl"
    extension = ".jsonl"
    streams = True

    def render(self, results: Sequence[PageResult], source: bytes | None = None) -> bytes:
        """Render every page as one line, pages in order."""
        return b"".join(self.stream_page(result) for result in self.check(results))

    def stream_page(self, result: PageResult) -> bytes:
        """Render one page as one line, for printing pages as they finish."""
        self.check([result])
        return _json_bytes(
            {**_document_fields(result.info, result.task, self.options.model), **page_object(result)},
            indent=None,
        )


def pixel_bbox_to_pdf(bbox: BBox, matrix: Matrix) -> tuple[float, float, float, float]:
    """Map a pixel box through a page's pixel-to-PDF matrix to `(x0, y0, x1, y1)` in points, to 0.01 pt."""
    a, b, c, d, e, f = matrix
    x0, y0, x1, y1 = bbox
    corners = [(a * x + c * y + e, b * x + d * y + f) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
    xs = [x for x, _ in corners]
    ys = [y for _, y in corners]
    # `+ 0.0` turns -0.0 into 0.0 so equal boxes print the same.
    return (
        round(min(xs), 2) + 0.0,
        round(min(ys), 2) + 0.0,
        round(max(xs), 2) + 0.0,
        round(max(ys), 2) + 0.0,
    )
