"""Render page results in each output format: a registry of writers keyed by format name.

Two kinds of writer, both in the one registry:

- a `DocumentWriter` turns the results of one whole document into the bytes of one file
  (`render`, named by `file_name`); where those bytes go is the caller's business. One whose file is
  its pages' pieces joined (jsonl) also renders a page alone (`stream_page`), so stdout can carry
  pages as they finish;
- a `PageWriter` turns one page, pixels and result, into a file of its own (`render_page`, named by
  `file_name`). It runs where the pixels are (the job loop, a Ray worker); its files are staged
  until the document is complete, then moved into place with the document's other outputs.

Results may include failed and truncated pages; each format marks them in place (see its module):
`text` (md, txt), `data` (json, jsonl), `hocr`, `alto`, `page_xml` (page), `searchable_pdf` (pdf),
`chunks`, `drawing` (`--draw`), `looking` (`--attention`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from kosmos_cli.errors import UsageError
from kosmos_cli.pages import page_number
from kosmos_cli.values import Document, InputIdentity, Page, PageResult, Task

Identity = InputIdentity | None  # what an input was when it was read, where known (`render`)


@dataclass(frozen=True)
class WriterOptions:
    """The options of a job that change what a writer writes."""

    password: str | None = None  # opens encrypted PDF inputs, for formats that copy their pages
    numbered: bool = False  # --numbered: number the boxes drawn by --draw
    model: str = ""  # the model that transcribed, for formats that record it (ALTO)
    task: Task = Task.OCR  # the task whose results are written (`get_writer` sets it): JSON names by it


class Writer(ABC):
    """One output format: the tasks it holds and how it is asked for."""

    format: ClassVar[str]  # name in the registry and after --format, e.g. "md"
    tasks: ClassVar[frozenset[Task]]  # tasks whose results this format can hold
    option: ClassVar[str] = ""  # how users ask for it, for messages; default `--format NAME`
    needs_folder: ClassVar[str | None] = None  # what it writes when stdout cannot take it, e.g. "a PDF file"
    media_type: ClassVar[str] = "application/octet-stream"  # what its files are, for HTTP (`kosmos serve`)

    def __init__(self, options: WriterOptions | None = None) -> None:
        self.options = options or WriterOptions()

    @classmethod
    def asked_as(cls) -> str:
        """Return how users ask for this format: `--format pdf`, `--draw`."""
        return cls.option or f"--format {cls.format}"

    def check(self, results: Sequence[PageResult]) -> list[PageResult]:
        """Return the results sorted by page, checking they are one document's and of a task held here."""
        if not results:
            raise ValueError("no page results to render")
        document = results[0].info.document
        for result in results:
            if result.info.document != document:
                raise ValueError(f"results of `{document.path}` and `{result.info.document.path}` mixed")
            if result.task not in self.tasks:
                raise ValueError(f"the {self.format} format cannot hold {result.task.value} results")
        return sorted(results, key=lambda result: result.info.page_index)


class DocumentWriter(Writer):
    """A format with one file per document."""

    extension: ClassVar[str]  # file name suffix, e.g. ".md"
    # Built from the document's own bytes as the reader read them (`render`'s `source`); they are parsed
    # again, so the caller runs `render` where a hostile file can be stopped.
    needs_source: ClassVar[bool] = False
    streams: ClassVar[bool] = (
        False  # its file is its pages' `stream_page` pieces: stdout prints pages as they finish
    )

    def file_name(self, document: Document) -> str:
        """Return the output path of a document, relative to the output folder."""
        return document.name + self.extension

    def document_header(self, document: Document) -> bytes:
        """Return what goes before a document when several share one stream (stdout)."""
        return b""

    @abstractmethod
    def render(
        self, results: Sequence[PageResult], source: bytes | None = None, identity: Identity = None
    ) -> bytes:
        """Render the results of one document, in any order, as this format's bytes.

        `source` is the document's bytes, for the formats that `needs_source`; `identity`, what the
        input was when it was read, for the formats that record it (JSON); the others ignore them.
        """

    def stream_page(self, result: PageResult) -> bytes:
        """Return one page's part of `render`, for printing pages as they finish (formats that `streams`)."""
        raise NotImplementedError(f"the {self.format} format cannot print pages one by one")


