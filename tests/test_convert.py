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
        (b"not json", "is not a JSON file kosmos wrote"),
        (b'{"pages": [], "schema_version": 99}', "is not a JSON file kosmos wrote"),
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
        app, ["convert", str(direct / "two.pdf.json"), "-f", "md", "-o", str(tmp_path / "converted")]
    )
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "converted" / "two.pdf.md").read_bytes() == (direct / "two.pdf.md").read_bytes()
    wrong = CliRunner().invoke(
        app, ["convert", str(direct / "two.pdf.json"), "-f", "alto", "-o", str(tmp_path / "x")]
    )
    assert wrong.exit_code == 2
    assert wrong.stderr.splitlines()[0] == "error: format `alto` cannot hold `md` results"
