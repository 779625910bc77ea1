"""`kosmos convert`: every format again from kosmos's own JSON, byte for byte, without the model."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from inputs import MIXED_PAGES, make_image, make_pdf
from typer.testing import CliRunner

from kosmos_cli.cli import app

FORMATS = ("txt", "hocr", "alto", "page", "pdf")
EPOCH = "1764547200"  # SOURCE_DATE_EPOCH: PAGE's `Created`, the same in both runs


@pytest.fixture
def transcribed(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`kosmos ocr` of a two-page PDF and an image on the tiny model, into `direct/`, JSON included."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    make_pdf(tmp_path / "in" / "two.pdf", pages=MIXED_PAGES[:2])
    make_image(tmp_path / "in" / "scan.png")
    args = ["ocr", str(tmp_path / "in"), "-o", str(tmp_path / "direct"), "-f", "json"]
    args += [arg for name in FORMATS for arg in ("-f", name)]
    result = CliRunner().invoke(app, [*args, "--model", str(tiny_checkpoint), "--max-new-tokens", "24"])
    assert result.exit_code == 0, result.stderr
    return tmp_path


def outputs(folder: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.endswith(".json")
    }


def test_convert_writes_what_the_run_wrote_byte_for_byte(
    transcribed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        sys.modules, "torch", None
    )  # convert never needs the model: importing torch would fail
    direct = transcribed / "direct"
    args = [
        "convert",
        str(direct / "two.pdf.json"),
        str(direct / "scan.png.json"),
        "-o",
        str(transcribed / "converted"),
    ]
    result = CliRunner().invoke(app, [*args, *(arg for name in FORMATS for arg in ("-f", name))])
    assert result.exit_code == 0, result.stderr
    assert "kosmos: 2 done" in result.stderr
    converted = outputs(transcribed / "converted")
    assert sorted(converted) == sorted(outputs(direct)) == [
        "scan.png.alto.xml", "scan.png.hocr", "scan.png.page.xml", "scan.png.pdf", "scan.png.txt",
        "two.pdf-p001.page.xml", "two.pdf-p002.page.xml", "two.pdf.alto.xml", "two.pdf.hocr", "two.pdf.pdf", "two.pdf.txt",
    ]  # fmt: skip
    assert converted == outputs(direct)


def test_convert_finds_a_moved_input_and_refuses_to_overwrite(transcribed: Path) -> None:
    direct = transcribed / "direct"
    shutil.move(transcribed / "in" / "two.pdf", transcribed / "moved.pdf")
    args = ["convert", str(direct / "two.pdf.json"), "-f", "pdf", "-o", str(transcribed / "again")]
    lost = CliRunner().invoke(app, args)
    assert lost.exit_code == 1
    assert (
        f"error: cannot read the input for the searchable PDF: `{transcribed / 'in' / 'two.pdf'}` does not exist"
        in lost.stderr
    )
    assert "hint: pass its place with --source" in lost.stderr
    found = CliRunner().invoke(app, [*args, "--source", str(transcribed / "moved.pdf")])
    assert found.exit_code == 0, found.stderr
    assert (transcribed / "again" / "two.pdf.pdf").read_bytes() == (direct / "two.pdf.pdf").read_bytes()
    refused = CliRunner().invoke(app, [*args, "--source", str(transcribed / "moved.pdf")])
    assert refused.exit_code == 1 and "two.pdf.pdf` exists" in refused.stderr
    assert (
        CliRunner().invoke(app, [*args, "--source", str(transcribed / "moved.pdf"), "--overwrite"]).exit_code
        == 0
    )


def test_a_json_of_the_first_schema_still_converts(transcribed: Path) -> None:
    data = json.loads((transcribed / "direct" / "scan.png.json").read_text())
    for name in ("schema_version", "path", "model"):
        del data[name]
    for page in data["pages"]:
        for name in ("pixel_to_pdf", "truncation", "raw"):
            del page[name]
        for line in page["lines"]:
            del line["confidence"], line["min_confidence"], line["words"]
    old = transcribed / "old" / "scan.png.json"
    old.parent.mkdir()
    old.write_text(json.dumps(data))
    result = CliRunner().invoke(app, ["convert", str(old), "-f", "txt", "-f", "alto"])
    assert result.exit_code == 0, result.stderr
    assert (old.parent / "scan.png.txt").read_bytes() == (
        transcribed / "direct" / "scan.png.txt"
    ).read_bytes()
    assert (old.parent / "scan.png.alto.xml").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not json", "is not a result kosmos wrote (neither JSON nor JSON lines)"),
        (b'{"pages": [], "schema_version": 99}', "is not a result kosmos wrote (not a result kosmos wrote"),
    ],
)
def test_convert_reports_a_file_it_cannot_read_and_goes_on(
    transcribed: Path, content: bytes, message: str
) -> None:
    bad = transcribed / "bad.json"
    bad.write_bytes(content)
    good = transcribed / "direct" / "scan.png.json"
    result = CliRunner().invoke(
        app, ["convert", str(bad), str(good), "-f", "alto", "-o", str(transcribed / "out")]
    )
    assert result.exit_code == 1
    assert f"error: `{bad}` {message}" in result.stderr
    assert (transcribed / "out" / "scan.png.alto.xml").exists()


def test_markdown_converts_too(scripted: list[object], model_folder: Path, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "in" / "two.pdf", pages=MIXED_PAGES[:2])
    direct = tmp_path / "direct"
    run = CliRunner().invoke(
        app, ["md", str(pdf), "-o", str(direct), "-f", "json", "-f", "md", "--model", str(model_folder)]
    )
    assert run.exit_code == 0, run.stderr
    result = CliRunner().invoke(
        app, ["convert", str(direct / "two.pdf.md.json"), "-f", "md", "-o", str(tmp_path / "converted")]
    )
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "converted" / "two.pdf.md").read_bytes() == (direct / "two.pdf.md").read_bytes()
    wrong = CliRunner().invoke(
        app, ["convert", str(direct / "two.pdf.md.json"), "-f", "alto", "-o", str(tmp_path / "x")]
    )
    assert wrong.exit_code == 2
    assert wrong.stderr.splitlines()[0] == "error: format `alto` cannot hold `md` results"


def test_convert_takes_folders_and_globs_and_mirrors_them(
    scripted: list[object], model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("scans/2024/page.png", "scans/2025/page.png"):
        make_image(tmp_path / name)
    run = CliRunner().invoke(
        app, ["ocr", "scans", "-o", "out", "-f", "json", "-f", "txt", "--model", str(model_folder)]
    )
    assert run.exit_code == 0, run.stderr
    # Two page.png.json in different folders: each keeps its place, none overwrites the other.
    result = CliRunner().invoke(app, ["convert", "out", "-f", "alto", "-o", "archive"])
    assert result.exit_code == 0, result.stderr
    assert sorted(
        str(p.relative_to(tmp_path / "archive")) for p in (tmp_path / "archive").rglob("*.xml")
    ) == [
        "2024/page.png.alto.xml",
        "2025/page.png.alto.xml",
    ]
    globbed = CliRunner().invoke(app, ["convert", "out/*/page.png.json", "-f", "txt", "-o", "again"])
    assert globbed.exit_code == 0, globbed.stderr
    assert (tmp_path / "again/out/2024/page.png.txt").read_bytes() == (
        tmp_path / "out/2024/page.png.txt"
    ).read_bytes()


def test_convert_reads_json_lines(scripted: list[object], model_folder: Path, tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "in" / "two.pdf", pages=MIXED_PAGES[:2])
    direct = tmp_path / "direct"
    args = [
        "ocr",
        str(pdf),
        "-o",
        str(direct),
        "-f",
        "jsonl",
        "-f",
        "txt",
        "-f",
        "alto",
        "--model",
        str(model_folder),
    ]
    assert CliRunner().invoke(app, args).exit_code == 0
    result = CliRunner().invoke(
        app, ["convert", str(direct / "two.pdf.jsonl"), "-f", "txt", "-f", "alto", "-o", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.stderr
    for name in ("two.pdf.txt", "two.pdf.alto.xml"):
        assert (tmp_path / "c" / name).read_bytes() == (direct / name).read_bytes()


def test_convert_finds_the_input_from_any_folder(
    scripted: list[object], model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "elsewhere").mkdir()
    make_pdf(tmp_path / "in" / "two.pdf", pages=MIXED_PAGES[:2])
    monkeypatch.chdir(tmp_path / "in")
    run = CliRunner().invoke(
        app, ["ocr", "two.pdf", "-o", "../out", "-f", "json", "-f", "pdf", "--model", str(model_folder)]
    )
    assert run.exit_code == 0, run.stderr
    assert json.loads((tmp_path / "out/two.pdf.json").read_text())["path"] == str(tmp_path / "in/two.pdf")
    monkeypatch.chdir(tmp_path / "elsewhere")
    make_pdf(tmp_path / "elsewhere" / "two.pdf", pages=MIXED_PAGES[2:4])  # a file of the same name here
    result = CliRunner().invoke(app, ["convert", "../out/two.pdf.json", "-f", "pdf", "-o", "pdf"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "elsewhere/pdf/two.pdf.pdf").read_bytes() == (
        tmp_path / "out/two.pdf.pdf"
    ).read_bytes()


def test_md_and_ocr_results_share_a_folder(
    scripted: list[object], model_folder: Path, tmp_path: Path
) -> None:
    pdf = make_pdf(tmp_path / "two.pdf", pages=MIXED_PAGES[:2])
    out = tmp_path / "out"
    for task in ("md", "ocr", "md", "ocr"):
        result = CliRunner().invoke(
            app, [task, str(pdf), "-o", str(out), "-f", "json", "--model", str(model_folder)]
        )
        assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["two.pdf.json", "two.pdf.md.json"]
    assert json.loads((out / "two.pdf.md.json").read_text())["task"] == "md"
    assert json.loads((out / "two.pdf.json").read_text())["task"] == "ocr"
    assert "1 skipped" in result.stderr, "the second ocr run found its own results done"


HOSTILE = [
    # (what is done to scan.png.json's object, the one line convert answers with)
    ("pages as an object", lambda d: d.update(pages={"0": d["pages"][0]}), "pages: "),
    (
        "a string coordinate",
        lambda d: d["pages"][0]["lines"][0].update(bbox=["1", 2, 3, 4]),
        "pages/0/lines/0/bbox/0: ",
    ),
    (
        "a 5-number matrix",
        lambda d: d["pages"][0].update(pixel_to_pdf=[1, 0, 0, 1, 0]),
        "pages/0/pixel_to_pdf: ",
    ),
    ("a number as the path", lambda d: d.update(path=7), "path: 7 is not of type"),
    (
        "a negative coordinate",
        lambda d: d["pages"][0]["lines"][0].update(bbox=[-5, 0, 10, 10]),
        "pages/0/lines/0/bbox/0: -5 is less than",
    ),
    (
        "a box outside its page",
        lambda d: d["pages"][0]["lines"][0].update(bbox=[0, 0, 10**12, 10]),
        "page 1 has a box outside its",
    ),
    ("a page twice", lambda d: d.update(pages=d["pages"] * 2), "its page numbers [1, 1] repeat"),
    ("a page past the end", lambda d: d["pages"][0].update(page_number=9), "repeat or pass its 1 pages"),
    ("a lone surrogate", lambda d: d["pages"][0].update(text="\ud800"), "not Unicode (a lone surrogate)"),
]


@pytest.mark.parametrize(
    ("change", "message"), [(c, m) for _, c, m in HOSTILE], ids=[name for name, _, _ in HOSTILE]
)
def test_hostile_json_gets_one_clear_line_and_the_run_goes_on(
    transcribed: Path, change: Callable[[dict[str, object]], None], message: str
) -> None:
    good = transcribed / "direct" / "scan.png.json"
    data = json.loads(good.read_text())
    change(data)
    bad = transcribed / "bad.json"
    bad.write_text(json.dumps(data))
    result = CliRunner().invoke(
        app, ["convert", str(bad), str(good), "-f", "alto", "-f", "page", "-o", str(transcribed / "out")]
    )
    assert result.exit_code == 1, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: `{bad}` is not a result kosmos wrote (") and message in line, line
    assert "Traceback" not in result.stderr
    assert (transcribed / "out" / "scan.png.alto.xml").exists(), "the good file is converted"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
        (b'{"pages": [{"width": NaN}]}', "`NaN` is not a number JSON allows"),
        (b'{"pages": [{"width": 1e999}]}', "a number too large"),
    ],
    ids=["200,000 deep", "NaN", "infinity"],
)
def test_json_that_python_reads_badly_is_refused(transcribed: Path, content: bytes, message: str) -> None:
    bad = transcribed / "bad.json"
    bad.write_bytes(content)
    result = CliRunner().invoke(app, ["convert", str(bad), "-f", "txt"])
    assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.stderr


def test_convert_reads_only_regular_files(transcribed: Path) -> None:
    fifo = transcribed / "pipe.json"
    os.mkfifo(fifo)  # nobody writes to it: a plain open would wait for ever
    result = CliRunner().invoke(app, ["convert", str(fifo), "/dev/zero", "-f", "txt"])
    assert result.exit_code == 1
    assert f"error: `{fifo}` is not a regular file" in result.stderr
    assert "error: `/dev/zero` is not a regular file" in result.stderr


def test_convert_refuses_a_source_that_is_not_the_input(
    transcribed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct = transcribed / "direct"
    other = make_pdf(transcribed / "other" / "two.pdf", pages=MIXED_PAGES[2:4])  # same name, other bytes
    for arguments in ([], ["--source", str(other)]):
        shutil.move(transcribed / "in" / "two.pdf", transcribed / "kept.pdf") if not arguments else None
        args = [
            "convert",
            str(direct / "two.pdf.json"),
            "-f",
            "pdf",
            "-o",
            str(transcribed / "again"),
            *arguments,
        ]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1
    assert "is not the input this result was made from (size or bytes differ)" in result.stderr
    assert not (transcribed / "again" / "two.pdf.pdf").exists()
    shutil.move(transcribed / "kept.pdf", transcribed / "moved.pdf")
    right = CliRunner().invoke(app, [*args[:-1], str(transcribed / "moved.pdf")])
    assert right.exit_code == 0, right.stderr


def test_convert_never_overwrites_its_input_or_its_result(transcribed: Path) -> None:
    direct = transcribed / "direct"
    renamed = transcribed / "in" / "two.json"  # a result renamed so that its PDF would be in/two.pdf
    shutil.copy(direct / "two.pdf.json", renamed)
    result = CliRunner().invoke(app, ["convert", str(renamed), "-f", "pdf", "--overwrite"])
    assert result.exit_code == 1
    assert f"would overwrite the input `{transcribed / 'in' / 'two.pdf'}`" in result.stderr
    assert (transcribed / "in" / "two.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_path_that_is_not_utf8_round_trips(
    scripted: list[object], model_folder: Path, tmp_path: Path
) -> None:
    name = os.fsdecode(b"caf\xe9 scan.pdf")  # Latin-1 bytes: not UTF-8
    pdf = tmp_path / name
    make_pdf(tmp_path / "plain.pdf", pages=MIXED_PAGES[:1]).rename(pdf)
    out = tmp_path / "out"
    run = CliRunner().invoke(
        app, ["ocr", str(pdf), "-o", str(out), "-f", "json", "--model", str(model_folder)]
    )
    assert run.exit_code == 0, run.stderr
    (result,) = out.glob("*.json")
    data = json.loads(result.read_text())
    assert data["path"] is None and bytes.fromhex(data["path_bytes"]) == os.fsencode(str(pdf))
    converted = CliRunner().invoke(app, ["convert", str(result), "-f", "pdf", "-o", str(tmp_path / "c")])
    assert converted.exit_code == 0, converted.stderr