class PageWriter(Writer):
    """A format with one file per page, made from the page's result (and its pixels, if `needs_pixels`)."""

    needs_pixels: ClassVar[bool] = True  # False: `render_page` works without `page` (kosmos convert)

    @abstractmethod
    def file_name(self, document: Document, page_index: int, page_count: int) -> str:
        """Return the output path of one page's file, relative to the output folder."""

    @abstractmethod
    def render_page(self, page: Page | None, result: PageResult) -> bytes | None:
        """Render one page's file; None when the page gets none (it failed).

        `page` may be None for a writer that does not `needs_pixels`.
        """


WRITERS: dict[str, type[DocumentWriter] | type[PageWriter]] = {}


def register(cls: type[Writer]) -> type[Writer]:
    """Add a writer class to the registry under its format name."""
    assert issubclass(cls, (DocumentWriter, PageWriter))
    WRITERS[cls.format] = cls
    return cls


def get_writer(name: str, *, task: Task, options: WriterOptions | None = None) -> DocumentWriter | PageWriter:
    """Return the writer for a format name, checking that it can hold the task's results."""
    cls = WRITERS.get(name)
    if cls is None:
        raise UsageError(f"unknown format `{name}`", hint=f"use one of: {', '.join(formats_for(task))}")
    if task not in cls.tasks:
        raise UsageError(
            f"format `{name}` cannot hold `{task.value}` results",
            hint=f"for `kosmos {task.value}` use one of: {', '.join(formats_for(task))}",
        )
    return cls(replace(options or WriterOptions(), task=task))


def formats_for(task: Task) -> list[str]:
    """Return the `--format` names that can hold a task's results, in registry order."""
    return [name for name, cls in WRITERS.items() if task in cls.tasks and not cls.option]


def page_file_name(document: Document, page_index: int, page_count: int, suffix: str) -> str:
    """Name one page's file: `NAME` + `suffix` for a one-page document, else `NAME-p001` + `suffix` (1-based).

    The name never equals an input's: walks skip kosmos's page suffixes, and NAME keeps the input's.
    """
    if page_count == 1:
        return f"{document.name}{suffix}"
    return f"{document.name}-p{page_number(page_index):03}{suffix}"


def render_pages(writers: Sequence[Writer], page: Page, result: PageResult) -> dict[str, bytes]:
    """Render the page-scoped files of one page, by format: what runs where the page's pixels are."""
    pieces = {}
    for writer in writers:
        if isinstance(writer, PageWriter) and (piece := writer.render_page(page, result)) is not None:
            pieces[writer.format] = piece
    return pieces


def check_destination(writers: Sequence[Writer], *, to_stdout: bool) -> None:
    """Refuse formats that stdout cannot take, and more than one format on stdout."""
    if not to_stdout:
        return
    for writer in writers:
        if writer.needs_folder is not None:
            message = f"{writer.asked_as()} writes {writer.needs_folder} and needs an output folder"
            raise UsageError(message, hint="add -o DIR")
    if len(writers) > 1:
        raise UsageError("several formats need an output folder; stdout takes one", hint="add -o DIR")


# The formats register themselves on import, in the order `formats_for` lists them.
# isort: off
from kosmos_cli.writers import text  # noqa: E402, F401  (md, txt)
from kosmos_cli.writers import data  # noqa: E402, F401  (json, jsonl)
from kosmos_cli.writers import hocr  # noqa: E402, F401
from kosmos_cli.writers import alto  # noqa: E402, F401
from kosmos_cli.writers import page_xml  # noqa: E402, F401  (page)
from kosmos_cli.writers import searchable_pdf  # noqa: E402, F401  (pdf)
from kosmos_cli.writers import chunks  # noqa: E402, F401
from kosmos_cli.writers import drawing  # noqa: E402, F401  (--draw)
from kosmos_cli.writers import looking  # noqa: E402, F401  (--attention)
# isort: on
