"""A PDF page's own text (`--text-layer`): read at the right place, sorted into kinds, used by mode."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pymupdf
import pytest
from typer.testing import CliRunner

from kosmos_cli.api import transcribe_files
from kosmos_cli.cli import app
from kosmos_cli.config import Job
from kosmos_cli.errors import UsageError
from kosmos_cli.rasterize import iter_pages
from kosmos_cli.testing import ScriptedRunner, image_hash
from kosmos_cli.text_layer import layer_result
from kosmos_cli.values import (
    Document,
    LayerKind,
    Line,
    Page,
    PageInfo,
    Status,
    Task,
    TextLayer,
    TextSource,
)

DPI = 144  # two pixels per point: boxes are checked against rendered ink
LINES = (  # text, font, size, where (unrotated page space: points, y down, baseline)
    ("Invoice number 2041", "helv", 14, (60, 90)),
    ("Times Roman serif line", "tiro", 12, (60, 160)),
    ("Courier fixed width", "cour", 11, (80, 240)),
)
SCAN_TEXT = "scanned words here"  # what the invisible OCR layer of a scan says


def digital_page(doc: pymupdf.Document, *, rotate: int = 0, crop: pymupdf.Rect | None = None) -> None:
    """A born-digital page: LINES in three fonts, then rotated and cropped as asked."""
    page = doc.new_page(width=400, height=320)
    for text, font, size, origin in LINES:
        page.insert_text(origin, text, fontname=font, fontsize=size)
    if crop is not None:
        page.set_cropbox(crop)
    page.set_rotation(rotate)


def scanned_page(doc: pymupdf.Document, *, ocr_layer: bool = False, visible_text: bool = False) -> None:
    """A scan: one image over the whole page; optionally another engine's OCR text over it."""
    page = doc.new_page(width=400, height=320)
    pixmap = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 200, 160), False)
    pixmap.set_rect(pixmap.irect, (240, 236, 228))
    pixmap.set_rect(pymupdf.IRect(30, 40, 150, 52), (20, 20, 20))  # a "line" of ink
    page.insert_image(page.rect, pixmap=pixmap)
    if ocr_layer or visible_text:
        page.insert_text(
            (60, 100), SCAN_TEXT, fontname="helv", fontsize=20, render_mode=0 if visible_text else 3
        )


def save(doc: pymupdf.Document, path: Path) -> Path:
    doc.save(path)
    return path


def read(path: Path) -> list[Page]:
    pages = list(iter_pages(Document(str(path), path.name), dpi=DPI, text_layer=True))
    assert all(isinstance(page, Page) for page in pages)
    return pages


def ink_box(page: Page, around: tuple[int, int, int, int], margin: int = 12) -> tuple[int, int, int, int]:
    """The bounding box of the dark pixels near a box (the rendered glyphs)."""
    gray = np.asarray(page.image.convert("L"))
    x0, y0, x1, y1 = around
    top, left = max(0, y0 - margin), max(0, x0 - margin)
    window = gray[top : y1 + margin, left : x1 + margin] < 128
    ys, xs = np.nonzero(window)
    assert len(xs), f"no ink near {around}"
    return (left + int(xs.min()), top + int(ys.min()), left + int(xs.max()) + 1, top + int(ys.max()) + 1)


@pytest.mark.parametrize(
    ("rotate", "crop"),
    [
        (0, None),
        (90, None),
        (180, None),
        (270, None),
        (0, pymupdf.Rect(30, 40, 380, 300)),
        (90, pymupdf.Rect(30, 40, 380, 300)),
        (270, pymupdf.Rect(50, 20, 390, 310)),
    ],
)
def test_born_digital_lines_and_words_sit_on_their_ink(
    tmp_path: Path, rotate: int, crop: pymupdf.Rect | None
) -> None:
    doc = pymupdf.open()
    digital_page(doc, rotate=rotate, crop=crop)
    (page,) = read(save(doc, tmp_path / "digital.pdf"))
    layer = page.text_layer
    assert layer is not None and layer.kind is LayerKind.DIGITAL
    assert [line.text for line in layer.lines] == [text for text, *_ in LINES]
    for line, (text, *_) in zip(layer.lines, LINES, strict=True):
        assert line.bbox is not None
        x0, y0, x1, y1 = line.bbox
        ink = ink_box(page, line.bbox)
        # The box holds the ink (to a pixel of rounding) and is not much larger: font ascent and descent.
        assert x0 - 1 <= ink[0] and y0 - 1 <= ink[1] and ink[2] <= x1 + 1 and ink[3] <= y1 + 1, (
            text,
            line.bbox,
            ink,
        )
        ink_area = (ink[2] - ink[0]) * (ink[3] - ink[1])
        assert (x1 - x0) * (y1 - y0) <= 2.5 * ink_area, (text, line.bbox, ink)
        assert [word.text for word in line.words] == text.split()
        for word in line.words:
            word_ink = ink_box(page, word.bbox, margin=0)
            assert word.bbox[0] - 1 <= word_ink[0] and word_ink[2] <= word.bbox[2] + 1, (word, word_ink)


