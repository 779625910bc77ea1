"""PDFs, folders and pipelines end to end through the CLI, on the scripted model.

The model is not the subject here (`ScriptedRunner` answers each page with a hash of its pixels);
one test makes the tiny real model itself fail on a page, to see its error and hint reach the user.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from inputs import (
    MIXED_PAGES,
    PdfPage,
    make_bomb,
    make_corrupt,
    make_empty,
    make_image,
    make_pdf,
    make_text,
    make_tiff,
    make_truncated,
)
from typer.testing import CliRunner, Result

from kosmos_cli import discovery
from kosmos_cli.assembly import Assembly
from kosmos_cli.cli import app
from kosmos_cli.manifest import progress_name
from kosmos_cli.testing import ScriptedRunner
from kosmos_cli.values import Document, Task

SCRIPTED_KOSMOS = Path(__file__).with_name("scripted_kosmos.py")

Kosmos = Callable[..., Result]
TOKENS = "6"  # new tokens per page: enough to make distinct outputs, few enough to be quick


@pytest.fixture
def kosmos(scripted: list[ScriptedRunner], model_folder: Path) -> Kosmos:
    """Run the CLI in-process with the scripted model."""
    runner = CliRunner()

    def invoke(*args: str, input: bytes | None = None) -> Result:
        return runner.invoke(app, [*args, "--model", str(model_folder)], input=input)

    return invoke


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A folder of scans: nested PDFs, images, an unsupported file and a hidden one."""
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    make_pdf(root / "a" / "report.pdf", pages=MIXED_PAGES[:3])
    make_image(root / "a" / "b" / "photo.jpg", fmt="JPEG", orientation=6)
    make_image(root / "scan.png", size=(120, 90))
    make_tiff(root / "fax.tif")
    make_text(root / "notes.txt")
    make_image(root / ".hidden.png")
    return root


