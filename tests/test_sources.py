"""Inputs to pages: page ranges, discovery and naming, image conversion, PDF rendering, broken inputs."""

from __future__ import annotations

import io
import math
import os
import sys
import threading
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from inputs import (
    DEFAULT_SIZE,
    MIXED_PAGES,
    QUADRANTS,
    PdfPage,
    make_animation,
    make_bomb,
    make_corrupt,
    make_empty,
    make_image,
    make_pdf,
    make_text,
    make_tiff,
    make_truncated,
    make_unreadable,
    quadrant_points,
    sample_image,
)
from PIL import Image, ImageOps
from recorder import Recorder

from kosmos_cli import discovery, rasterize
from kosmos_cli.config import Job
from kosmos_cli.discovery import discover
from kosmos_cli.errors import InputError, UsageError
from kosmos_cli.jobs import Pages, probe
from kosmos_cli.pages import parse_pages
from kosmos_cli.rasterize import (
    MAX_PAGE_PIXELS,
    PageError,
    count_pages,
    iter_pages,
    page_pixels,
    read_source,
)
from kosmos_cli.reporting import Summary
from kosmos_cli.sandbox import Sandbox
from kosmos_cli.tiling import MODEL_PIXELS
from kosmos_cli.values import Document, Page, Task

Color = tuple[int, int, int]
GRAYS: tuple[Color, ...] = ((0, 0, 0), (76, 76, 76), (150, 150, 150), (255, 255, 255))  # ITU-R 601 luma
BILEVEL: tuple[Color, ...] = ((0, 0, 0), (0, 0, 0), (255, 255, 255), (255, 255, 255))


def _doc(path: Path) -> Document:
    return Document(str(path), path.stem)


def _pages(document: Document, **options: object) -> list[Page]:
    pages = []
    for item in iter_pages(document, **options):  # type: ignore[arg-type]
        assert isinstance(item, Page), item
        pages.append(item)
    return pages


def _only_page(path: Path, **options: object) -> Page:
    (page,) = _pages(_doc(path), **options)
    return page


def _assert_quadrants(image: Image.Image, expected: tuple[Color, ...], tolerance: int) -> None:
    assert image.mode == "RGB"
    for point, want in zip(quadrant_points(size=image.size), expected, strict=True):
        got = image.getpixel(point)
        assert isinstance(got, tuple)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= tolerance, (point, got, want)


def _read_error(path: Path, **options: object) -> InputError:
    with pytest.raises(InputError) as caught:
        list(iter_pages(_doc(path), **options))  # type: ignore[arg-type]
    return caught.value


def _dark_box(image: Image.Image) -> tuple[int, int, int, int]:
    """Return the pixel box around the dark pixels of a render."""
    box = ImageOps.invert(image.convert("L")).point(lambda value: 255 if value > 128 else 0).getbbox()
    assert box is not None
    return box


def _to_pdf(matrix: tuple[float, ...] | None, x: float, y: float) -> tuple[float, float]:
    assert matrix is not None
    a, b, c, d, e, f = matrix
    return a * x + c * y + e, b * x + d * y + f