def test_text_beyond_the_crop_box_is_left_out(tmp_path: Path) -> None:
    doc = pymupdf.open()
    digital_page(doc, crop=pymupdf.Rect(0, 120, 400, 320))  # cuts off the first line
    (page,) = read(save(doc, tmp_path / "cropped.pdf"))
    assert page.text_layer is not None
    assert [line.text for line in page.text_layer.lines] == [text for text, *_ in LINES[1:]]


@pytest.mark.parametrize(
    ("make", "kind", "texts"),
    [
        (lambda doc: scanned_page(doc), LayerKind.NONE, []),
        (lambda doc: scanned_page(doc, ocr_layer=True), LayerKind.OCR, [SCAN_TEXT]),
        (lambda doc: scanned_page(doc, visible_text=True), LayerKind.OCR, [SCAN_TEXT]),  # over the scan
        (lambda doc: doc.new_page().insert_text((72, 72), "p. 3"), LayerKind.NONE, []),  # too little
        (lambda doc: doc.new_page(), LayerKind.NONE, []),
    ],
    ids=["scan", "scan-with-ocr-layer", "text-over-scan", "page-number-only", "blank"],
)
def test_pages_are_sorted_into_kinds(tmp_path: Path, make: Any, kind: LayerKind, texts: list[str]) -> None:
    doc = pymupdf.open()
    make(doc)
    (page,) = read(save(doc, tmp_path / "page.pdf"))
    assert page.text_layer is not None and page.text_layer.kind is kind
    if kind is not LayerKind.NONE:
        assert [line.text for line in page.text_layer.lines] == texts


def test_a_digital_page_with_an_old_ocr_layer_keeps_only_its_visible_lines(tmp_path: Path) -> None:
    doc = pymupdf.open()
    digital_page(doc)
    doc[0].insert_text((60, 300), "stale invisible words", fontname="helv", fontsize=10, render_mode=3)
    (page,) = read(save(doc, tmp_path / "both.pdf"))
    assert page.text_layer is not None and page.text_layer.kind is LayerKind.DIGITAL
    assert [line.text for line in page.text_layer.lines] == [text for text, *_ in LINES]


def test_glyphs_without_characters_are_no_text_layer(tmp_path: Path) -> None:
    font = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
    if not font.exists():
        pytest.skip("needs DejaVu Sans (Debian's fonts-dejavu-core), which has a U+FFFD glyph")
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((72, 72), "ab" + "\ufffd" * 20, fontfile=str(font), fontname="dejavu")
    (read_page,) = read(save(doc, tmp_path / "garbled.pdf"))
    assert read_page.text_layer is not None and read_page.text_layer.kind is LayerKind.NONE


def test_images_and_other_documents_carry_no_text_layer(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), "white").save(tmp_path / "a.png")
    (page,) = read(tmp_path / "a.png")
    assert page.text_layer is None
    doc = pymupdf.open()
    digital_page(doc)
    path = save(doc, tmp_path / "d.pdf")
    (unread,) = list(iter_pages(Document(str(path), "d.pdf")))
    assert isinstance(unread, Page) and unread.text_layer is None  # only read when asked


# --- which result a page gets, by mode -------------------------------------------------------------

LAYERS = {
    "digital": TextLayer(LayerKind.DIGITAL, (Line("own text", ((1, 1), (9, 1), (9, 5), (1, 5))),)),
    "ocr": TextLayer(LayerKind.OCR, (Line("old ocr", ((1, 1), (9, 1), (9, 5), (1, 5))),)),
    "none": TextLayer(LayerKind.NONE),
    "image": None,
}


@pytest.mark.parametrize(
    ("mode", "layer", "expected"),
    [
        ("auto", "digital", "own text"),
        ("auto", "ocr", None),
        ("auto", "none", None),
        ("auto", "image", None),
        ("ignore", "digital", None),
        ("ignore", "ocr", None),
        ("only", "digital", "own text"),
        ("only", "ocr", "old ocr"),
        ("only", "none", "failed"),
        ("only", "image", "failed"),
    ],
)
def test_the_mode_decides_where_a_page_result_comes_from(mode: str, layer: str, expected: str | None) -> None:
    info = PageInfo(Document("d.pdf", "d.pdf"), 2, 5, 10, 10, pixel_to_pdf=(1, 0, 0, 1, 0, 0))
    page = Page(info, pymupdf.Pixmap(pymupdf.csRGB, (0, 0, 10, 10)).pil_image(), LAYERS[layer])
    result = layer_result(page, Job(task=Task.OCR, formats=("txt",), text_layer=mode))
    if expected is None:
        assert result is None
    elif expected == "failed":
        assert result is not None and result.status is Status.FAILED
        assert result.error == "no text layer of its own (--text-layer only)"
        assert result.hint == "use --text-layer auto to transcribe such pages with the model"
    else:
        assert result is not None and result.status is Status.OK
        assert result.text == expected and result.text_source is TextSource.PDF_TEXT
        assert result.lines == LAYERS[layer].lines


