"""Output writers, each checked by a real reader, and atomic file writes."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pymupdf
import pytest
from lxml import etree
from PIL import Image

from kosmos_cli.errors import InputError, KosmosError, UsageError
from kosmos_cli.stores import atomic_write
from kosmos_cli.values import Document, Line, Matrix, Page, PageInfo, PageResult, Point, Status, Task, Word
from kosmos_cli.writers import WRITERS, DocumentWriter, PageWriter, WriterOptions, formats_for, get_writer
from kosmos_cli.writers.data import JsonlWriter, pixel_bbox_to_pdf
from kosmos_cli.writers.searchable_pdf import DEFAULT_IMAGE_DPI, PdfWriter

IMAGE_DOC = Document("/in/scan.png", "scan")
PDF_DOC = Document("/in/report.pdf", "sub/report")
PDF_MATRIX: Matrix = (0.5, 0.0, 0.0, -0.5, 0.0, 792.0)  # Letter at 144 dpi, upright


def box(x0: int, y0: int, x1: int, y1: int) -> tuple[Point, Point, Point, Point]:
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def line(text: str, bbox: tuple[int, int, int, int] | None) -> Line:
    return Line(text, box(*bbox) if bbox else None)


def info(
    page_index: int = 0,
    page_count: int = 1,
    *,
    document: Document = IMAGE_DOC,
    size: tuple[int, int] = (200, 100),
    dpi: float | None = None,
    matrix: Matrix | None = None,
) -> PageInfo:
    return PageInfo(document, page_index, page_count, size[0], size[1], dpi, matrix)


def ocr(
    page_info: PageInfo, lines: list[Line], status: Status = Status.OK, error: str | None = None
) -> PageResult:
    text = "" if status is Status.FAILED else "\n".join(line.text for line in lines)
    return PageResult(page_info, Task.OCR, text, lines=tuple(lines), status=status, error=error)


def md(page_info: PageInfo, text: str, status: Status = Status.OK, error: str | None = None) -> PageResult:
    return PageResult(page_info, Task.MD, "" if status is Status.FAILED else text, status=status, error=error)


LINES = [
    line("Total 50,000", (10, 20, 110, 40)),
    line("no box", None),
    line("Ünïcödé 漢字", (5, 60, 190, 90)),
]


# --- registry -------------------------------------------------------------------------------------


def test_registry_names_match_formats() -> None:
    assert list(WRITERS) == [
        "md", "txt", "json", "jsonl", "hocr", "alto", "page", "pdf", "chunks", "draw", "attention", "heat"
    ]  # fmt: skip
    extensions = {"alto": ".alto.xml", "chunks": ".chunks.jsonl"}
    for name, cls in WRITERS.items():
        assert cls.format == name
        if issubclass(cls, DocumentWriter):
            assert cls.extension == extensions.get(name, f".{name}")


@pytest.mark.parametrize(
    ("task", "formats"),
    [
        (Task.MD, ["md", "json", "jsonl", "chunks"]),
        (Task.OCR, ["txt", "json", "jsonl", "hocr", "alto", "page", "pdf"]),
    ],
)
def test_formats_for(task: Task, formats: list[str]) -> None:
    assert formats_for(task) == formats


@pytest.mark.parametrize(
    ("name", "task", "message", "hint"),
    [
        ("docx", Task.OCR, "unknown format `docx`", "use one of: txt, json, jsonl, hocr, alto, page, pdf"),
        (
            "txt",
            Task.MD,
            "format `txt` cannot hold `md` results",
            "for `kosmos md` use one of: md, json, jsonl, chunks",
        ),
        (
            "pdf",
            Task.MD,
            "format `pdf` cannot hold `md` results",
            "for `kosmos md` use one of: md, json, jsonl, chunks",
        ),
    ],
)
def test_get_writer_refuses(name: str, task: Task, message: str, hint: str) -> None:
    with pytest.raises(UsageError) as caught:
        get_writer(name, task=task)
    assert (caught.value.message, caught.value.hint, caught.value.exit_code) == (message, hint, 2)


def test_get_writer_passes_the_options() -> None:
    writer = get_writer("pdf", task=Task.OCR, options=WriterOptions(password="s3cret"))
    assert isinstance(writer, PdfWriter) and writer.options.password == "s3cret"


@pytest.mark.parametrize(
    ("name", "suffix"),
    [
        ("md", "md"),
        ("txt", "txt"),
        ("json", "json"),
        ("jsonl", "jsonl"),
        ("hocr", "hocr"),
        ("alto", "alto.xml"),
        ("pdf", "pdf"),
    ],
)
def test_file_name_comes_from_the_writer(name: str, suffix: str) -> None:
    writer = WRITERS[name]()
    assert isinstance(writer, DocumentWriter)
    assert writer.file_name(PDF_DOC) == f"sub/report.{suffix}"


@pytest.mark.parametrize(
    ("results", "message"),
    [
        ([], "no page results"),
        ([ocr(info(0, 2), []), ocr(info(1, 2, document=PDF_DOC), [])], "mixed"),
        ([md(info(), "x")], "cannot hold md results"),
    ],
)
def test_render_refuses_bad_input(results: list[PageResult], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WRITERS["txt"]().render(results)


# --- md and txt -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        pytest.param([md(info(), "# Title\n\nBody text.")], "# Title\n\nBody text.\n", id="one-page"),
        pytest.param([md(info(), "")], "", id="one-empty-page"),
        pytest.param(
            [md(info(), "cut off", Status.TRUNCATED)],
            "<!-- kosmos: page 1 truncated -->\n\ncut off\n",
            id="one-truncated-page",
        ),
        pytest.param(
            [md(info(), "", Status.FAILED, "out of memory")],
            "<!-- kosmos: page 1 failed: out of memory -->\n",
            id="one-failed-page",
        ),
        pytest.param(
            [
                md(info(2, 3), "", Status.FAILED, "CUDA out of memory --\nretry <b>"),
                md(info(0, 3), "one"),
                md(info(1, 3), "two\n\nparagraphs", Status.TRUNCATED),
            ],
            "<!-- kosmos: page 1 -->\n\none\n\n"
            "<!-- kosmos: page 2 truncated -->\n\ntwo\n\nparagraphs\n\n"
            "<!-- kosmos: page 3 failed: CUDA out of memory - - retry <b> -->\n",
            id="pages-in-any-order",
        ),
        pytest.param(
            [md(info(4, 9), "fifth"), md(info(6, 9), "")],
            "<!-- kosmos: page 5 -->\n\nfifth\n\n<!-- kosmos: page 7 -->\n",
            id="selected-pages",
        ),
    ],
)
def test_markdown(results: list[PageResult], expected: str) -> None:
    assert WRITERS["md"]().render(results).decode("utf-8") == expected


def test_markdown_splits_back_into_pages() -> None:
    pages = ["# One\n\ntext", "| a | b |\n|---|---|\n| 1 | 2 |", "last"]
    rendered = WRITERS["md"]().render([md(info(i, 3), text) for i, text in enumerate(pages)]).decode()
    parts = re.split(r"\n*<!-- kosmos: page \d+[^>]*-->\n*", rendered)
    assert parts[1:] == [pages[0], pages[1], pages[2] + "\n"]


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        pytest.param(
            [ocr(info(), LINES)],
            "10,20,110,20,110,40,10,40,Total 50,000\n,,,,,,,,no box\n5,60,190,60,190,90,5,90,Ünïcödé 漢字\n",
            id="one-page-exact",
        ),
        pytest.param([ocr(info(), [])], "", id="no-lines"),
        pytest.param(
            [ocr(info(1, 2), [LINES[1]], Status.TRUNCATED), ocr(info(0, 2), LINES[:1])],
            "# kosmos: page 1\n10,20,110,20,110,40,10,40,Total 50,000\n"
            "# kosmos: page 2 truncated\n,,,,,,,,no box\n",
            id="two-pages",
        ),
        pytest.param(
            [ocr(info(0, 2), []), ocr(info(1, 2), [], Status.FAILED, "bad\npage")],
            "# kosmos: page 1\n# kosmos: page 2 failed: bad page\n",
            id="empty-and-failed",
        ),
    ],
)
def test_txt(results: list[PageResult], expected: str) -> None:
    assert WRITERS["txt"]().render(results).decode("utf-8") == expected


@pytest.mark.parametrize(
    ("name", "document", "expected"),
    [
        ("md", IMAGE_DOC, b"<!-- kosmos: document /in/scan.png -->\n\n"),
        ("md", Document("/tmp/spool", "stdin", "<stdin>"), b"<!-- kosmos: document <stdin> -->\n\n"),
        ("md", Document("/in/a--b.png", "a--b"), b"<!-- kosmos: document /in/a- -b.png -->\n\n"),
        ("txt", IMAGE_DOC, b"# kosmos: document /in/scan.png\n"),
        ("json", IMAGE_DOC, b""),
        ("hocr", IMAGE_DOC, b""),
    ],
)
def test_document_header(name: str, document: Document, expected: bytes) -> None:
    assert WRITERS[name]().document_header(document) == expected


# --- JSON and JSONL -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    text = resources.files("kosmos_cli").joinpath("result.schema.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


def validate(instance: Any, schema: dict[str, Any], definition: str | None = None) -> None:
    if definition is not None:
        schema = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{definition}"}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_json_document_exact() -> None:
    words = (Word("Total", (10, 21, 50, 39)), Word("50,000", (60, 22, 110, 39)))
    sure = Line("Total 50,000", box(10, 20, 110, 40), confidence=0.9123, min_confidence=0.5, words=words)
    results = [ocr(info(size=(200, 100)), [sure, LINES[1]])]
    assert json.loads(WRITERS["json"]().render(results)) == {
        "schema_version": 5,
        "source": "/in/scan.png",
        "path": "/in/scan.png",
        "model": None,
        "page_count": 1,
        "task": "ocr",
        "pages": [
            {
                "page_number": 1,
                "width": 200,
                "height": 100,
                "dpi": None,
                "pixel_to_pdf": None,
                "status": "ok",
                "error": None,
                "truncation": None,
                "text_source": "model",
                "text": "Total 50,000\nno box",
                "raw": "",
                "lines": [
                    {
                        "text": "Total 50,000",
                        "polygon": [[10, 20], [110, 20], [110, 40], [10, 40]],
                        "bbox": [10, 20, 110, 40],
                        "confidence": 0.9123,
                        "min_confidence": 0.5,
                        "words": [
                            {"text": "Total", "bbox": [10, 21, 50, 39]},
                            {"text": "50,000", "bbox": [60, 22, 110, 39]},
                        ],
                    },
                    {
                        "text": "no box",
                        "polygon": None,
                        "bbox": None,
                        "confidence": None,
                        "min_confidence": None,
                        "words": [],
                    },
                ],
            }
        ],
    }


def test_json_pdf_pages_carry_pdf_boxes(schema: dict[str, Any]) -> None:
    pdf_info = info(0, 3, document=PDF_DOC, size=(1224, 1584), dpi=144.0, matrix=PDF_MATRIX)
    failed_info = PageInfo(PDF_DOC, 2, 3, 0, 0)  # a page that could not even be rendered
    results = [
        ocr(pdf_info, LINES),
        ocr(failed_info, [], Status.FAILED, "page 3 cannot be rendered"),
    ]
    data = json.loads(WRITERS["json"]().render(results))
    validate(data, schema)
    first, failed = data["pages"]
    assert [page_line["pdf_bbox"] for page_line in first["lines"]] == [
        list(pixel_bbox_to_pdf((10, 20, 110, 40), PDF_MATRIX)),
        None,
        list(pixel_bbox_to_pdf((5, 60, 190, 90), PDF_MATRIX)),
    ]
    assert first["lines"][0]["pdf_bbox"] == [5.0, 772.0, 55.0, 782.0]
    assert (first["dpi"], first["page_number"]) == (144.0, 1)
    assert failed == {
        "page_number": 3,
        "width": 0,
        "height": 0,
        "dpi": None,
        "pixel_to_pdf": None,
        "status": "failed",
        "error": "page 3 cannot be rendered",
        "truncation": None,
        "text_source": "model",
        "text": "",
        "raw": "",
        "lines": [],
    }


def test_json_markdown_document(schema: dict[str, Any]) -> None:
    results = [md(info(0, 2), "# Über\n\ntext"), md(info(1, 2), "more", Status.TRUNCATED)]
    rendered = WRITERS["json"]().render(results)
    assert rendered.endswith(b"}\n") and "Über".encode() in rendered  # UTF-8, not \u escapes
    data = json.loads(rendered)
    validate(data, schema)
    assert list(data) == ["schema_version", "source", "path", "model", "page_count", "task", "pages"]
    assert list(data["pages"][0]) == [
        "page_number",
        "width",
        "height",
        "dpi",
        "pixel_to_pdf",
        "status",
        "error",
        "truncation",
        "text_source",
        "text",
        "raw",
        "lines",
    ]
    assert [(p["text"], p["status"], p["lines"]) for p in data["pages"]] == [
        ("# Über\n\ntext", "ok", []),
        ("more", "truncated", []),
    ]
    assert WRITERS["json"]().render(list(reversed(results))) == rendered


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d.pop("source"),
        lambda d: d.update(task="summary"),
        lambda d: d["pages"][0].update(page_number=0),
        lambda d: d["pages"][0].update(status="done"),
        lambda d: d["pages"][0]["lines"][0].update(polygon=[[1, 2], [3, 4]]),
        lambda d: d["pages"][0]["lines"][0].update(bbox=[1, 2, 3]),
        lambda d: d["pages"][0]["lines"][0].update(extra=1),
        lambda d: d["pages"][0].update(colour="red"),
    ],
)
def test_schema_rejects_broken_documents(schema: dict[str, Any], breakage: Any) -> None:
    data = json.loads(WRITERS["json"]().render([ocr(info(), LINES)]))
    validate(data, schema)
    broken = copy.deepcopy(data)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, schema)


def test_jsonl_streams_one_page_per_line(schema: dict[str, Any]) -> None:
    writer = JsonlWriter()
    pdf_pages = [
        ocr(info(0, 2, document=PDF_DOC, size=(1224, 1584), dpi=144.0, matrix=PDF_MATRIX), LINES),
        ocr(
            info(1, 2, document=PDF_DOC, size=(1224, 1584), dpi=144.0, matrix=PDF_MATRIX),
            [],
            Status.FAILED,
            "x",
        ),
    ]
    rendered = writer.render(list(reversed(pdf_pages)))
    assert rendered == b"".join(writer.stream_page(result) for result in pdf_pages)
    rows = rendered.decode("utf-8").split("\n")
    assert rows[-1] == "" and len(rows) == 3
    for number, row in enumerate(rows[:-1], start=1):
        data = json.loads(row)
        validate(data, schema, "streamedPage")
        assert list(data)[:7] == [
            "schema_version",
            "source",
            "path",
            "model",
            "page_count",
            "task",
            "page_number",
        ]
        assert (data["source"], data["page_count"], data["task"], data["page_number"]) == (
            "/in/report.pdf",
            2,
            "ocr",
            number,
        )
    with pytest.raises(jsonschema.ValidationError):
        validate(json.loads(rows[0]), schema)  # a streamed page is not a document


# --- hOCR -----------------------------------------------------------------------------------------

XHTML = "{http://www.w3.org/1999/xhtml}"


def parse_hocr(data: bytes) -> etree._Element:
    return etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))


def title_properties(element: etree._Element) -> dict[str, str]:
    return dict(part.strip().split(" ", 1) for part in element.get("title").split(";"))


def test_hocr_boxes_read_back() -> None:
    document = Document('/in/we"ird & <name>.png', "weird")
    tricky = line('a < b & "c" \x0bend', (1, 2, 30, 40))
    results = [
        ocr(info(1, 3, document=document, size=(300, 400)), [tricky, LINES[1]], Status.TRUNCATED),
        ocr(info(0, 3, document=document, size=(200, 100)), LINES),
        ocr(info(2, 3, document=document, size=(300, 400)), [], Status.FAILED, "broken -- page"),
    ]
    rendered = WRITERS["hocr"]().render(results)
    root = parse_hocr(rendered)
    assert root.findtext(f"{XHTML}head/{XHTML}title") == '/in/we"ird & <name>.png'
    metas = {meta.get("name"): meta.get("content") for meta in root.iter(f"{XHTML}meta")}
    assert metas["ocr-capabilities"] == "ocr_page ocr_line ocrx_word ocrp_wconf"
    assert metas["ocr-number-of-pages"] == "3"
    pages = root.findall(f"{XHTML}body/{XHTML}div")
    assert [page.get("class") for page in pages] == ["ocr_page"] * 3
    assert [title_properties(page)["bbox"] for page in pages] == ["0 0 200 100", "0 0 300 400", "0 0 300 400"]
    assert [title_properties(page)["ppageno"] for page in pages] == ["0", "1", "2"]
    assert title_properties(pages[0])["image"] == '"/in/we\\"ird & <name>.png"'
    read_back = [
        [(span.get("class"), title_properties(span)["bbox"], span.text) for span in page.iter(f"{XHTML}span")]
        for page in pages
    ]
    assert read_back == [
        [("ocr_line", "10 20 110 40", "Total 50,000"), ("ocr_line", "5 60 190 90", "Ünïcödé 漢字")],
        [("ocr_line", "1 2 30 40", 'a < b & "c" end')],
        [],
    ]
    comments = [node.text for node in root.iter(etree.Comment)]
    assert comments == [" kosmos: page 2 truncated ", " kosmos: page 3 failed: broken - - page "]
    ids = [element.get("id") for element in root.iter() if element.get("id")]
    assert len(ids) == len(set(ids))


def test_hocr_lines_hold_their_words_with_boxes_and_confidence() -> None:
    words = (Word("Total", (10, 21, 50, 39)), Word("<50>", (60, 22, 110, 39)))
    sure = Line("Total <50>", box(10, 20, 110, 40), confidence=0.9149, min_confidence=0.3, words=words)
    unknown = Line(
        "no figure",
        box(5, 60, 190, 90),
        words=(Word("no", (5, 61, 40, 89)), Word("figure", (50, 61, 190, 89))),
    )
    root = parse_hocr(WRITERS["hocr"]().render([ocr(info(), [sure, unknown])]))
    lines = [span for span in root.iter(f"{XHTML}span") if span.get("class") == "ocr_line"]
    read_back = [
        [(word.get("class"), word.get("id"), word.get("title"), word.text) for word in line] for line in lines
    ]
    assert read_back == [
        [
            ("ocrx_word", "word_1_1_1", "bbox 10 21 50 39; x_wconf 91", "Total"),
            ("ocrx_word", "word_1_1_2", "bbox 60 22 110 39; x_wconf 91", "<50>"),
        ],
        [
            ("ocrx_word", "word_1_2_1", "bbox 5 61 40 89", "no"),
            ("ocrx_word", "word_1_2_2", "bbox 50 61 190 89", "figure"),
        ],
    ]
    assert ["".join(line.itertext()) for line in lines] == ["Total <50>", "no figure"]


def test_hocr_passes_hocr_tools_checks(tmp_path: Path) -> None:
    from hocr_tools_lib.tools.hocr_check import Checker

    words = (Word("Total", (10, 21, 50, 39)), Word("50,000", (60, 22, 110, 39)))
    sure = Line("Total 50,000", box(10, 20, 110, 40), confidence=0.9124, words=words)
    path = tmp_path / "page.hocr"
    # One page: the checker compares the lines of every page with each other (its XPath starts at //).
    path.write_bytes(WRITERS["hocr"]().render([ocr(info(size=(200, 100)), [sure, LINES[2]])]))
    report = io.StringIO()
    with contextlib.redirect_stderr(report):
        Checker(path).check()
    lines = report.getvalue().splitlines()
    assert lines and all(line.startswith("ok ") for line in lines), lines


def test_hocr_stdin_document_has_no_image_property() -> None:
    document = Document("/tmp/kosmos-spool-1234", "stdin", "<stdin>")
    root = parse_hocr(WRITERS["hocr"]().render([ocr(info(document=document), LINES)]))
    page = root.find(f"{XHTML}body/{XHTML}div")
    assert page is not None and "image" not in title_properties(page)


# --- searchable PDF -------------------------------------------------------------------------------

# Source pages: (MediaBox, CropBox, /Rotate), chosen to cover a rotation, a crop box offset and a
# media box that does not start at the origin.
SOURCE_PAGES = [
    ("0 0 600 800", "50 150 550 700", 90),
    ("0 100 600 900", "50 250 550 800", 0),
    ("0 0 300 200", None, 180),
    ("0 0 400 300", None, 270),
]
DPI = [144.0, 72.0, 72.0, 72.0]
# Pixel -> PDF user space for each page at its DPI, worked out by hand from the boxes above:
# page 1 shows the crop box turned a quarter clockwise, so pixel x runs up the page from y = 150 and
# pixel y runs right from x = 50; page 2 flips y under the crop box's top (800); page 3 is upside down;
# page 4 is turned a quarter anticlockwise, so pixel x runs down from y = 300 and pixel y left from x = 400.
PIXEL_TO_PDF: list[Matrix] = [
    (0, 0.5, 0.5, 0, 50, 150),
    (1, 0, 0, -1, 50, 800),
    (-1, 0, 0, 1, 300, 0),
    (0, -1, -1, 0, 400, 300),
]
PIXEL_SIZES = [(1100, 1000), (500, 550), (300, 200), (300, 400)]
PAGE_LINES = [
    [line("Rotated page heading", (100, 80, 700, 140)), line("Ωμέγα 漢字 Café", (100, 400, 600, 450))],
    [line("Offset crop box", (20, 30, 300, 60)), line("second line here", (40, 500, 480, 530))],
    [line("Upside down", (10, 10, 200, 40))],
    [line("Turned left", (20, 30, 250, 60)), line("again", (20, 350, 90, 380))],
]


def make_source_pdf(path: Path, *, password: str | None = None) -> None:
    doc = pymupdf.open()
    for number, (media, crop, rotate) in enumerate(SOURCE_PAGES, start=1):
        page = doc.new_page()
        crop_entry = f"/CropBox [{crop}]" if crop else ""
        parent = doc.xref_get_key(page.xref, "Parent")[1]
        font = "<< /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >>"
        doc.update_object(
            page.xref,
            f"<< /Type /Page /MediaBox [{media}] {crop_entry} /Rotate {rotate} /Parent {parent}"
            f" /Resources {font} >>",
        )
        contents = doc.get_new_xref()
        doc.update_object(contents, "<<>>")
        x, y = (float(value) for value in (crop or media).split()[:2])
        doc.update_stream(contents, f"BT /F1 12 Tf {x + 5} {y + 5} Td (ORIGINAL{number}) Tj ET".encode())
        doc.xref_set_key(page.xref, "Contents", f"{contents} 0 R")
    if password:
        doc.save(path, encryption=pymupdf.mupdf.PDF_ENCRYPT_AES_256, user_pw=password, owner_pw=password)
    else:
        doc.save(path)


def pdf_results(path: Path, page_indices: list[int] | None = None) -> list[PageResult]:
    document = Document(str(path), "doc")
    results = []
    for index in page_indices if page_indices is not None else range(len(SOURCE_PAGES)):
        size = PIXEL_SIZES[index]
        page_info = PageInfo(document, index, len(SOURCE_PAGES), *size, DPI[index], PIXEL_TO_PDF[index])
        results.append(ocr(page_info, PAGE_LINES[index]))
    return results


def words(page: pymupdf.Page) -> list[tuple[str, pymupdf.Rect]]:
    """Return each extracted word with its rectangle in the page's unrotated space."""
    return [(text, pymupdf.Rect(x0, y0, x1, y1)) for x0, y0, x1, y1, text, *_ in page.get_text("words")]


