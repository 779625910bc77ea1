"""Every input kind works with every format of its task, in a run and through `kosmos convert` (issue 23).

A multi-page TIFF with `-f pdf` once aborted the whole run (MuPDF dropped a page object made before the
next page). The table crosses each kind of input with every format, on the scripted model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pymupdf
import pytest
from inputs import PdfPage, make_animation, make_image, make_pdf, make_tiff

from kosmos_cli.api import convert_files, transcribe_files
from kosmos_cli.testing import ScriptedRunner
from kosmos_cli.values import Document, Task
from kosmos_cli.writers import DocumentWriter, formats_for, get_writer

KINDS: dict[str, tuple[str, Callable[[Path], Path], int]] = {  # name: (file name, maker, pages)
    "png": ("page.png", lambda path: make_image(path), 1),
    "jpeg": ("photo.jpg", lambda path: make_image(path, fmt="JPEG"), 1),
    "bmp": ("scan.bmp", lambda path: make_image(path, fmt="BMP"), 1),
    "webp": ("still.webp", lambda path: make_image(path, fmt="WEBP"), 1),
    "tiff, 3 pages": ("fax.tiff", lambda path: make_tiff(path), 3),
    "gif, 3 frames": ("moving.gif", lambda path: make_animation(path), 1),  # an animation: its first frame
    "webp, 3 frames": ("moving.webp", lambda path: make_animation(path, fmt="WEBP"), 1),
    "pdf, 2 pages": ("report.pdf", lambda path: make_pdf(path, pages=[PdfPage(), PdfPage()]), 2),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("task", [Task.OCR, Task.MD])
def test_every_kind_of_input_gives_every_format(kind: str, task: Task, tmp_path: Path) -> None:
    name, make, pages = KINDS[kind]
    (tmp_path / "in").mkdir()
    source = make(tmp_path / "in" / name)
    out = tmp_path / "out"
    formats = formats_for(task)
    summary = transcribe_files(
        [str(source)], task=task.value, formats=formats, output=str(out), runner=ScriptedRunner()
    )
    assert (summary.documents_done, summary.pages_done, summary.failed) == (1, pages, 0)
    expected = set()
    for writer in (get_writer(format_name, task=task) for format_name in formats):
        document = Document(str(source), name)
        if isinstance(writer, DocumentWriter):
            expected.add(writer.file_name(document))
        else:
            expected |= {writer.file_name(document, index, pages) for index in range(pages)}
    assert {str(path.relative_to(out)) for path in out.rglob("*") if ".kosmos" not in path.parts} == expected
    if "pdf" in formats:
        with pymupdf.open(out / f"{name}.pdf") as pdf:
            assert pdf.page_count == pages
            assert all("page" in page.get_text() for page in pdf), "each page has its text layer"


@pytest.mark.parametrize("kind", KINDS)
def test_convert_remakes_the_searchable_pdf_of_every_kind(kind: str, tmp_path: Path) -> None:
    name, make, _ = KINDS[kind]
    (tmp_path / "in").mkdir()
    source = make(tmp_path / "in" / name)
    run = tmp_path / "run"
    transcribe_files(
        [str(source)], task="ocr", formats=["json", "pdf"], output=str(run), runner=ScriptedRunner()
    )
    again = tmp_path / "again"
    summary = convert_files([str(run / f"{name}.json")], formats=["pdf"], output=str(again))
    assert summary.failed == 0
    assert (again / f"{name}.pdf").read_bytes() == (run / f"{name}.pdf").read_bytes()
