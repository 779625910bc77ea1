"""The README's Python examples run as written, on the tiny model: the front door cannot drift (issue 23).

Each ```python block is executed in a folder holding the files it names (`scans/`, `receipt.png`,
`report.pdf`), with the hub id replaced by the tiny checkpoint and the token budget cut to keep it quick.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from inputs import PdfPage, make_image, make_pdf

from kosmos_cli.model import runner

SCRIPTED_KOSMOS = Path(__file__).resolve().parent / "scripted_kosmos.py"

README = Path(__file__).resolve().parent.parent / "README.md"
SERVER = "localhost:8000"  # examples of `kosmos serve`'s clients: tests/test_server.py runs them against one
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
BLOCKS = [block for block in EXAMPLES if SERVER not in block]


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


CONSOLE = re.findall(r"```console\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
# Commands that need what a test machine has not: a cluster, object stores, the network, root.
ELSEWHERE = (
    "--ray",
    "s3://",
    "gs://",
    "pip install",
    "sudo ",
    "ocrmypdf ",
    "make ",
    "ray start",
    "download",
    SERVER,
)
COMMANDS = [
    (number, [line[2:].split("  #")[0].strip() for line in block.splitlines() if line.startswith("$ ")])
    for number, block in enumerate(CONSOLE)
]
RUNNABLE = [
    (number, lines)
    for number, lines in COMMANDS
    if lines and not any(w in " ".join(lines) for w in ELSEWHERE)
]


@pytest.mark.parametrize(("number", "lines"), RUNNABLE, ids=[f"console block {n + 1}" for n, _ in RUNNABLE])
def test_a_readme_console_example_runs(
    number: int, lines: list[str], model_folder: Path, tmp_path: Path
) -> None:
    """The README's shell examples, each block in a folder of its own, with the model scripted."""
    make_image(tmp_path / "page.png")
    make_pdf(tmp_path / "scan.pdf", pages=[PdfPage(text="one"), PdfPage(text="two")])
    make_pdf(tmp_path / "scans" / "2024" / "a.pdf", pages=[PdfPage(text="March")])
    make_pdf(tmp_path / "scans" / "b.pdf", pages=[PdfPage(text="b")])
    make_pdf(tmp_path / "reports" / "r.pdf", pages=[PdfPage(text="born digital")])
    shim = tmp_path / "bin" / "kosmos"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{SCRIPTED_KOSMOS}" "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "KOSMOS_MODEL": str(model_folder)}
    env["KOSMOS_TEST_SECONDS_PER_PAGE"] = "0"
    for line in lines:
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, timeout=300)
        assert done.returncode == 0, (line, done.stderr.decode())
    for claimed in re.findall(r"(?:out|archive)/[\w./-]+\.(?:txt|png|xml|md|json)", CONSOLE[number]):
        assert (tmp_path / claimed).exists(), claimed  # what the comment beside the command says it writes