def unrotated_to_pdf(index: int) -> pymupdf.Matrix:
    """Map source page `index`'s unrotated MuPDF space to PDF user space, from the boxes the test wrote."""
    media, crop, _ = SOURCE_PAGES[index]
    left, _, _, top = (float(value) for value in (crop or media).split())
    return pymupdf.Matrix(1, 0, 0, -1, left, top)


def grown(rect: pymupdf.Rect, by: float = 0.5) -> pymupdf.Rect:
    """Return the rectangle grown by `by` points on every side, for float noise."""
    return pymupdf.Rect(rect.x0 - by, rect.y0 - by, rect.x1 + by, rect.y1 + by)


def assert_searchable(
    page: pymupdf.Page, lines: list[Line], dpi: float, source_index: int | None = None
) -> None:
    """Check each line's words lie inside its box, as displayed and (for source PDF pages) in PDF space."""
    found = words(page)
    for expected in lines:
        assert expected.bbox is not None
        shown = pymupdf.Rect(expected.bbox) * (72 / dpi)  # the pixel box on the page as displayed
        matches = [rect for _, rect in found if (rect * page.rotation_matrix).intersects(shown)]
        assert [text for text, rect in found if rect in matches] == expected.text.split()
        union = pymupdf.Rect(matches[0])
        for rect in matches:
            assert rect * page.rotation_matrix in grown(shown)
            union |= rect
        # The text is stretched over the whole box, so search hits highlight the whole line.
        union *= page.rotation_matrix
        assert union.width == pytest.approx(shown.width, abs=0.05)
        assert union.height == pytest.approx(shown.height, abs=0.05)
        if source_index is not None:  # and inside the `pdf_bbox` the JSON output reports
            pdf_box = pymupdf.Rect(pixel_bbox_to_pdf(expected.bbox, PIXEL_TO_PDF[source_index]))
            for rect in matches:
                in_pdf = rect * unrotated_to_pdf(source_index)
                in_pdf.normalize()
                assert in_pdf in grown(pdf_box)


