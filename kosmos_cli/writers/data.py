"""JSON and JSON lines, for both tasks.

- `json`: one object per document, described by the JSON Schema `result.schema.json` shipped in this
  package. A page's `text` is its markdown (md) or its lines' text, one per line (ocr).
- `jsonl`: one page object per line, each also carrying `source`, `page_count` and `task`; pages can
  be printed as they finish (`JsonlWriter.stream_page`).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kosmos_cli.pages import page_index
from kosmos_cli.stores import is_uri
from kosmos_cli.values import (
    BBox,
    Document,
    InputIdentity,
    Line,
    Matrix,
    PageInfo,
    PageResult,
    Region,
    Status,
    Task,
    TextSource,
    Word,
    is_utf8,
)
from kosmos_cli.writers import DocumentWriter, Identity, register

SCHEMA_VERSION = 5  # `result.schema.json`'s `schema_version`


def page_object(result: PageResult) -> dict[str, Any]:
    """Return the JSON object of one page, keys in schema order."""
    info = result.info
    failed = result.status is Status.FAILED
    page: dict[str, Any] = {
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
    if result.regions:  # md with --attention
        matrix = info.pixel_to_pdf
        page["regions"] = [None if r is None else _region_object(r, matrix) for r in result.regions]
    return page


def _region_object(region: Region, pixel_to_pdf: Matrix | None) -> dict[str, Any]:
    data: dict[str, Any] = {"bbox": list(region.box)}
    if pixel_to_pdf is not None:
        data["pdf_bbox"] = list(pixel_bbox_to_pdf(region.box, pixel_to_pdf))
    return data | {"share": region.share, "spatial": region.spatial}


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
    if line.attention_agreement is not None:
        data["attention_agreement"] = line.attention_agreement
    return data


def _json_bytes(value: dict[str, Any], *, indent: int | None) -> bytes:
    return (json.dumps(value, ensure_ascii=False, indent=indent) + "\n").encode("utf-8")


def _document_fields(
    info: PageInfo, task: Task, model: str, identity: InputIdentity | None = None
) -> dict[str, Any]:
    document = info.document
    path = recorded_path(document)
    fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "source": document.display_name,
        "path": path if path is None or is_utf8(path) else None,
    }
    if path is not None and fields["path"] is None:  # bytes that are not UTF-8: kept exactly, as hex
        fields["path_bytes"] = os.fsencode(path).hex()
    if identity is not None:  # `kosmos convert` reads the input again only if it is still this file
        fields["input"] = {"size": identity.size, "sha256": identity.sha256}
    fields |= {"model": model or None, "page_count": info.page_count, "task": task.value}
    return fields


def recorded_path(document: Document) -> str | None:
    """Where a document's input is, for `kosmos convert` from any folder: its absolute path (or URI), as
    the file system names it; None for stdin, pipes and URIs that carry credentials."""
    if document.label is not None:
        return None
    if is_uri(document.path):
        return document.path
    return os.path.abspath(document.path)


@dataclass(frozen=True)
class Results:
    """A document's pages read back from kosmos's JSON or JSON lines (`read_results`)."""

    pages: list[PageResult]
    model: str  # the model named, or ""
    input: dict[str, Any] | None  # the input's size and sha256 when it was read, where recorded


def read_results(data: bytes, name: str) -> Results:
    """Read back, and check, the pages of a document `JsonWriter` or `JsonlWriter` wrote (any schema
    version): against `result.schema.json`, and for values no writer gives (a box outside its page,
    a page twice or past the document's end, numbers that are not finite, text that is not Unicode).

    The document is named `name` (its outputs' stem). What version 1 lacked reads as unknown: no raw
    output, confidences or words, no pixel-to-PDF map; pages of versions before 3 came from the model;
    paths of versions before 4 may be relative to the folder the run started in.
    Raises ValueError, with one line saying what is wrong, for anything else.
    """
    try:
        value = _load(data)
    except json.JSONDecodeError:
        try:
            lines = [_load(line) for line in data.splitlines() if line.strip()]
        except json.JSONDecodeError:
            lines = []
        if not lines or not all(isinstance(line, dict) and "page_number" in line for line in lines):
            raise ValueError("neither JSON nor JSON lines") from None
        value = _document_of_lines(lines)
    else:
        if isinstance(value, dict) and "page_number" in value:  # JSON lines of a one-page document
            value = _document_of_lines([value])
    if not isinstance(value, dict) or value.get("schema_version", 1) > SCHEMA_VERSION:
        raise ValueError("not a result kosmos wrote (or one of a newer kosmos)")
    try:
        document_object = _as_current(value)
    except (TypeError, KeyError, AttributeError):
        raise ValueError("its document or pages are not objects kosmos writes") from None
    _check(document_object)
    path = document_object["path"]
    if path is None and document_object.get("path_bytes") is not None:
        path = os.fsdecode(bytes.fromhex(document_object["path_bytes"]))
    source = document_object["source"]
    document = Document(path or source, name, label=None if path else source)
    task = Task(document_object["task"])
    count = document_object["page_count"]
    pages = [_page_from_object(page, document, count, task) for page in document_object["pages"]]
    return Results(pages, document_object["model"] or "", document_object.get("input"))


def _load(data: bytes) -> Any:
    """Parse JSON, refusing NaN and infinite numbers (ALTO and PAGE cannot hold them)."""

    def finite(text: str) -> float:
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(f"a number too large: {text[:20]}")
        return number

    def constant(text: str) -> None:
        raise ValueError(f"`{text}` is not a number JSON allows")

    try:
        return json.loads(data, parse_float=finite, parse_constant=constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _document_of_lines(lines: list[Any]) -> dict[str, Any]:
    """The document object of JSON lines: the first line's document fields and every line's page."""
    document_keys = ("schema_version", "source", "path", "path_bytes", "input", "model", "page_count", "task")
    document = {key: lines[0][key] for key in document_keys if key in lines[0]}
    document["pages"] = [{k: v for k, v in line.items() if k not in document_keys} for line in lines]
    return document


def _as_current(value: dict[str, Any]) -> dict[str, Any]:
    """An older version's document object with what later versions added, as the reader takes it."""
    if value.get("schema_version") == SCHEMA_VERSION:
        return value
    page_defaults: dict[str, Any] = {
        "pixel_to_pdf": None,
        "truncation": None,
        "raw": "",
        "text_source": TextSource.MODEL.value,
    }
    line_defaults: dict[str, Any] = {"confidence": None, "min_confidence": None, "words": []}
    pages = [
        {**page_defaults, **page, "lines": [{**line_defaults, **line} for line in page["lines"]]}
        for page in value["pages"]
    ]
    return {"path": None, "model": None, **value, "schema_version": SCHEMA_VERSION, "pages": pages}


@functools.cache
def _validator() -> Any:
    import jsonschema

    schema = json.loads(importlib.resources.files("kosmos_cli").joinpath("result.schema.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def _check(document: dict[str, Any]) -> None:
    """Raise ValueError for a document object that is not one a writer gives, with where and why."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator().iter_errors(document))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "the document"
        raise ValueError(f"{where}: {error.message[:200]}")
    try:
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("it holds text that is not Unicode (a lone surrogate)") from None
    if not document["pages"]:
        raise ValueError("it has no pages")
    numbers = [page["page_number"] for page in document["pages"]]
    if len(set(numbers)) < len(numbers) or max(numbers) > document["page_count"]:
        raise ValueError(f"its page numbers {numbers[:10]} repeat or pass its {document['page_count']} pages")
    for page in document["pages"]:
        width, height = page["width"], page["height"]
        for line in page["lines"]:
            boxes = [line["bbox"], *(word["bbox"] for word in line["words"])]
            points = [*(line["polygon"] or []), *(point for box in boxes if box for point in _corners(box))]
            if any(x > width or y > height for x, y in points):
                raise ValueError(
                    f"page {page['page_number']} has a box outside its {width} x {height} pixels"
                )


def _corners(box: list[int]) -> list[tuple[int, int]]:
    return [(box[0], box[1]), (box[2], box[3])]


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
            line.get("attention_agreement"),
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
        regions=tuple(None if r is None else Region.from_dict(r) for r in page.get("regions", ())),
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
    media_type = "application/json"
    extension = ".json"

    def render(
        self, results: Sequence[PageResult], source: bytes | None = None, identity: Identity = None
    ) -> bytes:
        """Render the document object, pages in order, recording the input's `identity` where known."""
        pages = self.check(results)
        first = pages[0]
        document = _document_fields(first.info, first.task, self.options.model, identity)
        document["pages"] = [page_object(result) for result in pages]
        return _json_bytes(document, indent=2)


@register
class JsonlWriter(_TaskNamed):
    """One JSON object per page, each on its own line, for pipelines."""

    format = "jsonl"
    media_type = "application/x-ndjson"
    extension = ".jsonl"
    streams = True

    def render(
        self, results: Sequence[PageResult], source: bytes | None = None, identity: Identity = None
    ) -> bytes:
        """Render every page as one line, in page order, each with the input's `identity` where known."""
        return b"".join(self._line(result, identity) for result in self.check(results))

    def stream_page(self, result: PageResult) -> bytes:
        """Render one page as one line, for printing pages as they finish."""
        self.check([result])
        return self._line(result, None)

    def _line(self, result: PageResult, identity: InputIdentity | None) -> bytes:
        fields = _document_fields(result.info, result.task, self.options.model, identity)
        return _json_bytes({**fields, **page_object(result)}, indent=None)


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
