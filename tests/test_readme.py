"""The README's Python examples run as written, on the tiny model: the front door cannot drift (issue 23).

Each ```python block is executed in a folder holding the files it names (`scans/`, `receipt.png`,
`report.pdf`), with the hub id replaced by the tiny checkpoint and the token budget cut to keep it quick.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from inputs import PdfPage, make_image, make_pdf

from kosmos_cli.model import runner

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_a_readme_python_example_runs(
    number: int,
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    make_image(tmp_path / "scans" / "2024" / "a.png")
    make_pdf(tmp_path / "scans" / "b.pdf", pages=[PdfPage()] * 4)
    make_image(tmp_path / "receipt.png")
    make_pdf(tmp_path / "report.pdf", pages=[PdfPage()] * 3)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "DEFAULT_MAX_NEW_TOKENS", 6)  # the tiny model's pages, quickly
    code = BLOCKS[number].replace('"microsoft/kosmos-2.5"', repr(str(tiny_checkpoint)))
    exec(compile(code, f"README.md python example {number + 1}", "exec"), {})
    printed = capsys.readouterr().out
    assert printed, "every example prints what it got"
    if "transcribe_files(" in code:
        assert printed.split()[:3] == ["2", "4", "False"]  # a.png's one page and b.pdf's pages 1-3
        assert (tmp_path / "out" / "2024" / "a.png.txt").is_file()