def test_hand_geometry_matches_the_renderer(tmp_path: Path) -> None:
    from kosmos_cli.rasterize import iter_pages

    source = tmp_path / "in.pdf"
    make_source_pdf(source)
    for dpi in sorted(set(DPI)):
        for page in iter_pages(Document(str(source), "in"), dpi=dpi):
            assert isinstance(page, Page)
            index = page.info.page_index
            if DPI[index] == dpi:
                assert (page.info.width, page.info.height) == PIXEL_SIZES[index]
                assert page.info.pixel_to_pdf == pytest.approx(PIXEL_TO_PDF[index])


def searchable(results: list[PageResult], source: Path, *, password: str | None = None) -> bytes:
    """Build the searchable PDF of `source` from its bytes, as the reader hands them over."""
    return PdfWriter(WriterOptions(password=password)).render(results, source.read_bytes())


def test_searchable_pdf_from_pdf_pages(tmp_path: Path) -> None:
    source = tmp_path / "in.pdf"
    make_source_pdf(source)
    rendered = searchable(pdf_results(source), source)
    out = pymupdf.open(stream=rendered, filetype="pdf")
    assert out.page_count == len(SOURCE_PAGES) and not out.needs_pass
    for index in range(out.page_count):
        page = out[index]
        assert page.rotation == SOURCE_PAGES[index][2]
        assert (page.rect.width * DPI[index] / 72, page.rect.height * DPI[index] / 72) == PIXEL_SIZES[index]
        assert f"ORIGINAL{index + 1}" in page.get_text()  # the original content is kept
        assert_searchable(page, PAGE_LINES[index], DPI[index], index)
    assert searchable(pdf_results(source), source) == rendered  # same input, same bytes
    assert len(rendered) < source.stat().st_size + 40_000  # only the glyphs used are embedded


