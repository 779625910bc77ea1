"""Output names are fixed by the input (issue 23): a function of a document's path and how it was given,
never of which other files share the run.

| given as | named |
|---|---|
| a folder `scans` | its path below the folder: `scans/2024/a.pdf` is `2024/a.pdf` |
| a file (on the command line, from a glob, in --from-list), inside the current folder | its path from the current folder: `scans/2024/a.pdf` |
| a file outside the current folder | its file name (two such files of one name clash: a usage error, which `--root` settles) |
| anything, with `--root DIR` | its path below DIR (an input outside DIR is an error) |
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kosmos_cli.discovery import discover, name_clashes

FOLDERS = st.lists(st.sampled_from(["a", "b", "Scans 2024", "ü"]), max_size=2)
FILES = st.tuples(FOLDERS, st.sampled_from(["p.png", "q.pdf", "r.tif"])).map(
    lambda t: "/".join([*t[0], t[1]])
)
TREES = st.lists(FILES, min_size=1, max_size=8, unique_by=str.casefold).filter(
    lambda tree: not any(other.startswith(path + "/") for path in tree for other in tree)
)


def names(arguments: list[str], **options: object) -> dict[str, str]:
    """Each document's path, relative to the current folder, and its output name."""
    found = discover(arguments, **options)  # type: ignore[arg-type]
    assert found.errors == []
    return {os.path.relpath(document.path): document.name for document in found.documents}


@contextlib.contextmanager
def in_a_new_folder() -> Iterator[None]:
    """Run the block in a fresh temporary folder (hypothesis examples cannot share tmp_path)."""
    with tempfile.TemporaryDirectory() as folder:
        here = os.getcwd()
        os.chdir(folder)
        try:
            yield
        finally:
            os.chdir(here)


def plant(tree: list[str]) -> None:
    for path in tree:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"%PDF-1.4\n" if path.endswith(".pdf") else b"\x89PNG\r\n\x1a\n")


@settings(max_examples=60, deadline=None)
@given(tree=TREES, data=st.data())
def test_a_named_file_keeps_its_path_whatever_else_is_in_the_run(
    tree: list[str], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        here = os.getcwd()
        os.chdir(folder)
        try:
            plant(tree)
            first = data.draw(st.lists(st.sampled_from(tree), min_size=1, unique=True))
            second = data.draw(st.lists(st.sampled_from(tree), min_size=1, unique=True))
            for subset in (first, second):
                assert names(subset) == {path: path for path in subset}
            listed = Path("list.txt")
            listed.write_text("\n".join(os.path.abspath(path) for path in second) + "\n")
            assert names([], from_list=str(listed)) == {path: path for path in second}, (
                "absolute, inside here"
            )
        finally:
            os.chdir(here)


@settings(max_examples=60, deadline=None)
@given(tree=TREES, data=st.data())
def test_a_folder_is_mirrored_below_itself_whatever_else_is_in_the_run(
    tree: list[str], data: st.DataObject
) -> None:
    with in_a_new_folder():
        plant([f"in/{path}" for path in tree] + ["elsewhere/x.png"])
        alone = names(["in"])
        assert alone == {f"in/{path}": path for path in tree}
        others = data.draw(st.lists(st.sampled_from(["elsewhere", "elsewhere/x.png"]), unique=True))
        together = names(["in", *others])
        assert {path: name for path, name in together.items() if path.startswith("in/")} == alone


def test_a_file_outside_the_current_folder_is_named_by_its_file_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    plant(["scans/2024/a.png", "scans/2025/a.png", "work/b.pdf"])
    monkeypatch.chdir(tmp_path / "work")
    assert [d.name for d in discover(["../scans/2024/a.png", "b.pdf"]).documents] == ["a.png", "b.pdf"]
    assert [d.name for d in discover([str(tmp_path / "scans/2024/a.png")]).documents] == ["a.png"]
    clash = name_clashes(discover(["../scans/2024/a.png", "../scans/2025/a.png"]).documents)
    assert clash is not None and clash.hint is not None and "--root" in clash.hint
    settled = discover(["../scans/2024/a.png", "../scans/2025/a.png"], root="../scans").documents
    assert [d.name for d in settled] == ["2024/a.png", "2025/a.png"]


def test_root_names_everything_below_it_and_refuses_what_lies_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    plant(["scans/2024/a.png", "scans/b.pdf", "other/c.png"])
    found = discover(["scans/2024/a.png", "scans", "other/c.png"], root="scans")
    assert [d.name for d in found.documents] == ["2024/a.png", "b.pdf"]
    assert [e.message for e in found.errors] == ["`other/c.png` is not below --root `scans`"]