def _json(path: Path) -> dict[str, object]:
    return json.loads(path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_folder_tree_is_mirrored(kosmos: Kosmos, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = kosmos("ocr", str(tree), "-o", str(out), "-f", "txt", "-f", "json")
    assert result.exit_code == 0, result.stderr
    written = sorted(
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and ".kosmos" not in p.parts
    )
    assert written == [
        "a/b/photo.jpg.json", "a/b/photo.jpg.txt", "a/report.pdf.json", "a/report.pdf.txt",
        "fax.tif.json", "fax.tif.txt", "scan.png.json", "scan.png.txt",
    ]  # fmt: skip
    assert result.stdout == ""
    assert "4 done, 0 skipped (done before), 0 failed; 8 pages" in result.stderr
    assert "1 unsupported files ignored" in result.stderr
    report = _json(out / "a" / "report.pdf.json")
    pages = report["pages"]
    assert isinstance(pages, list)
    assert [p["page_number"] for p in pages] == [1, 2, 3]
    letter, a4, rotated = pages
    assert letter["width"] < letter["height"] and a4["width"] < a4["height"]
    assert rotated["width"] > rotated["height"], "a /Rotate 90 page renders landscape"
    photo = _json(out / "a" / "b" / "photo.jpg.json")["pages"][0]  # type: ignore[index]
    assert (photo["width"], photo["height"]) == (96, 64), "EXIF orientation 6 is applied"
    assert len(_json(out / "fax.tif.json")["pages"]) == 3  # type: ignore[arg-type]


def test_stdout_separates_documents_and_keeps_input_order(kosmos: Kosmos, tmp_path: Path) -> None:
    first = make_image(tmp_path / "first.png", size=(80, 60))
    second = make_pdf(tmp_path / "second.pdf", pages=MIXED_PAGES[:2])
    result = kosmos("md", str(second), str(first))
    assert result.exit_code == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("<!-- kosmos: document")]
    assert headers == [f"<!-- kosmos: document {second} -->", f"<!-- kosmos: document {first} -->"]
    second_part = result.stdout.split(headers[1])[0]
    assert second_part.count("<!-- kosmos: page 1") == 1 and second_part.count("<!-- kosmos: page 2") == 1


def test_pages_select_per_document(kosmos: Kosmos, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "six.pdf", pages=MIXED_PAGES)
    out = tmp_path / "out"
    result = kosmos("ocr", str(pdf), "-o", str(out), "-f", "json", "--pages", "2,5-")
    assert result.exit_code == 0, result.stderr
    pages = _json(out / "six.pdf.json")["pages"]
    assert [p["page_number"] for p in pages] == [2, 5, 6]  # type: ignore[union-attr]


def test_pages_past_a_document_s_end_skip_it_with_a_warning(kosmos: Kosmos, tmp_path: Path) -> None:
    short = make_pdf(tmp_path / "short.pdf", pages=MIXED_PAGES[:2])
    long = make_pdf(tmp_path / "long.pdf", pages=MIXED_PAGES[:4])
    out = tmp_path / "out"
    result = kosmos("md", str(short), str(long), "-o", str(out), "--pages", "2-4")
    assert result.exit_code == 0, result.stderr
    assert [p["page_number"] for p in _json_of(kosmos, short, long, tmp_path)] == [2]
    result = kosmos("md", str(short), str(long), "-o", str(out / "4"), "--pages", "4")
    assert result.exit_code == 0, result.stderr
    assert (
        "warning: `" in result.stderr
        and "short.pdf` has 2 pages: --pages 4 selects none of them; skipped" in result.stderr
    )
    assert "1 without a selected page" in result.stderr
    assert not (out / "4" / "short.pdf.md").exists()
    assert (out / "4" / "long.pdf.md").exists()
    result = kosmos("md", str(short), str(long), "-o", str(out / "9"), "--pages", "9")
    assert result.exit_code == 2
    assert "error: --pages 9 selects no page of any input" in result.stderr


def _json_of(kosmos: Kosmos, short: Path, long: Path, tmp_path: Path) -> list[dict[str, object]]:
    """The pages `kosmos ocr --pages 2-4 -f json` wrote for `short` (two pages: 2 only)."""
    out = tmp_path / "json"
    assert kosmos("ocr", str(short), str(long), "-o", str(out), "-f", "json", "--pages", "2-4").exit_code == 0
    return _json(out / "short.pdf.json")["pages"]  # type: ignore[return-value]


def test_encrypted_pdf_needs_the_password(kosmos: Kosmos, tmp_path: Path) -> None:
    locked = make_pdf(tmp_path / "locked.pdf", pages=MIXED_PAGES[:1], password="s3cret")
    out = tmp_path / "out"
    refused = kosmos("md", str(locked), "-o", str(out))
    assert refused.exit_code == 1
    assert "locked.pdf` is encrypted" in refused.stderr
    assert "hint: " in refused.stderr and "--password" in refused.stderr
    opened = kosmos("md", str(locked), "-o", str(out), "--password", "s3cret")
    assert opened.exit_code == 0, opened.stderr
    assert (out / "locked.pdf.md").exists()


BROKEN = {
    "empty.png": lambda p: make_empty(p),
    "truncated.png": lambda p: make_truncated(p, fmt="PNG"),
    "corrupt.jpg": lambda p: make_corrupt(p, fmt="JPEG"),
    "truncated.pdf": lambda p: make_truncated(p, fmt="PDF"),
    "bomb.png": lambda p: make_bomb(p),
    "text.pdf": lambda p: make_text(p),
}


def test_broken_inputs_are_reported_and_the_rest_finishes(kosmos: Kosmos, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name, build in BROKEN.items():
        build(folder / name)
    make_image(folder / "good.png")
    make_image(folder / "png-named.pdf", fmt="PNG")  # mislabelled, but readable by content
    make_pdf(folder / "pdf-named.png", pages=MIXED_PAGES[:1])
    out = tmp_path / "out"
    result = kosmos("md", str(folder), "-o", str(out))
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(BROKEN), result.stderr
    for name in BROKEN:
        assert sum(name in line for line in errors) == 1, (name, errors)
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.glob("*.md")) == ["good.png.md", "pdf-named.png.md", "png-named.pdf.md"]
    assert f"3 done, 0 skipped (done before), {len(BROKEN)} failed" in result.stderr


def test_a_file_that_vanishes_mid_run_is_reported(
    kosmos: Kosmos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep = make_image(tmp_path / "keep.png")
    gone = make_image(tmp_path / "gone.png")
    discover = discovery.discover

    def discover_then_delete(*args: object, **kwargs: object) -> discovery.Discovery:
        found = discover(*args, **kwargs)  # type: ignore[arg-type]
        gone.unlink()
        return found

    monkeypatch.setattr(discovery, "discover", discover_then_delete)
    out = tmp_path / "out"
    result = kosmos("ocr", str(keep), str(gone), "-o", str(out))
    assert result.exit_code == 1
    assert "gone.png" in result.stderr and "error: " in result.stderr
    assert (out / "keep.png.txt").exists()


def test_stdin_and_from_list(kosmos: Kosmos, tmp_path: Path) -> None:
    png = make_image(tmp_path / "page.png", size=(100, 70))
    from_file = kosmos("md", str(png))
    from_stdin = kosmos("md", "-", input=png.read_bytes())
    assert from_stdin.exit_code == 0, from_stdin.stderr
    assert from_stdin.stdout == from_file.stdout
    listing = tmp_path / "list.txt"
    listing.write_text(f"# scans to do\n{png}\n\n")
    from_list = kosmos("md", "--from-list", str(listing))
    assert from_list.exit_code == 0, from_list.stderr
    assert from_list.stdout == from_file.stdout
    piped = kosmos("md", "--from-list", "-", input=f"{png}\n".encode())
    assert piped.stdout == from_file.stdout


def test_existing_outputs_are_skipped_until_overwrite(kosmos: Kosmos, tmp_path: Path) -> None:
    png = make_image(tmp_path / "page.png")
    out = tmp_path / "out"
    assert kosmos("md", str(png), "-o", str(out)).exit_code == 0
    (out / "page.png.md").write_text("edited by hand\n")
    again = kosmos("md", str(png), "-o", str(out))
    assert again.exit_code == 0
    assert "0 done, 1 skipped (done before)" in again.stderr
    assert (out / "page.png.md").read_text() == "edited by hand\n"
    redo = kosmos("md", str(png), "-o", str(out), "--overwrite")
    assert redo.exit_code == 0
    assert (out / "page.png.md").read_text() != "edited by hand\n"


def test_interrupted_run_resumes_without_redoing_pages(
    kosmos: Kosmos,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pdf = make_pdf(tmp_path / "long.pdf", pages=MIXED_PAGES)
    clean = tmp_path / "clean"
    assert kosmos("ocr", str(pdf), "-o", str(clean), "-f", "txt", "-f", "json").exit_code == 0

    page_done = Assembly.page_done
    calls: list[int] = []

    def interrupt_after_three(self: Assembly, result: object, *args: object) -> bool:
        calls.append(result.info.page_index)  # type: ignore[attr-defined]
        if len(calls) == 4:
            raise KeyboardInterrupt
        return page_done(self, result, *args)  # type: ignore[arg-type]

    out = tmp_path / "out"
    monkeypatch.setattr(Assembly, "page_done", interrupt_after_three)
    stopped = kosmos("ocr", str(pdf), "-o", str(out), "-f", "txt", "-f", "json")
    assert stopped.exit_code == 130
    assert "interrupted" in stopped.stderr
    assert [p for p in out.iterdir() if not p.name.startswith(".")] == []
    assert len(list((out / ".kosmos/progress").iterdir())) == 1

    calls.clear()
    monkeypatch.setattr(Assembly, "page_done", page_done)
    resumed = kosmos("ocr", str(pdf), "-o", str(out), "-f", "txt", "-f", "json")
    assert resumed.exit_code == 0, resumed.stderr
    assert "3 resumed" in resumed.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "long.pdf.json",
        "long.pdf.txt",
    ]
    assert list((out / ".kosmos/progress").iterdir()) == []
    for name in ("long.pdf.json", "long.pdf.txt"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()


def test_a_torn_progress_line_is_redone(kosmos: Kosmos, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "doc.pdf", pages=MIXED_PAGES[:2])
    clean = tmp_path / "clean"
    assert kosmos("md", str(pdf), "-o", str(clean)).exit_code == 0
    out = tmp_path / "out"
    out.mkdir()
    progress = out / progress_name(Document(str(pdf), "doc.pdf"), Task.MD)
    progress.parent.mkdir(parents=True)
    progress.write_text('{"kosmos_progress": 1, "fingerprint": "x"}\n{"document": {"pa')
    result = kosmos("md", str(pdf), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert (out / "doc.pdf.md").read_bytes() == (clean / "doc.pdf.md").read_bytes()
    assert not progress.exists()


def test_killed_process_resumes_to_identical_outputs(model_folder: Path, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "many.pdf", pages=[PdfPage(text=f"page {n}") for n in range(12)])
    command = [sys.executable, str(SCRIPTED_KOSMOS), "md", str(pdf), "--model", str(model_folder)]
    clean = tmp_path / "clean"
    subprocess.run([*command, "-o", str(clean)], check=True, capture_output=True, timeout=300)

    out = tmp_path / "out"
    progress = out / progress_name(Document(str(pdf), "many.pdf"), Task.MD)
    process = subprocess.Popen([*command, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if progress.exists() and progress.read_text().count("\n") >= 3:  # header + 2 pages
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "many.pdf.md").exists()

    subprocess.run([*command, "-o", str(out)], check=True, capture_output=True, timeout=300)
    assert (out / "many.pdf.md").read_bytes() == (clean / "many.pdf.md").read_bytes()
    assert not progress.exists()


def test_a_page_the_model_fails_on_is_marked_in_place_and_its_hint_reaches_the_user(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from transformers import Kosmos2_5ForConditionalGeneration

    pdf = make_pdf(tmp_path / "doc.pdf", pages=MIXED_PAGES[:3])
    forward = Kosmos2_5ForConditionalGeneration.forward
    prefills: list[int] = []

    @functools.wraps(forward)  # its signature names the cache argument kosmos passes
    def out_of_memory_on_the_third_page(self: object, *args: object, **kwargs: object) -> object:
        if kwargs.get("flattened_patches") is not None:  # a prefill: one page each at --batch-size 1
            prefills.append(1)
            if len(prefills) == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Kosmos2_5ForConditionalGeneration, "forward", out_of_memory_on_the_third_page)
    out = tmp_path / "out"
    args = ["md", str(pdf), "-o", str(out), "-f", "md", "-f", "json", "--model", str(tiny_checkpoint)]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", TOKENS, "--batch-size", "1"])
    assert result.exit_code == 1, result.stderr
    stderr = result.stderr.splitlines()
    failed = stderr.index(f"error: `{pdf}` page 3: out of memory even alone")
    assert stderr[failed + 1] == "hint: try --dtype bfloat16 or --device cpu"
    markdown = (out / "doc.pdf.md").read_text()
    assert "<!-- kosmos: page 3 failed: out of memory even alone -->" in markdown
    assert (
        markdown.index("<!-- kosmos: page 1")
        < markdown.index("<!-- kosmos: page 2")
        < markdown.index("page 3 failed")
    )
    pages = _json(out / "doc.pdf.md.json")["pages"]
    assert [p["status"] for p in pages] == ["truncated", "truncated", "failed"]  # type: ignore[index]
    assert pages[2]["error"] == "out of memory even alone"  # type: ignore[index]
    assert "kosmos: 1 done, 0 skipped (done before), 0 failed; 3 pages in " in result.stderr
    assert ", 1 failed, 2 truncated" in result.stderr


def test_archival_formats_for_a_pdf_and_an_image(kosmos: Kosmos, tmp_path: Path) -> None:
    from lxml import etree

    schemas = Path(__file__).parent / "schemas"
    pdf = make_pdf(tmp_path / "in" / "two.pdf", pages=MIXED_PAGES[:2])
    make_image(tmp_path / "in" / "scan.png")
    out = tmp_path / "out"
    result = kosmos("ocr", str(tmp_path / "in"), "-o", str(out), "-f", "alto", "-f", "page")
    assert result.exit_code == 0, result.stderr
    written = sorted(p.name for p in out.iterdir() if p.is_file())
    assert written == [
        "scan.png.alto.xml",
        "scan.png.page.xml",
        "two.pdf-p001.page.xml",
        "two.pdf-p002.page.xml",
        "two.pdf.alto.xml",
    ]
    alto = etree.XMLSchema(etree.parse(str(schemas / "alto-4-4.xsd")))
    page = etree.XMLSchema(etree.parse(str(schemas / "page-2019-07-15.xsd")))
    for name in written:
        (alto if name.endswith(".alto.xml") else page).assertValid(etree.parse(str(out / name)))
    pages = (
        etree.parse(str(out / "two.pdf.alto.xml"))
        .getroot()
        .iter("{http://www.loc.gov/standards/alto/ns-v4#}Page")
    )
    assert len(list(pages)) == 2
    assert str(pdf) in (out / "two.pdf-p002.page.xml").read_text()