def test_searchable_pdf_keeps_only_the_pages_read(tmp_path: Path) -> None:
    source = tmp_path / "in.pdf"
    make_source_pdf(source)
    (third,) = pdf_results(source, [2])
    unreadable = PageResult(
        PageInfo(third.info.document, 1, len(SOURCE_PAGES), 0, 0),
        Task.OCR,
        "",
        status=Status.FAILED,
        error="x",
    )
    out = pymupdf.open(stream=searchable([third, unreadable], source), filetype="pdf")
    assert [out[number].get_text().split() for number in range(out.page_count)] == [
        ["ORIGINAL2"],
        ["ORIGINAL3", "Upside", "down"],
    ]
    assert_searchable(out[1], PAGE_LINES[2], DPI[2], 2)


def test_searchable_pdf_of_an_encrypted_pdf(tmp_path: Path) -> None:
    source = tmp_path / "locked.pdf"
    make_source_pdf(source, password="s3cret")
    rendered = searchable(pdf_results(source, [0]), source, password="s3cret")
    out = pymupdf.open(stream=rendered, filetype="pdf")
    assert out.needs_pass  # the output stays as locked as the input
    assert out.authenticate("s3cret")
    assert_searchable(out[0], PAGE_LINES[0], DPI[0], 0)
    for password in (None, "wrong"):
        with pytest.raises(InputError, match="password does not open it") as caught:
            searchable(pdf_results(source, [0]), source, password=password)
        assert caught.value.hint == "pass the right one with --password"