def test_a_document_whose_every_page_failed_counts_as_failed(tmp_path: Path) -> None:
    png = tmp_path / "scan.png"
    pymupdf.Pixmap(pymupdf.csRGB, (0, 0, 10, 10)).save(png)
    summary = transcribe_files(
        [str(png)], task="ocr", formats=["json"], output=str(tmp_path / "out"), text_layer="only",
        runner=ScriptedRunner(),
    )  # fmt: skip
    assert (summary.documents_done, summary.documents_failed, summary.pages_failed) == (0, 1, 1)


def test_only_says_that_an_image_has_no_text_layer() -> None:
    info = PageInfo(Document("scan.png", "scan.png"), 0, 1, 10, 10)  # no pixel-to-PDF map: not a PDF page
    page = Page(info, pymupdf.Pixmap(pymupdf.csRGB, (0, 0, 10, 10)).pil_image(), None)
    result = layer_result(page, Job(task=Task.OCR, formats=("txt",), text_layer="only"))
    assert result is not None and result.status is Status.FAILED
    assert result.error == "an image has no text layer: only PDF pages do (--text-layer only)"


def test_markdown_always_runs_the_model() -> None:
    page = Page(PageInfo(Document("d.pdf", "d.pdf"), 0, 1, 10, 10), None, LAYERS["digital"])
    assert layer_result(page, Job(task=Task.MD, formats=("md",))) is None
    with pytest.raises(UsageError, match="--text-layer only applies to kosmos ocr"):
        Job(task=Task.MD, formats=("md",), text_layer="only")
    with pytest.raises(UsageError, match="is not one of: auto, ignore, only"):
        Job(task=Task.OCR, formats=("txt",), text_layer="sometimes")


# --- whole runs ------------------------------------------------------------------------------------


def mixed_pdf(path: Path) -> Path:
    """Page 1 born-digital, page 2 a bare scan, page 3 a scan under another engine's invisible OCR."""
    doc = pymupdf.open()
    digital_page(doc)
    scanned_page(doc)
    scanned_page(doc, ocr_layer=True)
    return save(doc, path)


def run(tmp_path: Path, inputs: list[Path], **options: Any) -> tuple[dict[str, Any], Any]:
    out = tmp_path / "out"
    summary = transcribe_files(
        [str(path) for path in inputs], task="ocr", formats=["json", "pdf"], output=out, dpi=DPI, **options
    )
    data = json.loads((out / f"{inputs[0].name}.json").read_text())
    return data, summary


@pytest.mark.parametrize(
    ("mode", "sources", "loads"),
    [
        ("auto", ["pdf-text", "model", "model"], 1),
        ("ignore", ["model", "model", "model"], 1),
        ("only", ["pdf-text", None, "pdf-text"], 0),
    ],
)
def test_a_mixed_pdf_by_mode(
    tmp_path: Path, scripted: list[ScriptedRunner], mode: str, sources: list[str | None], loads: int
) -> None:
    pdf = mixed_pdf(tmp_path / "mixed.pdf")
    data, summary = run(tmp_path, [pdf], text_layer=mode)
    assert len(scripted) == loads
    pages = data["pages"]
    assert [page["text_source"] if page["status"] != "failed" else None for page in pages] == sources
    rendered = read(pdf)
    for page, source, original in zip(pages, sources, rendered, strict=True):
        if source == "model":
            assert page["text"] == f"page {image_hash(original.image.tobytes())}"
            assert page["raw"] and page["lines"][0]["confidence"] is None  # the scripted model's
        elif source == "pdf-text":
            assert original.text_layer is not None
            assert page["text"] == "\n".join(line.text for line in original.text_layer.lines)
            assert page["raw"] == ""
            assert [line["bbox"] for line in page["lines"]] == [
                list(line.bbox) for line in original.text_layer.lines
            ]
            assert all(line["confidence"] is None for line in page["lines"])
        else:
            assert page["error"] == "no text layer of its own (--text-layer only)"
    assert summary.pages_failed == (1 if mode == "only" else 0)


