"""Exact outputs through the whole CLI: the real model runs, its token choices are scripted.

`forced.ScriptedModel` wraps the loaded tiny Kosmos-2.5 and, after each real forward pass, overwrites the
last position's logits so that the greedy choice is the next token of a fixed script (a logits
processor by another name). Every row of every batch follows the same script, so what differs
between pages is only what kosmos does with it: each image's own resized size, rescaling, tiling,
PDF geometry and the writers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from forced import forcing
from inputs import PdfPage, make_image, make_pdf
from typer.testing import CliRunner

from kosmos_cli.cli import app
from kosmos_cli.model import loading
from kosmos_cli.tiling import plan_tiles

OCR_SCRIPT = (
    "<bbox><x_10><y_20><x_300><y_60></bbox>Hello world<bbox><x_40><y_80><x_900><y_2000></bbox>Total 12,50"
)
MD_SCRIPT = "# Receipt<br>  Total: 12,50  \n\n\n\n| a | b |"
Kosmos = Callable[..., Any]
Script = Callable[[str], None]
PATCH = 16
MAX_PATCHES = 4096


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Script:
    """Make every runner the CLI loads follow the given raw output."""

    def install(raw: str) -> None:
        monkeypatch.setattr(loading, "load_runner", forcing(loading.load_runner, raw))

    return install


@pytest.fixture
def kosmos(tiny_checkpoint: Path) -> Iterator[Kosmos]:
    cli = CliRunner()

    def invoke(*args: str) -> Any:
        result = cli.invoke(app, [*args, "--model", str(tiny_checkpoint), "--batch-size", "3"])
        assert result.exit_code == 0, result.stderr
        return result

    yield invoke


def resized_size(width: int, height: int) -> tuple[int, int]:
    """The Kosmos-2.5 processor's aspect-preserving resize, written out independently."""
    scale = math.sqrt(MAX_PATCHES * PATCH * PATCH / (width * height))
    rows = max(1, math.floor(scale * height / PATCH))
    cols = max(1, math.floor(scale * width / PATCH))
    return cols * PATCH, rows * PATCH


def expected_boxes(width: int, height: int, *, offset: tuple[int, int] = (0, 0)) -> list[list[int]]:
    """The reference's rescaling of OCR_SCRIPT's two boxes onto an image of this size, clipped."""
    resized_w, resized_h = resized_size(width, height)
    boxes = []
    for x0, y0, x1, y1 in ((10, 20, 300, 60), (40, 80, 900, 2000)):
        box = [  # unilm's int(clip(x / w, 0, 1) * W)
            int(min(x0 / resized_w, 1.0) * width),
            int(min(y0 / resized_h, 1.0) * height),
            int(min(x1 / resized_w, 1.0) * width),
            int(min(y1 / resized_h, 1.0) * height),
        ]
        boxes.append([box[0] + offset[0], box[1] + offset[1], box[2] + offset[0], box[3] + offset[1]])
    return boxes


SIZES = [(640, 480), (480, 640), (1700, 2200), (300, 301), (2000, 500), (97, 1203)]