def test_searchable_pdf_is_built_from_the_bytes_read_not_the_file(tmp_path: Path) -> None:
    source = tmp_path / "in.pdf"
    make_source_pdf(source)
    results = pdf_results(source, [0, 1])
    data = source.read_bytes()
    source.unlink()  # the input is gone by the time the document is written
    out = pymupdf.open(stream=PdfWriter().render(results, data), filetype="pdf")
    assert [out[number].get_text().split()[0] for number in range(out.page_count)] == [
        "ORIGINAL1",
        "ORIGINAL2",
    ]
    with pytest.raises(ValueError, match="pass `source`"):
        PdfWriter().render(results)
    with pytest.raises(InputError, match=r"cannot open `.*in\.pdf` to build the searchable PDF"):
        PdfWriter().render(results, b"%PDF-1.7 and then nothing")


def image_results(path: Path, lines: list[Line], size: tuple[int, int]) -> list[PageResult]:
    return [ocr(PageInfo(Document(str(path), "img"), 0, 1, size[0], size[1]), lines)]


@pytest.mark.parametrize(
    ("suffix", "save_options", "dpi", "image_kind"),
    [
        (".png", {"dpi": (300, 300)}, 300.0, "png"),
        (".png", {}, DEFAULT_IMAGE_DPI, "png"),
        (".jpg", {"dpi": (96, 96), "quality": 90}, 96.0, "jpeg"),
        (".png", {"dpi": (1, 1)}, DEFAULT_IMAGE_DPI, "png"),  # a placeholder, not a resolution
    ],
)
def test_searchable_pdf_from_an_image(
    tmp_path: Path, suffix: str, save_options: dict[str, Any], dpi: float, image_kind: str
) -> None:
    path = tmp_path / f"page{suffix}"
    Image.new("RGB", (600, 400), (255, 255, 255)).save(path, **save_options)
    lines = [
        line("Hello searchable world", (30, 40, 570, 80)),
        line("no box", None),
        line("12,34 €", (30, 300, 200, 330)),
    ]
    out = pymupdf.open(stream=searchable(image_results(path, lines, (600, 400)), path), filetype="pdf")
    page = out[0]
    assert (page.rect.width, page.rect.height) == pytest.approx((600 * 72 / dpi, 400 * 72 / dpi), rel=1e-5)
    assert_searchable(page, [lines[0], lines[2]], dpi)
    ((xref, *_),) = page.get_images()
    assert out.extract_image(xref)["ext"] == image_kind
    assert "no box" not in page.get_text()