# --- page selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "count", "expected"),
    [
        ("1", 5, [0]),
        ("1-3,7", 10, [0, 1, 2, 6]),
        ("10-", 12, [9, 10, 11]),
        ("-2", 5, [0, 1]),
        (" 2 - 3 , 5 ", 5, [1, 2, 4]),
        ("3,1-2", 5, [0, 1, 2]),
        ("1-3,2-4", 5, [0, 1, 2, 3]),
        ("5-5", 5, [4]),
        ("1-", 1, [0]),
    ],
)
def test_parse_pages_selects_zero_based_indices(spec: str, count: int, expected: list[int]) -> None:
    assert parse_pages(spec).indices(count) == expected


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "--pages is empty"),
        ("  ", "--pages is empty"),
        ("0", "pages are numbered from 1"),
        ("0-2", "pages are numbered from 1"),
        ("3-1", "the range `3-1` runs backwards"),
        ("a", "`a` is not a page number or range"),
        ("1,,2", "an empty range"),
        ("1,", "an empty range"),
        ("-", "`-` is not a page number or range"),
        ("1-2-3", "`1-2-3` is not a page number or range"),
        ("+1", "`+1` is not a page number or range"),
        ("1.5", "`1.5` is not a page number or range"),
        ("1 2", "`1 2` is not a page number or range"),
    ],
)
def test_parse_pages_rejects_bad_specs_with_a_hint(spec: str, problem: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_pages(spec)
    assert problem in caught.value.message
    assert caught.value.hint is not None and "1-3,7,10-" in caught.value.hint


@pytest.mark.parametrize(
    ("spec", "count", "expected"),
    [
        ("7", 5, []),
        ("3-9", 5, [2, 3, 4]),  # a range past the end selects what exists
        ("10-", 5, []),
        ("2-", 1, []),
        ("1-3", 1, [0]),
        ("1,4-,9", 5, [0, 3, 4]),
    ],
)
def test_pages_beyond_a_document_select_what_it_has(spec: str, count: int, expected: list[int]) -> None:
    assert parse_pages(spec).indices(count) == expected


@pytest.mark.parametrize("spec", ["1", "1-3,7", "10-", "2-5,9-"])
def test_a_selection_reads_back_as_it_was_written(spec: str) -> None:
    assert str(parse_pages(spec)) == spec


def test_a_document_with_no_selected_page_is_skipped_with_a_warning(tmp_path: Path) -> None:
    two = make_pdf(tmp_path / "two.pdf", pages=[PdfPage(), PdfPage()])
    four = make_pdf(tmp_path / "four.pdf", pages=[PdfPage()] * 4)
    job = Job(task=Task.MD, formats=("md",), pages=parse_pages("3-"))
    recorder, summary = Recorder(), Summary()
    with Sandbox() as sandbox:
        found = probe([_doc(two), _doc(four)], job, recorder, summary, sandbox=sandbox)
    assert list(found.values()) == [Pages(4, (2, 3))]
    assert recorder.warnings == [f"`{two}` has 2 pages: --pages 3- selects none of them; skipped"]
    assert (summary.documents_failed, summary.documents_unselected) == (0, 1)


def test_a_selection_that_leaves_no_page_of_any_input_is_a_usage_error(tmp_path: Path) -> None:
    two = make_pdf(tmp_path / "two.pdf", pages=[PdfPage(), PdfPage()])
    job = Job(task=Task.MD, formats=("md",), pages=parse_pages("3"))
    with Sandbox() as sandbox, pytest.raises(UsageError) as caught:
        probe([_doc(two)], job, Recorder(), Summary(), sandbox=sandbox)
    assert caught.value.message == "--pages 3 selects no page of any input"


def test_a_document_with_fewer_pages_than_counted_is_an_input_error(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "two.pdf", pages=[PdfPage(), PdfPage()])
    error = _read_error(pdf, page_indices=[0, 2])
    assert error.message == f"`{pdf}` has 2 pages now; it changed since it was counted"
    assert not isinstance(error, PageError)


# --- discovery --------------------------------------------------------------------------------------


def _names(discovery: discovery.Discovery) -> list[str]:
    return [document.name for document in discovery.documents]


def test_discover_walks_folders_sorted_skipping_hidden_and_listing_unsupported(tmp_path: Path) -> None:
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    (root / "sub").mkdir()
    (root / ".git").mkdir()
    make_pdf(root / "a" / "b.pdf")
    make_image(root / "a" / "c.png")
    make_image(root / "z.jpg", fmt="JPEG")
    make_image(root / ".hidden.png")
    make_image(root / ".git" / "x.png")
    make_image(root / "README")  # no suffix, PNG content: found by sniffing
    make_empty(root / "sub" / "empty.png")  # found by its suffix, fails later with a clear error
    make_text(root / "notes.txt")
    make_text(root / "BMW report.txt", text="BM: starts like a bitmap, is not one")

    found = discover([str(root)])

    assert _names(found) == ["README", "a/b.pdf", "a/c.png", "sub/empty.png", "z.jpg"]
    assert [document.path for document in found.documents] == [
        str(root / "README"),
        str(root / "a" / "b.pdf"),
        str(root / "a" / "c.png"),
        str(root / "sub" / "empty.png"),
        str(root / "z.jpg"),
    ]
    assert found.unsupported == [str(root / "BMW report.txt"), str(root / "notes.txt")]
    assert found.errors == []


@pytest.mark.parametrize(
    ("files", "arguments", "expected"),
    [
        # Same stem, other format, one folder: the suffix always stays.
        (["in/a.png", "in/a.pdf", "in/b.png"], ["in"], ["a.pdf", "a.png", "b.png"]),
        # Same file name in two folders given as files: the path below their common folder.
        (["x/a.pdf", "y/a.pdf"], ["x/a.pdf", "y/a.pdf"], ["x/a.pdf", "y/a.pdf"]),
        (["x/a.pdf", "y/a.png"], ["x/a.pdf", "y/a.png"], ["x/a.pdf", "y/a.png"]),
        # Two folders with the same tree: each mirrored below itself, so they share names, which
        # `name_clashes` refuses where outputs are written (--root names them apart).
        (["one/s/p.png", "two/s/p.png"], ["one", "two"], ["s/p.png", "s/p.png"]),
        # Names differing only in case are kept; `name_clashes` refuses them where outputs are written.
        (["in/A.png", "in/a.png"], ["in"], ["A.png", "a.png"]),
        # A folder and a file beside it: the folder's files below it, the file by its path.
        (["in/a/b.pdf", "c.png"], ["in", "c.png"], ["a/b.pdf", "c.png"]),
        (["in/a/b.pdf", "in/c.png"], ["in/a/b.pdf", "in/c.png"], ["in/a/b.pdf", "in/c.png"]),
    ],
)
def test_discover_names_are_unique(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    files: list[str],
    arguments: list[str],
    expected: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in files:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image(path)
    assert _names(discover(arguments)) == expected


def test_discover_reads_a_file_reached_twice_once(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    make_image(tmp_path / "in" / "a.png")
    found = discover(
        [str(tmp_path / "in" / "a.png"), str(tmp_path / "in"), str(tmp_path / "in" / "." / "a.png")]
    )
    assert _names(found) == ["a.png"]


def test_discover_survives_a_folder_link_loop(tmp_path: Path) -> None:
    root = tmp_path / "in"
    root.mkdir()
    make_image(root / "a.png")
    (root / "loop").symlink_to(root, target_is_directory=True)
    assert _names(discover([str(root)])) == ["a.png"]


def test_discover_expands_quoted_globs_and_reports_misses(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    for name in ("b.pdf", "a.pdf", ".c.pdf"):
        make_pdf(scans / name)
    make_image(scans / "d.png")
    found = discover([str(scans / "*.pdf"), str(scans / "*.tif")])
    assert _names(found) == ["a.pdf", "b.pdf"]
    assert [error.message for error in found.errors] == [f"no files match `{scans / '*.tif'}`"]


def test_discover_reports_missing_paths_and_broken_links(tmp_path: Path) -> None:
    (tmp_path / "dangling.pdf").symlink_to(tmp_path / "gone.pdf")
    found = discover([str(tmp_path / "nope.pdf"), str(tmp_path / "dangling.pdf")])
    assert found.documents == []
    assert [error.message for error in found.errors] == [
        f"`{tmp_path / 'nope.pdf'}` does not exist",
        f"`{tmp_path / 'dangling.pdf'}` is a broken symbolic link",
    ]


def test_discover_takes_explicit_files_whatever_they_hold(tmp_path: Path) -> None:
    make_text(tmp_path / "notes.txt")
    make_image(tmp_path / ".hidden.png")
    found = discover([str(tmp_path / "notes.txt"), str(tmp_path / ".hidden.png")])
    assert _names(found) == ["notes.txt", ".hidden.png"]
    assert found.unsupported == []
    assert _read_error(tmp_path / "notes.txt").message == f"`{tmp_path / 'notes.txt'}` is not an image or PDF"


def test_discover_reads_a_list_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_image(tmp_path / "a.png")
    (tmp_path / "docs").mkdir()
    make_pdf(tmp_path / "docs" / "b.pdf")
    listing = "\ufeff# scans to do\n\na.png\n  docs  \r\n# done: old.png\nmissing.png\n-\n"
    (tmp_path / "list.txt").write_text(listing, encoding="utf-8")
    found = discover([], from_list="list.txt")
    assert _names(found) == ["a.png", "b.pdf"]  # a folder listed is mirrored below itself
    assert [error.message for error in found.errors] == ["`missing.png` does not exist", "`-` does not exist"]


def test_discover_reads_the_list_from_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_image(tmp_path / "a.png")
    _feed_stdin(monkeypatch, f"{tmp_path / 'a.png'}\n".encode())
    assert _names(discover([], from_list="-")) == ["a.png"]


def test_discover_rejects_an_unreadable_list(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        discover([], from_list=str(tmp_path / "none.txt"))
    assert caught.value.message.startswith(f"cannot read --from-list `{tmp_path / 'none.txt'}`")


def _feed_stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_discover_spools_stdin_to_a_file_read_like_any_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    png = make_image(tmp_path / "a.png").read_bytes()
    _feed_stdin(monkeypatch, png)
    (document,) = discover(["-"]).documents
    assert (document.name, document.label, document.display_name) == ("stdin", "<stdin>", "<stdin>")
    assert Path(document.path).read_bytes() == png
    _assert_quadrants(_pages(document)[0].image, QUADRANTS, tolerance=0)


def test_discover_spooled_stdin_names_itself_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    _feed_stdin(monkeypatch, b"")
    (document,) = discover(["-"]).documents
    with pytest.raises(InputError) as caught:
        count_pages(document)
    assert caught.value.message == "`<stdin>` is empty (0 bytes)"


@pytest.mark.parametrize(
    ("inputs", "from_list", "message"),
    [
        (["-", "-"], None, "`-` is given twice, but stdin can be read only once"),
        (["-"], "-", "stdin cannot carry both a document (`-`) and --from-list -"),
    ],
)
def test_discover_reads_stdin_once(
    monkeypatch: pytest.MonkeyPatch, inputs: list[str], from_list: str | None, message: str
) -> None:
    _feed_stdin(monkeypatch, b"\x89PNG\r\n\x1a\n")
    with pytest.raises(UsageError) as caught:
        discover(inputs, from_list=from_list)
    assert caught.value.message == message


def test_discover_refuses_to_read_a_document_from_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    _feed_stdin(monkeypatch, b"")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    with pytest.raises(UsageError) as caught:
        discover(["-"])
    assert caught.value.hint == "pipe a file in, e.g. `kosmos md - < scan.pdf`"


def test_discover_spools_a_named_pipe(tmp_path: Path) -> None:
    png = make_image(tmp_path / "a.png").read_bytes()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(png,), daemon=True)  # blocks until read
    writer.start()
    (document,) = discover([str(fifo)]).documents
    writer.join(timeout=10)
    assert (document.name, document.label) == ("pipe", str(fifo))
    assert document.path != str(fifo) and Path(document.path).read_bytes() == png


# --- images -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode", "transparent", "expected", "tolerance"),
    [
        ("PNG", "RGB", False, QUADRANTS, 0),
        ("PNG", "L", False, GRAYS, 0),
        ("PNG", "1", False, BILEVEL, 0),
        ("PNG", "P", False, QUADRANTS, 0),
        ("PNG", "P", True, QUADRANTS, 0),
        ("PNG", "RGBA", False, QUADRANTS, 0),
        ("PNG", "LA", False, GRAYS, 0),
        ("PNG", "I;16", False, GRAYS, 0),
        ("PNG", "RGB;16", False, QUADRANTS, 0),
        ("TIFF", "I;16", False, GRAYS, 0),
        ("TIFF", "I", False, GRAYS, 0),
        ("TIFF", "CMYK", False, QUADRANTS, 0),
        ("TIFF", "RGBA", False, QUADRANTS, 0),
        ("JPEG", "RGB", False, QUADRANTS, 12),
        ("JPEG", "L", False, GRAYS, 12),
        ("JPEG", "CMYK", False, QUADRANTS, 12),
        ("WEBP", "RGB", False, QUADRANTS, 0),
        ("WEBP", "RGBA", False, QUADRANTS, 0),
        ("BMP", "RGB", False, QUADRANTS, 0),
        ("BMP", "L", False, GRAYS, 0),
        ("BMP", "P", False, QUADRANTS, 0),
        ("GIF", "P", False, QUADRANTS, 0),
        ("GIF", "P", True, QUADRANTS, 0),
    ],
)
def test_images_become_rgb_with_depth_scaled_and_transparency_on_white(
    tmp_path: Path, fmt: str, mode: str, transparent: bool, expected: tuple[Color, ...], tolerance: int
) -> None:
    path = make_image(tmp_path / "image", fmt=fmt, mode=mode, transparent=transparent)
    page = _only_page(path)
    _assert_quadrants(page.image, expected, tolerance)
    assert page.image.size == DEFAULT_SIZE
    info = page.info
    assert (info.page_index, info.page_count, info.width, info.height) == (0, 1, *DEFAULT_SIZE)
    assert (info.dpi, info.pixel_to_pdf) == (None, None)
    assert count_pages(_doc(path)) == 1


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_images_are_turned_upright_by_their_exif_orientation(
    tmp_path: Path, fmt: str, orientation: int
) -> None:
    path = make_image(tmp_path / "photo", fmt=fmt, orientation=orientation)
    stored = Image.open(path).size
    assert stored == (DEFAULT_SIZE if orientation < 5 else DEFAULT_SIZE[::-1])
    page = _only_page(path)
    assert page.image.size == DEFAULT_SIZE
    _assert_quadrants(page.image, QUADRANTS, tolerance=12 if fmt == "JPEG" else 0)


def test_every_tiff_frame_is_a_page(tmp_path: Path) -> None:
    sizes = [(96, 64), (64, 96), (40, 40)]
    path = make_tiff(tmp_path / "scan.tif", sizes=sizes)
    pages = _pages(_doc(path))
    assert count_pages(_doc(path)) == 3
    assert [page.image.size for page in pages] == sizes
    assert [(page.info.page_index, page.info.page_count) for page in pages] == [(0, 3), (1, 3), (2, 3)]
    for page in pages:
        _assert_quadrants(page.image, QUADRANTS, tolerance=0)
    selected = _pages(_doc(path), page_indices=parse_pages("3,1").indices(3))
    assert [page.info.page_index for page in selected] == [0, 2]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame_only(tmp_path: Path, fmt: str) -> None:
    path = make_animation(tmp_path / "anim", fmt=fmt)
    assert getattr(Image.open(path), "n_frames", 1) == 3
    page = _only_page(path)
    assert page.info.page_count == 1
    _assert_quadrants(page.image, QUADRANTS, tolerance=0)


def test_a_misnamed_image_is_read_by_its_content(tmp_path: Path) -> None:
    page = _only_page(make_image(tmp_path / "scan.pdf", fmt="PNG"))
    _assert_quadrants(page.image, QUADRANTS, tolerance=0)
    assert page.info.dpi is None


def test_a_misnamed_pdf_is_read_by_its_content(tmp_path: Path) -> None:
    page = _only_page(make_pdf(tmp_path / "scan.png"))
    assert page.info.dpi is not None and page.info.pixel_to_pdf is not None


def test_comic_book_archives_are_read_page_by_page(tmp_path: Path) -> None:
    path = tmp_path / "comic.cbz"
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("01.png", "02.png"):
            buffer = io.BytesIO()
            sample_image().save(buffer, format="PNG")
            archive.writestr(name, buffer.getvalue())
    pages = _pages(_doc(path))
    assert [page.info.page_count for page in pages] == [2, 2]
    assert all(page.info.pixel_to_pdf is None and page.info.dpi is not None for page in pages)


def test_a_plain_zip_in_a_folder_is_unsupported(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as archive:
        archive.writestr("a.png", b"")
    assert discover([str(tmp_path)]).unsupported == [str(tmp_path / "photos.zip")]


# --- PDF rendering ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height"),
    [(612, 792), (595, 842), (420, 595), (72, 72), (14400, 14400), (200, 10000), (3000, 100)],
)
def test_pdf_pages_render_just_above_the_models_size(tmp_path: Path, width: float, height: float) -> None:
    page = _only_page(make_pdf(tmp_path / "p.pdf", pages=[PdfPage(width=width, height=height)]))
    pixels = page.info.width * page.info.height
    assert MODEL_PIXELS <= pixels <= MODEL_PIXELS * 1.01
    assert page.image.size == (page.info.width, page.info.height)
    assert page.info.dpi == pytest.approx(72 * page.info.width / width, rel=0.01)
    # The model's processor scales the page by this to fit 4096 patches: never above 1.
    assert math.sqrt(MODEL_PIXELS / pixels) <= 1


@pytest.mark.parametrize(("dpi", "size"), [(72, (612, 792)), (150, (1275, 1650)), (100.5, (855, 1106))])
def test_pdf_dpi_overrides_the_render_size(tmp_path: Path, dpi: float, size: tuple[int, int]) -> None:
    page = _only_page(make_pdf(tmp_path / "p.pdf"), dpi=dpi)
    assert (page.image.size, page.info.dpi) == (size, dpi)


def test_mixed_pdf_pages_render_as_a_viewer_shows_them(tmp_path: Path) -> None:
    document = _doc(make_pdf(tmp_path / "mixed.pdf", pages=MIXED_PAGES))
    pages = _pages(document)
    assert count_pages(document) == len(MIXED_PAGES) == len(pages)
    portrait = [page.info.width < page.info.height for page in pages]
    assert portrait == [True, True, False, False, True, True]  # /Rotate 90 and 270 turn pages landscape
    blank = pages[0].image.crop((0, pages[0].image.height // 2, pages[0].image.width, pages[0].image.height))
    assert blank.getextrema() == ((255, 255), (255, 255), (255, 255))  # no alpha: empty paper is white
    _assert_quadrants(pages[5].image, QUADRANTS, tolerance=8)  # the scanned page shows its image


@pytest.mark.parametrize("rotate", [0, 90, 180, 270])
@pytest.mark.parametrize("cropbox", [None, (100.0, 150.0, 500.0, 650.0)])
@pytest.mark.parametrize("origin", [(0.0, 0.0), (50.0, -30.0)])
def test_pixel_to_pdf_maps_a_rendered_box_back_to_its_pdf_coordinates(
    tmp_path: Path,
    rotate: int,
    cropbox: tuple[float, float, float, float] | None,
    origin: tuple[float, float],
) -> None:
    ox, oy = origin
    box = (150 + ox, 400 + oy, 350 + ox, 520 + oy)
    crop = None if cropbox is None else (cropbox[0] + ox, cropbox[1] + oy, cropbox[2] + ox, cropbox[3] + oy)
    spec = PdfPage(origin=origin, rotate=rotate, cropbox=crop, box=box)
    page = _only_page(make_pdf(tmp_path / "box.pdf", pages=[spec]))
    x0, y0, x1, y1 = _dark_box(page.image)
    corners = [_to_pdf(page.info.pixel_to_pdf, x, y) for x in (x0, x1) for y in (y0, y1)]
    found = (
        min(x for x, _ in corners),
        min(y for _, y in corners),
        max(x for x, _ in corners),
        max(y for _, y in corners),
    )
    assert found == pytest.approx(box, abs=1.0)
    # A viewer turns the page clockwise: the top-left pixel is this corner of the visible box.
    left, bottom, right, top = crop or (ox, oy, ox + spec.width, oy + spec.height)
    top_left = {0: (left, top), 90: (left, bottom), 180: (right, bottom), 270: (right, top)}[rotate]
    # MuPDF keeps matrices in float32.
    assert _to_pdf(page.info.pixel_to_pdf, 0, 0) == pytest.approx(top_left, abs=1e-3)


def test_page_pixels_from_the_bytes_read_are_the_pixels_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    documents = [
        _doc(make_pdf(tmp_path / "mixed.pdf", pages=MIXED_PAGES)),
        _doc(make_tiff(tmp_path / "scan.tif")),
        _doc(make_image(tmp_path / "photo.jpg", fmt="JPEG", orientation=6)),
        _doc(make_image(tmp_path / "alpha.png", mode="RGBA")),
    ]
    _feed_stdin(monkeypatch, make_pdf(tmp_path / "in.pdf", password="pw").read_bytes())
    documents += discover(["-"]).documents
    for document in documents:
        data = read_source(document)
        for page in _pages(document, password="pw"):
            again = page_pixels(page.info, data, password="pw")
            assert (again.size, again.tobytes()) == (page.image.size, page.image.tobytes()), page.info


def test_page_pixels_notice_bytes_of_another_page(tmp_path: Path) -> None:
    path = make_image(tmp_path / "a.png")
    (page,) = _pages(_doc(path))
    other = make_image(tmp_path / "b.png", size=(10, 10)).read_bytes()
    with pytest.raises(InputError, match=r"page 1 differs from the one read"):
        page_pixels(page.info, other)


# --- encrypted PDFs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("password", "message", "hint"),
    [
        (None, "is encrypted", "pass --password"),
        ("wrong", "is encrypted and --password does not open it", "check the password"),
    ],
)
def test_encrypted_pdfs_need_their_password(
    tmp_path: Path, password: str | None, message: str, hint: str
) -> None:
    path = make_pdf(tmp_path / "secret.pdf", pages=[PdfPage(), PdfPage()], password="open sesame")
    with pytest.raises(InputError) as caught:
        count_pages(_doc(path), password=password)
    assert (caught.value.message, caught.value.hint) == (f"`{path}` {message}", hint)
    error = _read_error(path, password=password)
    assert (error.message, error.hint) == (f"`{path}` {message}", hint)


def test_encrypted_pdfs_open_with_their_password(tmp_path: Path) -> None:
    path = make_pdf(tmp_path / "secret.pdf", pages=[PdfPage(), PdfPage()], password="open sesame")
    assert count_pages(_doc(path), password="open sesame") == 2
    assert len(_pages(_doc(path), password="open sesame")) == 2


# --- broken inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "build", "problem"),
    [
        ("empty.png", make_empty, "is empty (0 bytes)"),
        ("cut.png", partial(make_truncated, fmt="PNG"), "cannot be decoded as PNG: image file is truncated"),
        (
            "cut.jpg",
            partial(make_truncated, fmt="JPEG"),
            "cannot be decoded as JPEG: image file is truncated",
        ),
        (
            "cut.tif",
            partial(make_truncated, fmt="TIFF"),
            "cannot be decoded as TIFF: image file is truncated",
        ),
        ("cut.gif", partial(make_truncated, fmt="GIF"), "cannot be decoded as GIF: image file is truncated"),
        ("cut.pdf", partial(make_truncated, fmt="PDF"), "is truncated: it ends before its %%EOF marker"),
        ("bad.png", partial(make_corrupt, fmt="PNG"), "cannot be decoded as PNG: its header is damaged"),
        ("bad.pdf", partial(make_corrupt, fmt="PDF"), "cannot be opened as PDF: it is damaged beyond repair"),
        ("text.pdf", make_text, "does not contain PDF data (damaged, truncated or misnamed)"),
        ("text.png", make_text, "does not contain PNG data (damaged, truncated or misnamed)"),
        ("notes.txt", make_text, "is not an image or PDF"),
        ("bomb.png", make_bomb, "is larger than 178,956,970 pixels, too large to read safely"),
        ("folder", Path.mkdir, "is a folder, not a file"),
        ("gone.pdf", None, "does not exist (was it moved or deleted?)"),
    ],
)
def test_broken_inputs_fail_with_one_clear_line(
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    name: str,
    build: Callable[[Path], object] | None,
    problem: str,
) -> None:
    path = tmp_path / name
    if build is not None:
        build(path)
    error = _read_error(path)
    assert error.message.startswith(f"`{path}` {problem}"), error.message
    assert "\n" not in error.message
    assert capfd.readouterr() == ("", "")  # nothing from PIL or MuPDF on the terminal


def test_a_file_that_vanishes_after_discovery_is_an_input_error(tmp_path: Path) -> None:
    path = make_pdf(tmp_path / "a.pdf")
    (document,) = discover([str(path)]).documents
    path.unlink()
    with pytest.raises(InputError, match="does not exist"):
        count_pages(document)


def test_an_unreadable_file_is_an_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_pdf(tmp_path / "locked.pdf")
    if not make_unreadable(path):  # root reads anything: make this module's open() refuse instead

        def refuse(name: object, *args: object, **kwargs: object) -> object:
            if str(name) == str(path):
                raise PermissionError(13, "Permission denied", str(name))
            return open(name, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(rasterize, "open", refuse, raising=False)
    error = _read_error(path)
    assert error.message == f"cannot read `{path}`: permission denied"
    assert error.hint == "check the file's permissions"


def test_a_failing_page_is_yielded_in_place_and_the_rest_go_on(tmp_path: Path) -> None:
    huge = PdfPage(width=14400, height=14400)
    path = make_pdf(tmp_path / "mixed.pdf", pages=[PdfPage(), huge, PdfPage()])
    document = _doc(path)
    items = list(iter_pages(document, dpi=300))
    assert [type(item) for item in items] == [Page, PageError, Page]
    error = items[1]
    assert isinstance(error, PageError) and isinstance(error, InputError)
    assert (error.document, error.page_index, error.page_count) == (document, 1, 3)
    assert error.message == f"`{path}` page 2 would render at 60000x60000 pixels at 300 dpi, too large"
    assert error.hint is not None and "lower --dpi" in error.hint
    assert [item.info.page_index for item in items if isinstance(item, Page)] == [0, 2]


def test_the_only_page_failing_fails_the_document(tmp_path: Path) -> None:
    path = make_pdf(tmp_path / "poster.pdf", pages=[PdfPage(width=14400, height=14400)])
    error = _read_error(path, dpi=300)
    assert isinstance(error, PageError)
    assert error.message.startswith(f"`{path}` would render at 60000x60000 pixels")
    assert MAX_PAGE_PIXELS < 60000 * 60000


def _break_tiff_frame(path: Path, *, frame: int) -> None:
    """Point one frame's pixel data past the end of the file, leaving the other frames intact."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"II*\x00"
    ifd = int.from_bytes(data[4:8], "little")
    for _ in range(frame):
        entries = int.from_bytes(data[ifd : ifd + 2], "little")
        ifd = int.from_bytes(data[ifd + 2 + 12 * entries : ifd + 6 + 12 * entries], "little")
    for entry in range(int.from_bytes(data[ifd : ifd + 2], "little")):
        at = ifd + 2 + 12 * entry
        if int.from_bytes(data[at : at + 2], "little") == 273:  # StripOffsets, one strip: stored inline
            data[at + 8 : at + 12] = (len(data) + 4096).to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_a_damaged_tiff_frame_fails_alone(tmp_path: Path) -> None:
    path = make_tiff(tmp_path / "scan.tif")
    _break_tiff_frame(path, frame=1)
    items = list(iter_pages(_doc(path)))
    assert [type(item) for item in items] == [Page, PageError, Page]
    error = items[1]
    assert isinstance(error, PageError) and error.page_index == 1
    assert error.message.startswith(f"`{path}` page 2 cannot be decoded as TIFF")
    assert count_pages(_doc(path)) == 3
