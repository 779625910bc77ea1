"""Every input is written or reported, and every run ends: names, the manifest, hostile inputs, signals.

The model is not the subject here: runs go through the real CLI with `load_runner` swapped for
`ScriptedRunner`, whose text is a hash of each page's pixels, so a page in the wrong file shows.
Runs that must be a process of their own (signals, pipes) use `tests/scripted_kosmos.py`, the same
command with the same swap; the few about loading and logging run the tiny real checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pymupdf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inputs import MIXED_PAGES, PdfPage, make_corrupt, make_image, make_pdf, make_truncated
from typer.testing import CliRunner, Result

from kosmos_cli import stores
from kosmos_cli.cli import _Reporter, app
from kosmos_cli.discovery import discover, name_clashes
from kosmos_cli.errors import KosmosError
from kosmos_cli.parsing import parse_ocr, tidy_markdown
from kosmos_cli.stores import LocalStore
from kosmos_cli.testing import ScriptedRunner, image_hash

Kosmos = Callable[..., Result]


@pytest.fixture
def kosmos(scripted: list[ScriptedRunner], model_folder: Path, monkeypatch: pytest.MonkeyPatch) -> Kosmos:
    """Run the CLI in-process with the scripted model; the working folder is the test's."""
    cli = CliRunner()

    def invoke(*args: str, input: bytes | None = None) -> Result:
        return cli.invoke(app, [*args, "--model", str(model_folder), "--device", "cpu"], input=input)

    return invoke


def _scans(root: Path) -> Path:
    """scans/2024/03/a.pdf, scans/2025/01/a.pdf (different documents, one name) and scans/b.png."""
    make_pdf(root / "scans/2024/03/a.pdf", pages=[PdfPage(text="March")])
    make_pdf(root / "scans/2025/01/a.pdf", pages=[PdfPage(text="January"), PdfPage(text="two")])
    make_image(root / "scans/b.png", size=(90, 70))
    return root / "scans"


def _names(
    arguments: list[str], from_list: list[str] | None, folder: Path, root: str | None = None
) -> list[str]:
    listing = None
    if from_list is not None:
        listing = folder / "list.txt"
        listing.write_text("".join(f"{line}\n" for line in from_list))
    found = discover(arguments, from_list=str(listing) if listing else None, root=root)
    return [d.name for d in found.documents]


NAMING = [
    # arguments, --from-list lines, --root, output names: a folder is mirrored below itself, a file
    # named itself keeps its path from the current folder, --root names everything below it.
    (["scans"], None, None, ["2024/03/a.pdf", "2025/01/a.pdf", "b.png"]),
    (
        [],
        ["scans/2024/03/a.pdf", "scans/2025/01/a.pdf", "scans/b.png"],
        None,
        ["scans/2024/03/a.pdf", "scans/2025/01/a.pdf", "scans/b.png"],
    ),
    ([], ["scans/2025/01/a.pdf"], None, ["scans/2025/01/a.pdf"]),
    ([], ["scans/2025/01/a.pdf"], "scans", ["2025/01/a.pdf"]),
    (["scans/2024/03/a.pdf"], None, None, ["scans/2024/03/a.pdf"]),
    (["scans/2024", "scans/b.png"], None, None, ["03/a.pdf", "scans/b.png"]),
    (["scans/2024", "scans/b.png"], None, "scans", ["2024/03/a.pdf", "b.png"]),
    (["scans/*/*/a.pdf"], None, None, ["scans/2024/03/a.pdf", "scans/2025/01/a.pdf"]),
    (["scans/2025", "scans/2024/03/a.pdf"], None, None, ["01/a.pdf", "scans/2024/03/a.pdf"]),
]