@pytest.mark.parametrize("source_index", [0, 2, 3], ids=["upright", "rotated-180", "rotated-90"])
def test_searchable_pdf_places_each_word_on_its_box(tmp_path: Path, source_index: int) -> None:
    source = tmp_path / "in.pdf"
    make_source_pdf(source)
    (result,) = pdf_results(source, [source_index])
    width, height = PIXEL_SIZES[source_index]
    line_box = (width // 10, height // 5, width * 8 // 10, height // 5 + 30)  # inside the smallest page
    middle = (line_box[0] + line_box[2]) // 2
    boxes = [
        (line_box[0], line_box[1] + 3, middle - 10, line_box[3] - 2),
        (middle + 10, line_box[1] + 5, line_box[2], line_box[3] - 4),
    ]
    line_words = (Word("Searchable", boxes[0]), Word("words", boxes[1]))
    worded = Line("Searchable words", box(*line_box), words=line_words)
    out = pymupdf.open(stream=searchable([replace(result, lines=(worded,))], source), filetype="pdf")
    page = out[0]
    found = [
        (text, rect * page.rotation_matrix * (DPI[source_index] / 72))
        for text, rect in words(page)
        if text in ("Searchable", "words")
    ]
    assert [text for text, _ in found] == ["Searchable", "words"]
    for (_, rect), word in zip(
        found, line_words, strict=True
    ):  # each word over its own box, at its line's height
        x0, _, x1, _ = word.bbox
        assert (rect.x0, rect.x1) == (pytest.approx(x0, abs=0.5), pytest.approx(x1, abs=0.5))
        assert (rect.y0, rect.y1) == (
            pytest.approx(line_box[1], abs=0.5),
            pytest.approx(line_box[3], abs=0.5),
        )


def test_searchable_pdf_skips_glyphs_the_font_lacks(tmp_path: Path) -> None:
    path = tmp_path / "page.png"
    Image.new("RGB", (600, 400), (255, 255, 255)).save(path)
    lines = [line("🙂", (30, 40, 70, 80)), line("ok🙂", (30, 100, 200, 140))]
    out = pymupdf.open(stream=searchable(image_results(path, lines, (600, 400)), path), filetype="pdf")
    assert [text for text, _ in words(out[0])] == ["ok"]


def test_searchable_pdf_leaves_out_unreadable_failed_image_pages(tmp_path: Path) -> None:
    path = tmp_path / "page.png"
    Image.new("RGB", (60, 40), (255, 255, 255)).save(path)
    document = Document(str(path), "img")
    readable = ocr(PageInfo(document, 0, 2, 60, 40), [line("a", (1, 1, 50, 30))])
    gone = PageResult(PageInfo(document, 1, 2, 0, 0), Task.OCR, "", status=Status.FAILED, error="unreadable")
    out = pymupdf.open(stream=searchable([readable, gone], path), filetype="pdf")
    assert out.page_count == 1 and out[0].get_text().split() == ["a"]
    with pytest.raises(InputError, match="no page of"):
        searchable([gone], path)


# --- atomic writes --------------------------------------------------------------------------------


def test_atomic_write_creates_parents_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.md"
    atomic_write(target, b"first")
    atomic_write(target, "second ü".encode())
    assert target.read_bytes() == "second ü".encode()
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.md"]  # no temporary left


def test_atomic_write_uses_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        atomic_write(tmp_path / "out.txt", b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o640


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.json"
    target.write_bytes(b"old")

    def refuse(source: object, destination: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(KosmosError, match=r"cannot write `.*out\.json`: No space left on device"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_onto_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(KosmosError, match=r"cannot write `.*taken`"):
        atomic_write(tmp_path / "taken", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_atomic_write_long_names(tmp_path: Path) -> None:
    target = tmp_path / ("n" * 250 + ".md")
    atomic_write(target, b"x")
    assert target.read_bytes() == b"x"


# --- ALTO -----------------------------------------------------------------------------------------

SCHEMAS = Path(__file__).parent / "schemas"
ALTO = "{http://www.loc.gov/standards/alto/ns-v4#}"


@pytest.fixture(scope="module")
def alto_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMAS / "alto-4-4.xsd")))


def test_alto_is_valid_and_reads_back_pages_lines_and_words(alto_schema: etree.XMLSchema) -> None:
    words = (Word("Total", (10, 21, 50, 39)), Word("<50> & co", (60, 22, 110, 39)))
    sure = Line("Total <50> & co", box(10, 20, 110, 40), confidence=0.9124, min_confidence=0.3, words=words)
    old = line("read before words", (5, 60, 190, 90))  # no words: its text as one String
    document = Document("/in/report.pdf", "report")
    results = [
        ocr(info(1, 3, document=document, size=(300, 400)), [], Status.FAILED, "broken -- page"),
        ocr(info(0, 3, document=document, size=(200, 100)), [sure, LINES[1], old]),
        ocr(info(2, 3, document=document, size=(300, 400)), [LINES[2]], Status.TRUNCATED),
    ]
    rendered = WRITERS["alto"](WriterOptions(model="microsoft/kosmos-2.5")).render(results)
    root = etree.fromstring(rendered)
    alto_schema.assertValid(root)
    assert root.findtext(f"{ALTO}Description/{ALTO}MeasurementUnit") == "pixel"
    assert root.findtext(f"{ALTO}Description/{ALTO}sourceImageInformation/{ALTO}fileName") == "/in/report.pdf"
    processing = root.find(f"{ALTO}Description/{ALTO}Processing")
    assert processing is not None
    assert processing.findtext(f"{ALTO}processingStepSettings") == "model: microsoft/kosmos-2.5"
    assert processing.findtext(f"{ALTO}processingSoftware/{ALTO}softwareName") == "kosmos"
    pages = root.findall(f"{ALTO}Layout/{ALTO}Page")
    assert [(p.get("ID"), p.get("PHYSICAL_IMG_NR"), p.get("WIDTH")) for p in pages] == [
        ("page_1", "1", "200"),
        ("page_2", "2", "300"),
        ("page_3", "3", "300"),
    ]
    lines = [
        [
            (
                string.get("CONTENT"),
                string.get("HPOS"),
                string.get("VPOS"),
                string.get("WIDTH"),
                string.get("HEIGHT"),
                string.get("WC"),
            )
            for string in text_line.iter(f"{ALTO}String")
        ]
        for page in pages
        for text_line in page.iter(f"{ALTO}TextLine")
    ]
    assert lines == [
        [("Total", "10", "21", "40", "18", "0.9124"), ("<50> & co", "60", "22", "50", "17", "0.9124")],
        [("read before words", "5", "60", "185", "30", None)],  # "no box" is left out: ALTO places every line
        [("Ünïcödé 漢字", "5", "60", "185", "30", None)],
    ]
    assert len(pages[0].findall(f".//{ALTO}SP")) == 1
    spaces = [page.find(f"{ALTO}PrintSpace") for page in pages]
    assert [
        (s.get("HPOS"), s.get("VPOS"), s.get("WIDTH"), s.get("HEIGHT")) for s in spaces if s is not None
    ] == [
        ("0", "0", "200", "100"),
        ("0", "0", "300", "400"),
    ]  # the whole page, in the page's pixels
    assert spaces[1] is None  # the failed page: empty, with a comment
    comments = [node.text for node in root.iter(etree.Comment)]
    assert comments == [" kosmos: page 2 failed: broken - - page ", " kosmos: page 3 truncated "]


def test_alto_of_words_found_on_a_rendered_page_is_valid(alto_schema: etree.XMLSchema) -> None:
    from test_words import font, line_of, render

    from kosmos_cli.words import split_words

    image, line_box, _ = render("Words on a page", font("default", 24))
    words = split_words(image, line_of(line_box, "Words on a page"))
    page_line = Line("Words on a page", line_of(line_box, "").polygon, words=words)
    rendered = WRITERS["alto"]().render([ocr(info(size=image.size), [page_line])])
    root = etree.fromstring(rendered)
    alto_schema.assertValid(root)
    assert [s.get("CONTENT") for s in root.iter(f"{ALTO}String")] == ["Words", "on", "a", "page"]


# --- PAGE XML -------------------------------------------------------------------------------------

PAGE = "{http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15}"


@pytest.fixture(scope="module")
def page_schema() -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(SCHEMAS / "page-2019-07-15.xsd")))


