"""Hostile files and runs (issue 26): one bad file, name, link or signal costs only itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pymupdf
import pytest
from inputs import PdfPage, make_image, make_pdf
from test_nothing_lost import _scripted, _spinning_pdf

from kosmos_cli.values import Document, PageInfo, PageResult, Task
from kosmos_cli.writers.searchable_pdf import PdfWriter

SIGINT_AT_EXIT_ENV = "KOSMOS_TEST_SIGINT_AT_EXIT"  # scripted_kosmos.py's (importing it swaps the model here)


def test_script_removal_skips_an_object_mupdf_cannot_find(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pdf = make_pdf(tmp_path / "a.pdf", pages=[PdfPage(text="Hello")])
    info = PageInfo(Document(str(pdf), "a.pdf"), 0, 1, 612, 792, 72.0, (1.0, 0.0, 0.0, -1.0, 0.0, 792.0))
    results = [PageResult(info, Task.OCR, "Hello")]
    xref_object = pymupdf.Document.xref_object

    def broken(self: pymupdf.Document, xref: int, *args: object, **kwargs: object) -> str:
        if xref == 2:  # as in PyMuPDF's test-2333.pdf: `code=7: cannot find object in xref`
            raise pymupdf.mupdf.FzErrorFormat("code=7: cannot find object in xref (2 0 R)")
        return xref_object(self, xref, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pymupdf.Document, "xref_object", broken)
    built = PdfWriter().render(results, pdf.read_bytes())
    assert built.startswith(b"%PDF-")


def test_a_format_that_cannot_be_built_costs_only_itself(
    scripted: list[object], model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from kosmos_cli import assembly
    from kosmos_cli.cli import app
    from kosmos_cli.errors import InputError

    render_document = assembly.render_document

    def pdf_fails(writer: object, *args: object, **kwargs: object) -> bytes:
        if isinstance(writer, PdfWriter):  # as on PyMuPDF's test-2333.pdf, before the fix above
            raise InputError("cannot build the searchable PDF: code=7: cannot find object in xref")
        return render_document(writer, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(assembly, "render_document", pdf_fails)
    make_pdf(tmp_path / "in" / "a.pdf", pages=[PdfPage(text="Hello"), PdfPage(text="two")])
    make_image(tmp_path / "in" / "b.png")
    out = tmp_path / "out"
    args = [
        "ocr",
        str(tmp_path / "in"),
        "-o",
        str(out),
        "-f",
        "json",
        "-f",
        "txt",
        "-f",
        "pdf",
        "--text-layer",
        "ignore",
    ]
    result = CliRunner().invoke(app, [*args, "--model", str(model_folder), "--page-timeout", "30"])
    assert result.exit_code == 1
    assert result.stderr.count("cannot find object in xref") == 2  # a.pdf's and b.png's, one line each
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "a.pdf.json",
        "a.pdf.txt",
        "b.png.json",
        "b.png.txt",
    ]
    loaded = len(scripted)
    again = CliRunner().invoke(app, [*args, "--model", str(model_folder)])
    assert "3 resumed" in again.stderr, again.stderr
    assert len(scripted) == loaded, "the pages were kept: a rerun needs no model"


def test_an_output_name_too_long_for_the_file_system_fails_that_document_only(
    scripted: list[object], model_folder: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kosmos_cli.cli import app

    long = make_image(tmp_path / "in" / ("n" * 248 + ".png"))  # the name fits; with .png.txt it does not
    make_image(tmp_path / "in" / "short.png")
    result = CliRunner().invoke(
        app, ["ocr", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(model_folder)]
    )
    assert result.exit_code == 1, result.stderr
    assert f"error: `{long}` would be written as `nnnn" in result.stderr
    assert "a name longer than file systems allow (255 bytes a part)" in result.stderr
    assert (tmp_path / "out" / "short.png.txt").exists()


def test_a_link_planted_in_the_output_folder_is_not_followed(
    scripted: list[object], model_folder: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kosmos_cli.cli import app

    make_image(tmp_path / "in" / "sub" / "a.png")
    make_image(tmp_path / "in" / "b.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").symlink_to(outside, target_is_directory=True)
    result = CliRunner().invoke(
        app, ["ocr", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(model_folder)]
    )
    assert result.exit_code == 1
    assert f"would be written through the link `{tmp_path / 'out' / 'sub'}`" in result.stderr
    assert list(outside.iterdir()) == []
    assert (tmp_path / "out" / "b.png.txt").exists()


def test_the_searchable_pdf_copies_a_page_the_reader_could_not_render(
    model_folder: Path, tmp_path: Path
) -> None:
    _spinning_pdf(tmp_path / "spins.pdf", spinning=1)
    command = _scripted(
        model_folder, "ocr", str(tmp_path / "spins.pdf"), "-o", str(tmp_path / "out"), "-f", "pdf"
    )
    done = subprocess.run([*command, "--page-timeout", "5"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr
    assert "spins.pdf` page 2 took longer than 5 s" in done.stderr
    with pymupdf.open(tmp_path / "out" / "spins.pdf.pdf") as built:  # not lost to a second timeout
        assert built.page_count == 2


def test_a_reader_whose_parent_was_killed_prints_nothing(tmp_path: Path) -> None:
    parent = (
        "import os, signal, threading, time\n"
        "from kosmos_cli.sandbox import Sandbox\n"
        "sandbox = Sandbox(timeout=60)\n"
        "sandbox.call(os.getpid)\n"
        "threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()\n"
        "sandbox.call(time.sleep, 1.5)\n"  # the reader answers after its parent is gone
    )
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


def test_ctrl_c_once_the_run_is_over_changes_nothing(model_folder: Path, tmp_path: Path) -> None:
    image = make_image(tmp_path / "page.png")
    command = _scripted(model_folder, "ocr", str(image), "-o", str(tmp_path / "out"))
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, SIGINT_AT_EXIT_ENV: "1"}
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