@pytest.mark.parametrize(("arguments", "from_list", "root", "expected"), NAMING)
def test_output_names_follow_each_input_s_path(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    arguments: list[str],
    from_list: list[str] | None,
    root: str | None,
    expected: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    _scans(tmp_path)
    assert _names(arguments, from_list, tmp_path, root) == expected


def test_a_name_does_not_depend_on_the_other_files_in_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _scans(tmp_path)
    make_pdf(tmp_path / "scans/2024/03/a.png.pdf")  # would once have pushed `a` to `a.pdf`
    make_image(tmp_path / "elsewhere/one.png")  # would once have moved the common root up
    alone = _names([], ["scans/2024/03/a.pdf", "scans/b.png"], tmp_path)
    crowded = _names([], ["scans/2024/03/a.pdf", "scans/2024/03/a.png.pdf", "elsewhere/one.png"], tmp_path)
    assert alone[0] == crowded[0] == "scans/2024/03/a.pdf"


def test_names_that_differ_only_in_case_are_a_usage_error_before_the_model_loads(
    kosmos: Kosmos, scripted: list[ScriptedRunner], tmp_path: Path
) -> None:
    make_image(tmp_path / "in/Page.png")
    make_image(tmp_path / "in/page.png", size=(50, 40))
    assert name_clashes(discover([str(tmp_path / "in")]).documents) is not None
    result = kosmos("md", str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "Page.png` and `" in result.stderr and "page.png` would both be written as" in result.stderr
    assert scripted == []


def test_another_document_of_the_same_name_is_refused_not_skipped(
    kosmos: Kosmos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _scans(tmp_path)
    first = kosmos(
        "md", "--from-list", "-", "--root", "scans/2024/03", "-o", "o", input=b"scans/2024/03/a.pdf\n"
    )
    assert first.exit_code == 0, first.stderr
    march = (tmp_path / "o/a.pdf.md").read_bytes()
    second = kosmos(
        "md", "--from-list", "-", "--root", "scans/2025/01", "-o", "o", input=b"scans/2025/01/a.pdf\n"
    )
    assert second.exit_code == 1
    assert "error: `o/a.pdf.md` exists and it was written from `" in second.stderr
    assert "scans/2024/03/a.pdf`; `scans/2025/01/a.pdf` is not transcribed" in second.stderr
    assert "0 done, 0 skipped (done before), 1 failed" in second.stderr
    assert (tmp_path / "o/a.pdf.md").read_bytes() == march
    forced = kosmos(
        "md",
        "--from-list",
        "-",
        "--root",
        "scans/2025/01",
        "-o",
        "o",
        "--overwrite",
        input=b"scans/2025/01/a.pdf\n",
    )
    assert forced.exit_code == 0, forced.stderr
    assert "page 2" in (tmp_path / "o/a.pdf.md").read_text()


def test_a_changed_file_a_new_stdin_document_and_new_settings_are_redone(
    kosmos: Kosmos, tmp_path: Path, model_folder: Path
) -> None:
    page = make_image(tmp_path / "page.png")
    out = str(tmp_path / "out")
    assert kosmos("md", str(page), "-o", out).exit_code == 0
    again = kosmos("md", str(page), "-o", out)
    assert "0 done, 1 skipped (done before)" in again.stderr
    make_image(page, size=(70, 50))
    changed = kosmos("md", str(page), "-o", out)
    assert "1 done, 0 skipped" in changed.stderr
    assert next(_page_marks(page, "md")) in (tmp_path / "out/page.png.md").read_text()

    for args in (("--max-new-tokens", "9"), ("--kv-dtype", "bfloat16"), ("--dpi", "50"), ("--pages", "1")):
        redone = kosmos("md", str(page), "-o", out, *args)
        assert "1 done, 0 skipped" in redone.stderr, args
    (model_folder / "model.safetensors").write_bytes(b"new weights")
    assert "1 done, 0 skipped" in kosmos("md", str(page), "-o", out, "--pages", "1").stderr

    first, second = make_image(tmp_path / "first.png"), make_image(tmp_path / "second.png", size=(40, 30))
    assert kosmos("md", "-", "-o", out, input=first.read_bytes()).exit_code == 0
    piped = kosmos("md", "-", "-o", out, input=second.read_bytes())
    assert "1 done, 0 skipped" in piped.stderr
    assert next(_page_marks(second, "md")) in (tmp_path / "out/stdin.md").read_text()


def test_another_task_writes_its_json_beside_the_first(kosmos: Kosmos, tmp_path: Path) -> None:
    page = make_image(tmp_path / "x.png")
    out = str(tmp_path / "d")
    assert kosmos("md", str(page), "-o", out, "-f", "json").exit_code == 0
    ocr = kosmos("ocr", str(page), "-o", out, "-f", "json")
    assert ocr.exit_code == 0 and "1 done, 0 skipped" in ocr.stderr
    assert json.loads((tmp_path / "d/x.png.json").read_text())["task"] == "ocr"
    assert json.loads((tmp_path / "d/x.png.md.json").read_text())["task"] == "md"
    assert "0 done, 1 skipped" in kosmos("md", str(page), "-o", out, "-f", "json").stderr


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, pages: int) -> None:
    from kosmos_cli.assembly import Assembly

    page_done = Assembly.page_done
    calls: list[int] = []

    def interrupt(self: Assembly, result: object, *args: object) -> bool:
        calls.append(1)
        if len(calls) > pages:
            raise KeyboardInterrupt
        return page_done(self, result, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Assembly, "page_done", interrupt)


def test_saved_pages_are_reused_only_by_the_same_job(
    kosmos: Kosmos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pdf = make_pdf(tmp_path / "doc.pdf", pages=MIXED_PAGES)
    out = str(tmp_path / "out")
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        assert kosmos("md", str(pdf), "-o", out).exit_code == 130
    assert list((tmp_path / "out/.kosmos/progress").iterdir())

    ocr = kosmos("ocr", str(pdf), "-o", out)  # once crashed: "the txt format cannot hold md results"
    assert ocr.exit_code == 0, ocr.stderr
    assert "discarding" not in ocr.stderr, "md's saved pages are md's: an ocr run into the folder leaves them"
    assert list((tmp_path / "out/.kosmos/progress").iterdir())

    with monkeypatch.context() as patch:
        _interrupt_after(patch, 2)
        assert kosmos("md", str(pdf), "-o", out).exit_code == 130
    fewer = kosmos("md", str(pdf), "-o", out, "--pages", "5-6")
    assert fewer.exit_code == 0, fewer.stderr
    assert "warning: discarding the saved pages of" in fewer.stderr
    markdown = (tmp_path / "out/doc.pdf.md").read_text()
    assert [line for line in markdown.splitlines() if line.startswith("<!-- kosmos: page")] == [
        "<!-- kosmos: page 5 -->", "<!-- kosmos: page 6 -->",
    ]  # fmt: skip
    assert not list((tmp_path / "out/.kosmos/progress").iterdir())


def test_a_resumed_document_keeps_every_drawing_and_is_not_refused(
    kosmos: Kosmos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pdf = make_pdf(tmp_path / "doc.pdf", pages=MIXED_PAGES)
    args = ("ocr", str(pdf), "--draw", "-f", "txt")
    assert kosmos(*args, "-o", str(tmp_path / "clean")).exit_code == 0
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 3)
        assert kosmos(*args, "-o", str(tmp_path / "out")).exit_code == 130
    assert not list((tmp_path / "out").glob("*.png")), "pictures wait in .kosmos/staging until the end"
    resumed = kosmos(*args, "-o", str(tmp_path / "out"))
    assert resumed.exit_code == 0, resumed.stderr
    assert "3 resumed" in resumed.stderr
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "clean")
    assert len([name for name in _outputs(tmp_path / "out") if name.endswith(".boxes.png")]) == len(
        MIXED_PAGES
    )
    assert not list((tmp_path / "out/.kosmos/staging").iterdir())


def test_an_output_folder_inside_the_inputs_is_never_read_back(kosmos: Kosmos, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    make_image(folder / "receipt.png")
    make_pdf(folder / "doc.pdf", pages=MIXED_PAGES[:2])
    for _ in range(2):
        result = kosmos("ocr", str(folder), "-o", str(folder / "out"), "--draw", "-f", "pdf")
        assert result.exit_code == 0, result.stderr
    written = sorted(
        p.relative_to(folder / "out").as_posix()
        for p in (folder / "out").rglob("*")
        if p.is_file() and ".kosmos" not in p.parts
    )
    assert written == [
        "doc.pdf-p001.boxes.png", "doc.pdf-p002.boxes.png", "doc.pdf.pdf", "receipt.png.boxes.png", "receipt.png.pdf",
    ]  # fmt: skip
    elsewhere = kosmos(
        "ocr", str(folder), "-o", str(tmp_path / "other")
    )  # an old output folder is skipped too
    assert elsewhere.exit_code == 0 and sorted(p.name for p in (tmp_path / "other").glob("*.txt")) == [
        "doc.pdf.txt", "receipt.png.txt",
    ]  # fmt: skip


def test_a_file_kosmos_did_not_write_is_never_replaced(kosmos: Kosmos, tmp_path: Path) -> None:
    page = make_image(tmp_path / "notes.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.png.md").write_text("my own notes\n")
    result = kosmos("md", str(page), "-o", str(out), "-f", "md", "-f", "json")
    assert result.exit_code == 1
    assert "notes.png.md` exists and kosmos did not write it" in result.stderr
    assert (out / "notes.png.md").read_text() == "my own notes\n"
    assert not (out / "notes.png.json").exists()


def test_bad_output_folders_are_usage_errors_before_the_model_loads(
    kosmos: Kosmos, scripted: list[ScriptedRunner], tmp_path: Path
) -> None:
    page = make_image(tmp_path / "page.png")
    (tmp_path / "taken").write_text("a file")
    result = kosmos("md", str(page), "-o", str(tmp_path / "taken"))
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr
    result = kosmos("md", str(page), "-o", str(tmp_path / "taken" / "out"))
    assert result.exit_code == 2 and "cannot write to -o" in result.stderr
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who may write anywhere")
        result = kosmos("md", str(page), "-o", str(locked / "out"))
        assert result.exit_code == 2 and "cannot write to -o" in result.stderr
    finally:
        locked.chmod(0o700)
    assert scripted == []


def test_every_input_is_checked_before_the_model_loads(
    kosmos: Kosmos, scripted: list[ScriptedRunner], tmp_path: Path
) -> None:
    make_corrupt(tmp_path / "bad.png", fmt="PNG")
    make_pdf(tmp_path / "short.pdf", pages=MIXED_PAGES[:1])
    result = kosmos(
        "md",
        str(tmp_path / "bad.png"),
        str(tmp_path / "short.pdf"),
        "--pages",
        "2",
        "-o",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 2  # no page of any readable input is selected: a usage error
    assert (
        "bad.png` cannot be decoded" in result.stderr
        and "short.pdf` has 1 page: --pages 2 selects none of them; skipped" in result.stderr
        and "error: --pages 2 selects no page of any input" in result.stderr
    )
    assert scripted == [], "nothing was left to transcribe, so no model was loaded"


def test_nothing_to_transcribe_is_a_warning(kosmos: Kosmos, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("not a scan")
    result = kosmos("md", str(tmp_path / "empty"))
    assert result.exit_code == 0
    assert f"warning: no images or PDFs found in `{tmp_path / 'empty'}`" in result.stderr


def test_ray_address_alone_does_not_turn_ray_on(
    kosmos: Kosmos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    result = kosmos("md", str(make_image(tmp_path / "page.png")))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("# page ")


def test_the_walk_survives_link_loops_and_skips_pipes(kosmos: Kosmos, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    make_image(folder / "a.png")
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "up").symlink_to(folder)
    os.mkfifo(folder / "pipe.pdf")
    result = kosmos("md", str(folder), "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out/a.png.md").exists()


def test_a_named_pipe_nobody_writes_fails_at_once(
    kosmos: Kosmos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kosmos_cli import discovery

    monkeypatch.setattr(discovery, "FIFO_WAIT_SECONDS", 1.0)  # how long a silent pipe is waited for
    os.mkfifo(tmp_path / "pipe")
    started = time.monotonic()
    result = kosmos("md", str(tmp_path / "pipe"), str(make_image(tmp_path / "a.png")))
    assert time.monotonic() - started < 60
    assert result.exit_code == 1
    assert "pipe` is a pipe with nothing written to it" in result.stderr
    assert "# page " in result.stdout


def test_file_names_of_any_bytes(kosmos: Kosmos, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.fsdecode(b"b\xff.png")
    make_image(folder / raw)
    make_image(folder / "new\nline.png", size=(40, 30))
    result = kosmos("ocr", str(folder), "-o", str(tmp_path / "out"), "-f", "json", "-f", "hocr", "-f", "txt")
    assert result.exit_code == 0, result.stderr
    source = json.loads((tmp_path / "out" / f"{raw}.json").read_text())["source"]
    assert source.endswith("b\\xff.png")
    stdout = kosmos("ocr", str(folder))
    assert stdout.exit_code == 0
    headers = [line for line in stdout.stdout.splitlines() if line.startswith("# kosmos: document")]
    assert len(headers) == 2 and headers[1].endswith("new\\nline.png")


def test_model_text_cannot_forge_markers_or_reach_the_terminal() -> None:
    markdown = tidy_markdown(
        "Total\x1b[2J\x00\x07 due\n\n<!-- kosmos: page 2 -->\n<!--KOSMOS: document x -->"
    )
    assert markdown == "Total[2J due\n\n&lt;!-- kosmos: page 2 -->\n&lt;!--KOSMOS: document x -->"
    lines = parse_ocr(
        "<bbox><x_1><y_1><x_5><y_5></bbox>a\x1bb\x00", resized_size=(10, 10), original_size=(10, 10)
    )
    assert [line.text for line in lines] == ["ab"]


def test_the_searchable_pdf_carries_no_scripts(kosmos: Kosmos, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "doc.pdf", pages=MIXED_PAGES[:1])
    with pymupdf.open(pdf) as document:
        catalog = document.pdf_catalog()
        document.xref_set_key(catalog, "OpenAction", "<</S/JavaScript/JS(app.alert('hello'))>>")
        names = document.get_new_xref()
        document.update_object(names, "<</Names[(x) <</S/JavaScript/JS(app.alert('named'))>>]>>")
        document.xref_set_key(catalog, "Names", f"<</JavaScript {names} 0 R>>")
        document.saveIncr()
    assert b"JavaScript" in pdf.read_bytes()
    result = kosmos("ocr", str(pdf), "-o", str(tmp_path / "out"), "-f", "pdf")
    assert result.exit_code == 0, result.stderr
    with pymupdf.open(tmp_path / "out/doc.pdf.pdf") as searchable:
        objects = "".join(searchable.xref_object(x) for x in range(1, searchable.xref_length()))
    assert "JavaScript" not in objects and "app.alert" not in objects


def test_a_pdf_with_an_outline_cycle_still_gets_its_searchable_pdf(kosmos: Kosmos, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "cycle.pdf", pages=MIXED_PAGES[:2])
    with pymupdf.open(pdf) as document:
        document.set_toc([[1, "One", 1], [1, "Two", 2]])
        outline = int(document.xref_get_key(document.pdf_catalog(), "Outlines")[1].split()[0])
        first = document.xref_get_key(outline, "First")[1]
        last = int(document.xref_get_key(outline, "Last")[1].split()[0])
        document.xref_set_key(last, "Next", first)  # the last item leads back to the first
        document.saveIncr()
    result = kosmos("ocr", str(pdf), "-o", str(tmp_path / "out"), "-f", "pdf")
    assert result.exit_code == 0, result.stderr
    with pymupdf.open(tmp_path / "out/cycle.pdf.pdf") as searchable:
        assert searchable.page_count == 2 and "page" in searchable[1].get_text()


def test_a_pdf_whose_end_is_damaged_but_whole_is_read(kosmos: Kosmos, tmp_path: Path) -> None:
    data = make_pdf(tmp_path / "ok.pdf", pages=MIXED_PAGES[:2]).read_bytes()
    (tmp_path / "damaged.pdf").write_bytes(data[: data.rfind(b"startxref")] + b"startxre")
    make_truncated(tmp_path / "cut.pdf", fmt="PDF")
    result = kosmos(
        "md", str(tmp_path / "damaged.pdf"), str(tmp_path / "cut.pdf"), "-o", str(tmp_path / "out")
    )
    assert result.exit_code == 1
    assert "cut.pdf` is truncated" in result.stderr and "damaged.pdf" not in result.stderr
    assert (tmp_path / "out/damaged.pdf.md").read_text().count("<!-- kosmos: page") == 2


def test_stdin_copies_left_by_killed_runs_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from kosmos_cli.discovery import SPOOL_PREFIX, remove_stale_spools

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{SPOOL_PREFIX}{dead.pid}-abc"
    mine = tmp_path / f"{SPOOL_PREFIX}{os.getpid()}-def"
    stale.write_bytes(b"x")
    mine.write_bytes(b"x")
    remove_stale_spools()
    assert not stale.exists() and mine.exists()


def test_a_planted_link_is_never_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    store = LocalStore(tmp_path / "out")
    store.open_for_run()
    (tmp_path / "out/.kosmos/progress").mkdir()
    (tmp_path / "out/.kosmos/progress/x.jsonl").symlink_to(outside)
    with pytest.raises(KosmosError):
        store.append_log(".kosmos/progress/x.jsonl", "line")
    assert outside.read_text() == "precious\n"


def test_a_full_disk_fails_the_document_and_the_run_ends_with_its_summary(
    kosmos: Kosmos, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = stores.atomic_write

    def full_for_b(path: Path, data: bytes, **kwargs: object) -> None:
        if path.name.startswith("b."):
            raise KosmosError(f"cannot write `{path}`: {os.strerror(errno.ENOSPC)}")
        write(path, data, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stores, "atomic_write", full_for_b)
    for name in ("a", "b", "c"):
        make_image(tmp_path / f"in/{name}.png")
    result = kosmos("md", str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr
    assert "kosmos: 2 done, 0 skipped (done before), 1 failed" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.md")) == ["a.png.md", "c.png.md"]


def _laughs_pdf(path: Path, *, levels: int = 12, copies: int = 10) -> Path:
    """A one-page PDF whose form XObjects each draw the next `copies` times: copies**levels draws."""
    document = pymupdf.open()
    page = document.new_page(width=200, height=200)
    xrefs = [document.get_new_xref() for _ in range(levels)]
    for depth, xref in enumerate(xrefs):
        if depth == levels - 1:
            content, resources = b"0 0 m 10 10 l S", "<<>>"
        else:
            content = b"q 1 0 0 1 0.1 0.1 cm /X Do Q " * copies
            resources = f"<</XObject<</X {xrefs[depth + 1]} 0 R>>>>"
        document.update_object(
            xref, f"<</Type/XObject/Subtype/Form/BBox[0 0 200 200]/Resources {resources}>>"
        )
        document.update_stream(xref, content)
    page_resources = f"<</XObject<</X {xrefs[0]} 0 R>>>>"
    document.xref_set_key(page.xref, "Resources", page_resources)
    contents = document.get_new_xref()
    document.update_object(contents, "<<>>")
    document.update_stream(contents, b"/X Do")
    document.xref_set_key(page.xref, "Contents", f"{contents} 0 R")
    document.save(path)
    return path


def test_a_page_that_makes_mupdf_spin_fails_alone_within_the_page_timeout(
    kosmos: Kosmos, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    _laughs_pdf(folder / "laughs.pdf")
    make_pdf(folder / "spins-on-page-2.pdf", pages=[PdfPage(text="fine")])
    with pymupdf.open(folder / "spins-on-page-2.pdf") as good, pymupdf.open(folder / "laughs.pdf") as bad:
        good.insert_pdf(bad)
        good.saveIncr()
    make_image(folder / "after.png")
    # The spinning pages never finish, so any budget fails them; 6 s lets a sound page (a few ms)
    # through on a machine busy enough to slow it 1,000-fold.
    result = kosmos("md", str(folder), "-o", str(tmp_path / "out"), "--page-timeout", "6")
    assert result.exit_code == 1
    assert "laughs.pdf` took longer than 6 s" in result.stderr
    assert "spins-on-page-2.pdf` page 2 took longer than 6 s" in result.stderr
    assert (tmp_path / "out/after.png.md").exists()
    two = (tmp_path / "out/spins-on-page-2.pdf.md").read_text()
    assert "<!-- kosmos: page 2 failed: " in two and "# page " in two


def _spinning_pdf(path: Path, *, spinning: int) -> Path:
    """A PDF of one sound page and then `spinning` pages that make MuPDF spin for ever."""
    _laughs_pdf(path.with_name(f"laughs-for-{path.name}"))
    make_pdf(path, pages=[PdfPage(text="fine")])
    with pymupdf.open(path) as document, pymupdf.open(path.with_name(f"laughs-for-{path.name}")) as bad:
        for _ in range(spinning):
            document.insert_pdf(bad)
        document.saveIncr()
    return path


def test_a_document_whose_pages_keep_spinning_is_given_up_with_one_line(
    kosmos: Kosmos, tmp_path: Path
) -> None:
    _spinning_pdf(tmp_path / "spins.pdf", spinning=6)  # page 1 sound, pages 2-7 spin
    result = kosmos("md", str(tmp_path / "spins.pdf"), "-o", str(tmp_path / "out"), "--page-timeout", "2")
    assert result.exit_code == 1
    assert result.stderr.count("took longer than 2 s") == 4, result.stderr  # pages 2-4, then one line
    assert "error: `" in result.stderr and (
        "spins.pdf`: 3 pages in a row took longer than 2 s; its other 3 selected pages are not read"
        in result.stderr
    )
    text = (tmp_path / "out/spins.pdf.md").read_text()
    assert "# page " in text and all(f"<!-- kosmos: page {n} failed: " in text for n in range(2, 8))


def _wait_for_a_spinning_reader(pid: int) -> None:
    """Wait until kosmos's reader process has spent a second of CPU: it is rendering, not starting."""
    deadline = time.monotonic() + 600  # a bound for a broken run only; a sound one gets there in seconds
    while time.monotonic() < deadline:
        for child in psutil.Process(pid).children():
            with contextlib.suppress(psutil.Error):
                if "serve_fd" in " ".join(child.cmdline()) and child.cpu_times().user > 1.0:
                    return
        time.sleep(0.1)
    raise AssertionError("the reader never started rendering")


def test_ctrl_c_stops_a_run_stuck_in_a_render(model_folder: Path, tmp_path: Path) -> None:
    laughs = _laughs_pdf(tmp_path / "laughs.pdf", levels=14)
    process = subprocess.Popen(_scripted(model_folder, "md", str(laughs)), stderr=subprocess.PIPE, text=True)
    _wait_for_a_spinning_reader(process.pid)  # an event, not a guess at how long starting takes
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "error: interrupted" in stderr and "terminate called" not in stderr


def test_huge_pages_and_long_documents_stay_bounded(kosmos: Kosmos, tmp_path: Path) -> None:
    long = pymupdf.open()
    for _ in range(5000):
        long.new_page(width=100, height=100)
    long.save(tmp_path / "long.pdf")
    make_pdf(tmp_path / "wide.pdf", pages=[PdfPage(width=14400, height=14400, text="big")])
    make_image(tmp_path / "large.png", size=(6000, 6000))
    result = kosmos("md", str(tmp_path / "long.pdf"), "--pages", "4999-", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    assert "1 done" in result.stderr and "2 pages" in result.stderr
    big = kosmos(
        "ocr",
        str(tmp_path / "wide.pdf"),
        str(tmp_path / "large.png"),
        "-o",
        str(tmp_path / "out"),
        "-f",
        "json",
        "--draw",
    )
    assert big.exit_code == 0, big.stderr
    large = json.loads((tmp_path / "out/large.png.json").read_text())["pages"][0]
    assert (large["width"], large["height"]) == (6000, 6000), "sizes and boxes stay in the page's own pixels"
    assert large["lines"][0]["bbox"][2] > 5000


def test_plain_progress_lines_when_stderr_is_a_log(tmp_path: Path) -> None:
    from rich.console import Console

    from kosmos_cli.values import Document, PageInfo, PageResult, Task

    _result = PageResult(PageInfo(Document("a.png", "a.png"), 0, 1, 10, 10), Task.MD, "text")

    now = [0.0]
    with (tmp_path / "log").open("w") as log:
        reporter = _Reporter(
            Console(file=log, force_terminal=False),
            quiet=False,
            verbose=False,
            interval=30,
            clock=lambda: now[0],
        )
        reporter.add_total(10)
        for second in (10, 20, 31, 40, 62):
            now[0] = second
            reporter.page_done(_result)
    lines = (tmp_path / "log").read_text().splitlines()
    assert lines == [
        "kosmos: 3/10 pages, 0.10 pages/s, about 72 s left",
        "kosmos: 5/10 pages, 0.08 pages/s, about 62 s left",
    ]


# --- kosmos in a process of its own -------------------------------------------------------------

SCRIPTED_KOSMOS = Path(__file__).with_name("scripted_kosmos.py")


def _scripted(model: Path, *args: str) -> list[str]:
    """The kosmos command, with the model swapped for ScriptedRunner (0.1 s a page)."""
    return [sys.executable, str(SCRIPTED_KOSMOS), *args, "--model", str(model)]


def _command(checkpoint: Path, *args: str) -> list[str]:
    """The kosmos command on a real checkpoint."""
    return [sys.executable, "-m", "kosmos_cli", *args, "--model", str(checkpoint), "--max-new-tokens", "6"]


def test_a_closed_stdout_ends_the_run_quietly(model_folder: Path, tmp_path: Path) -> None:
    pages = [str(make_image(tmp_path / f"p{n}.png", size=(60 + n, 40))) for n in range(3)]
    shell = " ".join(_scripted(model_folder, "md", *pages)) + " | head -c 1"
    result = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {shell}"], capture_output=True, timeout=300, text=True
    )
    assert result.returncode == 141
    assert "error" not in result.stderr.lower()


def test_a_damaged_checkpoint_is_a_loading_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    page = make_image(tmp_path / "page.png")
    result = CliRunner().invoke(app, ["md", str(page), "--model", str(broken)])
    assert result.exit_code == 3, result.stderr
    assert f"error: `{weights}` is damaged" in result.stderr


KILLS = [(signal.SIGKILL, 0.3), (signal.SIGINT, 0.6), (signal.SIGTERM, 0.45)]


@dataclass(frozen=True)
class CleanRun:
    """A folder of inputs and what an uninterrupted run writes from it, made once for the kill tests."""

    args: list[str]  # the kosmos command's arguments, -o excepted
    outputs: dict[str, bytes]
    seconds: float  # how long the run took


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> CleanRun:
    root = tmp_path_factory.mktemp("killed")
    folder = root / "in"
    make_pdf(folder / "many.pdf", pages=[PdfPage(text=f"page {n}") for n in range(8)])
    for n in range(3):
        make_image(folder / f"img{n}.png", size=(50 + 7 * n, 40))
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "kosmos-2.5"}')
    args = _scripted(model, "ocr", str(folder), "-f", "txt", "-f", "json", "--draw")
    started = time.monotonic()
    subprocess.run([*args, "-o", str(root / "clean")], check=True, capture_output=True, timeout=300)
    return CleanRun(args, _outputs(root / "clean"), time.monotonic() - started)


@pytest.mark.parametrize(("signum", "share"), KILLS, ids=[s.name for s, _ in KILLS])
def test_a_killed_run_resumes_to_identical_outputs(
    clean_run: CleanRun, tmp_path: Path, signum: signal.Signals, share: float
) -> None:
    out = tmp_path / "out"
    process = subprocess.Popen(
        [*clean_run.args, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    time.sleep(clean_run.seconds * share * random.Random(signum).uniform(0.8, 1.2))
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    if process.returncode != 0:  # it may have finished first
        expected = {signal.SIGKILL: -9, signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
        assert process.returncode == expected, stderr.decode()
        assert b"terminate called" not in stderr
    rerun = subprocess.run([*clean_run.args, "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert _outputs(out) == clean_run.outputs
    assert not list((out / ".kosmos/tmp").iterdir())
    assert not list((out / ".kosmos/progress").iterdir())


def _outputs(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".kosmos" not in p.parts
    }


# --- randomized: trees, changes, tasks and formats ----------------------------------------------

_NAMES = st.sampled_from(["a", "b", "scan", "A"])
_FOLDERS = st.sampled_from(["", "x", "y", "x/z"])
_KINDS = st.sampled_from(["png", "pdf", "jpg"])
_TREES = st.lists(st.tuples(_FOLDERS, _NAMES, _KINDS, st.integers(1, 3)), min_size=1, max_size=6)
_RUNS = st.lists(
    st.tuples(
        st.sampled_from(["md", "ocr"]),
        st.sampled_from([("json",), ("md",), ("txt",), ("json", "jsonl")]),
        st.integers(0, 5),
    ),
    min_size=2,
    max_size=3,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_TREES, runs=_RUNS)
def test_every_input_is_written_from_itself_and_never_redone_without_cause(
    kosmos: Kosmos,
    scripted: list[ScriptedRunner],
    tmp_path_factory: pytest.TempPathFactory,
    tree: list[tuple[str, str, str, int]],
    runs: list[tuple[str, tuple[str, ...], int]],
) -> None:
    root = tmp_path_factory.mktemp("tree")
    files_made: dict[Path, int] = {}
    for folder, name, kind, size in tree:
        path = root / "in" / folder / f"{name}.{kind}"
        if path in files_made or any(p.as_posix().lower() == path.as_posix().lower() for p in files_made):
            continue
        _make(path, kind, size)
        files_made[path] = size
    out = root / "out"
    previous: tuple[str, tuple[str, ...]] | None = None
    for task, formats, change in runs:
        formats = tuple(f for f in formats if (task, f) not in {("md", "txt"), ("ocr", "md")}) or ("json",)
        changed = sorted(files_made)[change % len(files_made)] if change else None
        if changed is not None:
            _make(changed, changed.suffix[1:], files_made[changed] + 3)
            files_made[changed] += 3
        before = len(scripted)
        result = kosmos(task, str(root / "in"), "-o", str(out), *(a for f in formats for a in ("-f", f)))
        assert result.exit_code == 0, result.stderr
        same_job = previous == (task, formats)
        if same_job and changed is None:
            assert len(scripted) == before, "nothing changed, so nothing was transcribed"
        for path in files_made:
            name = path.relative_to(root / "in").as_posix()
            for fmt in formats:
                md_mark = (
                    ".md" if task == "md" and fmt in ("json", "jsonl") else ""
                )  # md results beside ocr's
                text = (out / f"{name}{md_mark}.{fmt}").read_text()
                if fmt in ("json", "jsonl"):
                    assert f'"task": "{task}"' in text
                for mark in _page_marks(path, task):
                    assert mark in text, (name, fmt)
        previous = (task, formats)


def _make(path: Path, kind: str, size: int) -> None:
    if kind == "pdf":
        make_pdf(path, pages=[PdfPage(text=f"{path.name} {size} {n}") for n in range(size)])
    else:
        make_image(path, size=(30 + 11 * size, 20 + 5 * size), fmt="JPEG" if kind == "jpg" else "PNG")


def _page_marks(path: Path, task: str) -> Iterator[str]:
    """What each page's outputs must hold: its own text where ocr reads it from the PDF (`--text-layer
    auto`), else the scripted model's hash of its pixels."""
    from kosmos_cli.rasterize import iter_pages
    from kosmos_cli.values import Document, LayerKind

    for page in iter_pages(Document(str(path), path.name), text_layer=True):
        assert not isinstance(page, Exception)
        layer = page.text_layer
        if task == "ocr" and layer is not None and layer.kind is LayerKind.DIGITAL:
            yield f"{path.name} {page.info.page_count} {page.info.page_index}"  # as `_make` wrote it
        else:
            yield image_hash(page.image.tobytes())


def test_the_nightly_pipeline_transcribes_new_and_changed_scans_once(
    model_folder: Path, tmp_path: Path
) -> None:
    if shutil.which("jq") is None:
        pytest.skip("examples/pipeline.sh needs jq")
    scans = _scans(tmp_path)  # two a.pdf in different folders, one of them a single page
    script = Path(__file__).resolve().parent.parent / "examples" / "pipeline.sh"
    bin_folder = tmp_path / "bin"  # `kosmos` there is the scripted command
    bin_folder.mkdir()
    shim = bin_folder / "kosmos"
    shim.write_text(
        f'#!/bin/sh\nKOSMOS_TEST_SECONDS_PER_PAGE=0 exec {sys.executable} {SCRIPTED_KOSMOS} "$@"\n'
    )
    shim.chmod(0o755)
    env = os.environ | {"KOSMOS_MODEL": str(model_folder), "PATH": f"{bin_folder}:{os.environ['PATH']}"}

    def nightly() -> subprocess.CompletedProcess[str]:
        command = ["sh", str(script), str(scans), str(tmp_path / "out")]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)

    first = nightly()
    assert first.returncode == 0, first.stderr
    for name in ("2024/03/a.pdf", "2025/01/a.pdf", "b.png"):
        assert (tmp_path / "out/md" / f"{name}.md").exists() and (
            tmp_path / "out/ocr" / f"{name}.jsonl"
        ).exists()
    second = nightly()
    assert second.returncode == 0 and second.stderr.count("0 done, 3 skipped (done before)") == 2, (
        second.stderr
    )
    make_image(scans / "b.png", size=(70, 90))
    third = nightly()
    assert third.returncode == 0 and third.stderr.count("1 done, 2 skipped (done before)") == 2, third.stderr


def test_verbose_shows_what_happens_not_the_tokenizer(tiny_checkpoint: Path, tmp_path: Path) -> None:
    page = make_image(tmp_path / "page.png")
    result = subprocess.run(
        _command(tiny_checkpoint, "md", str(page), "-v"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"loading model `{tiny_checkpoint}`"
    assert any(line.startswith("info: loaded ") for line in lines)
    assert len(lines) < 30 and "<x_" not in result.stderr