def test_page_xml_is_valid_and_reads_back_lines_words_and_baselines(
    page_schema: etree.XMLSchema, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764547200")  # 2025-12-01T00:00:00Z
    words = (Word("Total", (10, 21, 50, 39)), Word("50,000", (60, 22, 110, 39)))
    sure = Line("Total 50,000", box(10, 20, 110, 40), confidence=0.9124, words=words)
    document = Document("/in/report & co.pdf", "report")
    result = ocr(info(1, 3, document=document, size=(200, 100)), [sure, LINES[1]], Status.TRUNCATED)
    page = Page(result.info, Image.new("RGB", (200, 100), "white"))
    writer = WRITERS["page"](WriterOptions(model="microsoft/kosmos-2.5"))
    assert isinstance(writer, PageWriter)
    assert writer.file_name(document, 1, 3) == "report-p002.page.xml"
    assert writer.file_name(Document("/in/a.png", "a.png"), 0, 1) == "a.png.page.xml"
    rendered = writer.render_page(page, result)
    assert rendered is not None
    root = etree.fromstring(rendered)
    page_schema.assertValid(root)
    assert root.findtext(f"{PAGE}Metadata/{PAGE}Creator") == "kosmos 0.1.0, model microsoft/kosmos-2.5"
    assert root.findtext(f"{PAGE}Metadata/{PAGE}Created") == "2025-12-01T00:00:00"
    page_element = root.find(f"{PAGE}Page")
    assert page_element is not None
    assert dict(page_element.attrib) == {
        "imageFilename": "/in/report & co.pdf",
        "imageWidth": "200",
        "imageHeight": "100",
    }
    (line_element,) = page_element.iter(f"{PAGE}TextLine")  # "no box" is left out
    coords = line_element.find(f"{PAGE}Coords")
    baseline = line_element.find(f"{PAGE}Baseline")
    assert coords is not None and coords.get("points") == "10,20 110,20 110,40 10,40"
    assert baseline is not None and baseline.get("points") == "10,36 110,36"
    read_back = [
        (
            word.find(f"{PAGE}Coords").get("points"),
            word.find(f"{PAGE}TextEquiv").get("conf"),
            word.findtext(f"{PAGE}TextEquiv/{PAGE}Unicode"),
        )  # type: ignore[union-attr]
        for word in line_element.iter(f"{PAGE}Word")
    ]
    assert read_back == [
        ("10,21 50,21 50,39 10,39", "0.9124", "Total"),
        ("60,22 110,22 110,39 60,39", "0.9124", "50,000"),
    ]
    assert line_element.findtext(f"{PAGE}TextEquiv/{PAGE}Unicode") == "Total 50,000"


def test_page_xml_of_a_failed_page_is_no_file() -> None:
    result = ocr(info(), [], Status.FAILED, "unreadable")
    writer = WRITERS["page"]()
    assert isinstance(writer, PageWriter)
    assert writer.render_page(Page(result.info, Image.new("RGB", (200, 100))), result) is None