def test_polygons_are_rescaled_per_image_in_mixed_batches(kosmos: Kosmos, scripted, tmp_path: Path) -> None:
    scripted(OCR_SCRIPT)
    folder = tmp_path / "in"
    folder.mkdir()
    for index, size in enumerate(SIZES):
        make_image(folder / f"p{index}.png", size=size)
    out = tmp_path / "out"
    kosmos("ocr", str(folder), "-o", str(out), "-f", "txt", "-f", "json")
    for index, (width, height) in enumerate(SIZES):
        document = json.loads((out / f"p{index}.png.json").read_text())
        [page] = document["pages"]
        assert (page["width"], page["height"]) == (width, height)
        assert [line["text"] for line in page["lines"]] == ["Hello world", "Total 12,50"]
        assert [line["bbox"] for line in page["lines"]] == expected_boxes(width, height), (width, height)
        for line in page["lines"]:  # every word in its line's box
            x0, y0, x1, y1 = line["bbox"]
            assert [word["text"] for word in line["words"]] == line["text"].split()
            for word in line["words"]:
                wx0, wy0, wx1, wy1 = word["bbox"]
                assert x0 <= wx0 < wx1 <= x1 and y0 <= wy0 < wy1 <= y1, (line, word)
        # The script leaves the model no other token: each was chosen with all the probability.
        assert [(line["confidence"], line["min_confidence"]) for line in page["lines"]] == [(1.0, 1.0)] * 2
        for line in page["lines"]:
            x0, y0, x1, y1 = line["bbox"]
            assert line["polygon"] == [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
        txt = (out / f"p{index}.png.txt").read_text().splitlines()
        first = expected_boxes(width, height)[0]
        assert txt[0] == "{0},{1},{2},{1},{2},{3},{0},{3},Hello world".format(*first)


def test_markdown_is_tidied_and_printed(kosmos: Kosmos, scripted, tmp_path: Path) -> None:
    scripted(MD_SCRIPT)
    png = make_image(tmp_path / "page.png", size=(400, 500))
    result = kosmos("md", str(png))
    assert result.stdout == "# Receipt\nTotal: 12,50\n\n| a | b |\n"


@pytest.mark.parametrize(
    "spec",
    [
        PdfPage(),
        PdfPage(rotate=90),
        PdfPage(width=420, height=595, rotate=270),
        PdfPage(cropbox=(100, 150, 500, 650)),
        PdfPage(origin=(50, 60), rotate=180),
    ],
    ids=["letter", "rotate90", "a5-rotate270", "cropbox", "moved-origin-rotate180"],
)
def test_pdf_pages_get_pixel_and_point_boxes(kosmos: Kosmos, scripted, tmp_path: Path, spec: PdfPage) -> None:
    # One box covering the whole image the model saw: in PDF points it must be the visible page.
    pdf = make_pdf(tmp_path / "page.pdf", pages=[spec])
    out = tmp_path / "out"
    raw = "<bbox><x_0><y_0><x_{w}><y_{h}></bbox>whole page"
    import pymupdf

    with pymupdf.open(pdf) as document:
        rect = document[0].rect  # the visible (cropped, rotated) page, in points
    pixel_w = pixel_h = 0
    for attempt in range(2):  # first learn the render size, then script the full-page box for it
        size = resized_size(pixel_w, pixel_h) if attempt else (16, 16)
        scripted(raw.format(w=size[0], h=size[1]))
        kosmos("ocr", str(pdf), "-o", str(out), "-f", "json", "--overwrite")
        page = json.loads((out / "page.pdf.json").read_text())["pages"][0]
        pixel_w, pixel_h = page["width"], page["height"]
    assert abs(pixel_w / pixel_h - rect.width / rect.height) < 0.01
    [line] = page["lines"]
    assert line["bbox"] == [0, 0, pixel_w, pixel_h]
    x0, y0, x1, y1 = line["pdf_bbox"]
    crop = spec.cropbox or (
        spec.origin[0],
        spec.origin[1],
        spec.origin[0] + spec.width,
        spec.origin[1] + spec.height,
    )
    assert [x0, y0, x1, y1] == pytest.approx(list(crop), abs=0.6)


def test_a_tall_image_is_tiled_and_merged(kosmos: Kosmos, scripted, tmp_path: Path) -> None:
    scripted(OCR_SCRIPT)
    width, height = 400, 6000
    png = make_image(tmp_path / "receipt.png", size=(width, height))
    tiles = plan_tiles(width, height)
    assert len(tiles) > 1
    out = tmp_path / "out"
    kosmos("ocr", str(png), "-o", str(out), "-f", "json")
    lines = json.loads((out / "receipt.png.json").read_text())["pages"][0]["lines"]
    expected = []
    for x0, y0, x1, y1 in tiles:
        expected += expected_boxes(x1 - x0, y1 - y0, offset=(x0, y0))
    got = sorted(line["bbox"] for line in lines)
    assert got == sorted(expected)
    assert all(line["bbox"][3] <= height for line in lines)


def test_drawn_png_has_the_boxes(kosmos: Kosmos, scripted, tmp_path: Path) -> None:
    from PIL import Image

    scripted(OCR_SCRIPT)
    width, height = 640, 480
    png = make_image(tmp_path / "page.png", size=(width, height))
    out = tmp_path / "out"
    kosmos("ocr", str(png), "-o", str(out), "--draw")
    drawn = Image.open(out / "page.png.boxes.png").convert("RGB")
    original = Image.open(png).convert("RGB")
    x0, y0, _, y1 = expected_boxes(width, height)[0]
    middle_y = (y0 + y1) // 2
    assert drawn.getpixel((x0, middle_y)) != original.getpixel((x0, middle_y))  # on the left edge
    inside = (x0 + 5, middle_y)
    assert drawn.getpixel(inside) == original.getpixel(inside)


IMAGE_KINDS = [
    ("png", "png", dict(fmt="PNG")),
    ("exif-rotated", "jpg", dict(fmt="JPEG", orientation=6)),
    ("webp", "webp", dict(fmt="WEBP")),
    ("tiff", "tif", dict(fmt="TIFF")),
    ("bmp", "bmp", dict(fmt="BMP")),
    ("gif", "gif", dict(fmt="GIF", mode="P")),
    ("palette-alpha", "png", dict(fmt="PNG", mode="P", transparent=True)),
    ("gray", "png", dict(fmt="PNG", mode="L")),
    ("gray16", "png", dict(fmt="PNG", mode="I;16")),
    ("rgb16", "png", dict(fmt="PNG", mode="RGB;16")),
    ("alpha", "png", dict(fmt="PNG", mode="RGBA")),
]


@pytest.mark.parametrize(("name", "suffix", "options"), IMAGE_KINDS, ids=[name for name, _, _ in IMAGE_KINDS])
def test_every_image_kind_through_both_commands(
    kosmos: Kosmos, scripted: Script, tmp_path: Path, name: str, suffix: str, options: dict[str, Any]
) -> None:
    # make_image stores the picture so that its EXIF orientation, if any, shows it upright at `size`.
    width, height = size = (300, 200)
    image = make_image(tmp_path / f"{name}.{suffix}", size=size, **options)
    scripted(OCR_SCRIPT)
    ocr = kosmos("ocr", str(image))
    first = expected_boxes(width, height)[0]
    assert ocr.stdout.splitlines()[0] == "{0},{1},{2},{1},{2},{3},{0},{3},Hello world".format(*first)
    scripted(MD_SCRIPT)
    out = tmp_path / "out"
    md = kosmos("md", str(image), "-o", str(out))
    assert md.stdout == ""
    assert (out / f"{name}.{suffix}.md").read_text() == "# Receipt\nTotal: 12,50\n\n| a | b |\n"