def test_a_born_digital_folder_never_loads_the_model(tmp_path: Path) -> None:
    for name in ("a.pdf", "b.pdf"):
        doc = pymupdf.open()
        digital_page(doc)
        digital_page(doc, rotate=90)
        save(doc, tmp_path / name)
    result = CliRunner().invoke(
        app,
        ["ocr", str(tmp_path / "a.pdf"), str(tmp_path / "b.pdf"), "-o", str(tmp_path / "out"),
         "--model", str(tmp_path / "no-such-model")],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "2 done" in result.stderr and "loading model" not in result.stderr
    written = (tmp_path / "out/a.pdf.txt").read_text().splitlines()
    assert [line for line in written if line.startswith("# kosmos:")] == [
        "# kosmos: page 1",
        "# kosmos: page 2",
    ]
    texts = [line.split(",", 8)[8] for line in written if not line.startswith("# kosmos:")]
    assert texts == [text for text, *_ in LINES] * 2


def test_changing_the_mode_redoes_the_document(tmp_path: Path, scripted: list[ScriptedRunner]) -> None:
    pdf = mixed_pdf(tmp_path / "mixed.pdf")
    run(tmp_path, [pdf], text_layer="auto")
    _, again = run(tmp_path, [pdf], text_layer="auto")
    assert again.documents_skipped == 1
    data, redone = run(tmp_path, [pdf], text_layer="ignore")
    assert redone.documents_done == 1 and data["pages"][0]["text_source"] == "model"


# --- the searchable PDF ------------------------------------------------------------------------------


def page_texts(path: Path) -> list[tuple[str, str]]:
    """Each page's visible and invisible text, as PyMuPDF reads it.

    Repeated characters are squeezed: the scripted model's one word (a hash) is stretched over the
    whole page's ink, and MuPDF reads two equal glyphs that overlap as one.
    """
    texts = []
    for page in pymupdf.open(path):
        spans = [
            span
            for block in page.get_text("dict")["blocks"]
            for line in block.get("lines", ())
            for span in line["spans"]
        ]
        texts.append(
            (
                squeeze(" ".join(span["text"] for span in spans if span["alpha"] > 0)),
                squeeze(" ".join(span["text"] for span in spans if span["alpha"] == 0)),
            )
        )
    return texts


def squeeze(text: str) -> str:
    return re.sub(r"(.)\1+", r"\1", text)


def test_the_searchable_pdf_stacks_no_second_layer_and_replaces_old_ocr(
    tmp_path: Path, scripted: list[ScriptedRunner]
) -> None:
    pdf = mixed_pdf(tmp_path / "mixed.pdf")
    hashes = [image_hash(page.image.tobytes()) for page in read(pdf)]
    visible = squeeze(" ".join(text for text, *_ in LINES))
    run(tmp_path, [pdf], text_layer="auto")
    assert page_texts(tmp_path / "out/mixed.pdf.pdf") == [
        (visible, ""),  # its own text, untouched: no second layer
        ("", squeeze(f"page {hashes[1]}")),
        ("", squeeze(f"page {hashes[2]}")),  # the old OCR layer replaced
    ]


def test_only_keeps_every_page_as_it_was(tmp_path: Path, scripted: list[ScriptedRunner]) -> None:
    pdf = mixed_pdf(tmp_path / "mixed.pdf")
    run(tmp_path, [pdf], text_layer="only")
    assert page_texts(tmp_path / "out/mixed.pdf.pdf") == page_texts(pdf)


def test_ignore_redoes_every_page_keeping_visible_text(
    tmp_path: Path, scripted: list[ScriptedRunner]
) -> None:
    pdf = mixed_pdf(tmp_path / "mixed.pdf")
    hashes = [image_hash(page.image.tobytes()) for page in read(pdf)]
    run(tmp_path, [pdf], text_layer="ignore")
    visible = squeeze(" ".join(text for text, *_ in LINES))
    assert page_texts(tmp_path / "out/mixed.pdf.pdf") == [
        (visible, squeeze(f"page {hashes[0]}")),
        ("", squeeze(f"page {hashes[1]}")),
        ("", squeeze(f"page {hashes[2]}")),
    ]


def test_the_transcriber_takes_the_text_layer_too(tmp_path: Path) -> None:
    from kosmos_cli.api import Transcriber

    pdf = mixed_pdf(tmp_path / "mixed.pdf")
    runner = ScriptedRunner()
    results = Transcriber(runner).transcribe([str(pdf)], task="ocr", dpi=DPI)
    assert [result.text_source for result in results] == [
        TextSource.PDF_TEXT,
        TextSource.MODEL,
        TextSource.MODEL,
    ]
    assert results[0].text == "\n".join(text for text, *_ in LINES)
    assert len(runner.seen) == 2  # the model read the two scans only
    ignored = Transcriber(ScriptedRunner()).transcribe([str(pdf)], task="ocr", dpi=DPI, text_layer="ignore")
    assert [result.text_source for result in ignored] == [TextSource.MODEL] * 3
