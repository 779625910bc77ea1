"""`kosmos convert`: every format again from kosmos's own JSON, byte for byte, without the model."""

from __future__ import annotations

import json
import shutil
import sys
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
        f"error: cannot read the input `{transcribed / 'in' / 'two.pdf'}` for the searchable PDF"
        in lost.stderr
    )
    assert "hint: pass its new place with --source" in lost.stderr
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
