"""Run a whole job: documents in, finished output files (or stdout) out, resumable and failure-isolated."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from kosmos_cli.config import Settings
from kosmos_cli.errors import InputError, KosmosError
from kosmos_cli.manifest import (
    InputIdentity,
    Manifest,
    Record,
    fingerprint,
    identify,
    input_path,
    progress_name,
    staging_folder,
    unchanged,
)
from kosmos_cli.model import Runner
from kosmos_cli.model.loading import output_settings
from kosmos_cli.pages import PageSelection
from kosmos_cli.rasterize import PageError, count_pages, iter_pages
from kosmos_cli.sandbox import DEFAULT_PAGE_TIMEOUT, ReaderStopped, Sandbox
from kosmos_cli.stores import OutputStore, location_identity, output_store
from kosmos_cli.transcribe import failed_result, prefetch, transcribe_pages
from kosmos_cli.values import Document, Line, Page, PageInfo, PageResult, Status, Task, safe_text
from kosmos_cli.writers import Writer, draw_file_name, get_writer, render_drawing

logger = logging.getLogger(__name__)

PROGRESS_VERSION = 2  # per-page results of unfinished documents, in `manifest.PROGRESS_FOLDER`


@dataclass(frozen=True)
class Job:
    """What to do with every document: the task, formats, where outputs go and how pages are read."""

    task: Task
    formats: tuple[str, ...]
    output_dir: Path | str | None = None  # a folder or object-store URI (`files.output_store`); None: stdout
    draw: bool = False
    numbered: bool = False
    pages: PageSelection | None = None
    dpi: float | None = None
    password: str | None = None
    overwrite: bool = False
    fingerprint: str = ""  # every setting that changes outputs (`manifest.fingerprint`)
    page_timeout: float = DEFAULT_PAGE_TIMEOUT  # seconds to open or render one page


@dataclass
class Summary:
    """Counts for the end-of-run line."""

    documents_done: int = 0
    documents_skipped: int = 0
    documents_failed: int = 0
    pages_done: int = 0
    pages_resumed: int = 0
    pages_failed: int = 0
    pages_truncated: int = 0
    unsupported: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @property
    def failed(self) -> bool:
        """Whether anything failed, so the exit code must say so."""
        return self.documents_failed > 0 or self.pages_failed > 0


class Reporter(Protocol):
    """Where the job reports progress and problems (the CLI draws a bar and prints lines)."""

    def add_total(self, pages: int) -> None:
        """Add pages to the expected total."""

    def page_done(self, result: PageResult) -> None:
        """Count one finished page."""

    def error(self, error: KosmosError) -> None:
        """Report one failed input or page."""

    def warning(self, message: str) -> None:
        """Report something the user should know that is not a failure."""


@dataclass
class _DocumentState:
    document: Document
    progress: str | None  # the progress log's name in the output store; None when printing to stdout
    identity: InputIdentity | None = None  # the input as it was when its pages were read
    progress_started: bool = False  # the log has its header
    results: dict[int, PageResult] = field(default_factory=dict)
    pending: set[int] = field(default_factory=set)  # page indices handed to the model, not yet back
    listed: bool = False  # every page has been read from the source (or listed, on Ray)
    failed: bool = False
    finished: bool = False  # outputs written (or printed); later results for it are duplicates


@dataclass(frozen=True)
class Pages:
    """A document's page count and the 0-based indices of the pages to read."""

    count: int
    selected: tuple[int, ...]


def probe(
    documents: Sequence[Document], job: Job, reporter: Reporter, summary: Summary, *, sandbox: Sandbox
) -> dict[Document, Pages]:
    """Open and count every document and apply --pages, before any model loads.

    Returns each readable document's pages; the others are reported, counted as failed and left out.
    """
    found: dict[Document, Pages] = {}
    for document in documents:
        try:
            count = count_pages(document, password=job.password, sandbox=sandbox)
            selected = (
                job.pages.indices(count, source=f"`{document.display_name}`") if job.pages else range(count)
            )
        except InputError as error:
            reporter.error(error)
            summary.documents_failed += 1
            continue
        found[document] = Pages(count, tuple(selected))
    return found


def planned_outputs(document: Document, job: Job, pages: Pages | None) -> list[str]:
    """Return the names of every output a document gets (its drawings only when its pages are known)."""
    names = [make_writer(name, job).file_name(document) for name in job.formats]
    if job.draw and pages is not None:
        names += [draw_file_name(document, index, pages.count) for index in pages.selected]
    return names


def plan(
    documents: Sequence[Document],
    job: Job,
    reporter: Reporter,
    summary: Summary,
    *,
    pages: dict[Document, Pages] | None = None,
    inputs: Sequence[Document] | None = None,
) -> list[Document]:
    """Return the documents to transcribe: those not already done, as the manifest says.

    A document is skipped (and counted) when every output it would get exists and the manifest
    recorded it from the same input, unchanged, with this job's fingerprint. A document one of
    whose outputs exists but was not recorded from its input (another input's output, or a file
    kosmos did not write) is refused with one error line, unless --overwrite; one that would
    overwrite any of `inputs` (default: `documents`) is refused even then.
    """
    if job.output_dir is None:
        return list(documents)
    store = output_store(job.output_dir)
    manifest = Manifest(store)
    outputs = {d: planned_outputs(d, job, pages.get(d) if pages else None) for d in documents}
    present = store.existing(name for names in outputs.values() for name in names)
    guard = _InputGuard(documents if inputs is None else inputs, store)
    todo: list[Document] = []
    skipped: list[Document] = []
    for document in documents:
        names = outputs[document]
        clash = guard.clashes(names)
        if clash is not None:
            reporter.error(guard.error(*clash))
            summary.documents_failed += 1
            continue
        owners = [manifest.owner(name) for name in names]
        path = input_path(document)
        foreign = [
            (name, owner)
            for name, owner in zip(names, owners, strict=True)
            if name in present and (owner is None or owner.input.path != path)
        ]
        if foreign and not job.overwrite:
            name, owner = foreign[0]
            where = store.describe(name)
            source = (
                "kosmos did not write it"
                if owner is None
                else f"it was written from `{safe_text(owner.input.path)}`"
            )
            reporter.error(
                InputError(
                    f"`{where}` exists and {source}; `{document.display_name}` is not transcribed",
                    hint="choose another -o, or pass --overwrite to replace it",
                )
            )
            summary.documents_failed += 1
            continue
        if _is_done(document, names, owners, present, job):
            summary.documents_skipped += 1
            skipped.append(document)
        else:
            todo.append(document)
    store.expect_logs([progress_name(document) for document in skipped])
    for document in skipped:  # what a run saved before it was killed after writing the outputs
        if store.read_log(progress_name(document)):
            store.remove_folder(staging_folder(document))
            store.remove_log(progress_name(document))
    return todo


def _staged(document: Document, page_index: int) -> str:
    return f"{staging_folder(document)}/{page_index}.png"


def _is_done(
    document: Document, names: list[str], owners: list[Record | None], present: set[str], job: Job
) -> bool:
    """Whether every output exists, one manifest record wrote them all, and it was this job on this input."""
    record = owners[0] if owners else None
    return (
        not job.overwrite
        and record is not None
        and all(owner is record for owner in owners)
        and all(name in present for name in names)
        and record.fingerprint == job.fingerprint
        and record.task == job.task.value
        and unchanged(record.input, document)
    )


def job_fingerprint(job: Job, settings: Settings, *, resolve: bool = True) -> str:
    """Return the fingerprint of every setting that changes a job's outputs (`Job.fingerprint`).

    `resolve=False` takes the device and dtype as asked, without looking at this machine's.
    """
    from kosmos_cli import __version__

    pages = [list(pair) for pair in job.pages.ranges] if job.pages else None
    described = {"kosmos": __version__, "task": job.task.value, "dpi": job.dpi, "pages": pages}
    described |= {"tiling": True, "numbered": job.numbered, **output_settings(settings, resolve=resolve)}
    return fingerprint(described)


def make_writer(name: str, job: Job) -> Writer:
    """Build the writer for one format with the job's options."""
    return get_writer(name, task=job.task, password=job.password)


def run_job(
    documents: Sequence[Document],
    runner: Runner,
    job: Job,
    reporter: Reporter,
    stdout: BinaryIO,
    summary: Summary,
    *,
    inputs: Sequence[Document] | None = None,
    pages: dict[Document, Pages] | None = None,
    sandbox: Sandbox | None = None,
) -> None:
    """Transcribe every document and write its outputs, reporting as it goes.

    `inputs` are every document of the run, skipped ones included (default: `documents`): no
    output may overwrite one of them. `pages` are what `probe` found. Documents are opened and
    rendered in `sandbox` (default: a new one) under `job.page_timeout`.
    """
    with contextlib.ExitStack() as stack:
        reader = sandbox or stack.enter_context(Sandbox(timeout=job.page_timeout))
        builder = stack.enter_context(Sandbox(timeout=job.page_timeout))  # starts only if a format needs it
        assembly = Assembly(documents, job, reporter, stdout, summary, inputs=inputs, sandbox=builder)
        todo = assembly.admit(documents)
        if pages is not None:
            reporter.add_total(sum(len(pages[d].selected) for d in todo if d in pages))
        else:
            threading.Thread(
                target=_count, args=(todo, job, reporter), name="kosmos-count", daemon=True
            ).start()
        resumed: set[int] = set()

        def pages_to_do() -> Iterator[tuple[Page, Document]]:
            nonlocal resumed
            for kind, document, payload in prefetch(_read(todo, job, reader)):
                if kind == "start":
                    resumed = assembly.start(document)
                elif kind == "page":
                    assert isinstance(payload, Page)
                    if payload.info.page_index in resumed:
                        continue
                    assembly.expect(document, [payload.info.page_index])
                    yield payload, document
                elif kind == "page_error":
                    assert isinstance(payload, PageError)
                    assembly.page_error(document, payload)
                elif kind == "error":
                    assert isinstance(payload, InputError)
                    assembly.document_error(document, payload)
                elif kind == "end":
                    assembly.listed(document)

        for page, _, result in transcribe_pages(pages_to_do(), runner, task=job.task):
            drawing = None
            if job.draw and job.output_dir is not None and result.status is not Status.FAILED:
                drawing = render_drawing(page, result, numbered=job.numbered)
            assembly.page_done(result, drawing=drawing)
        assembly.close()


class Assembly:
    """Gather page results per document, in any order, and write each document once it has every page.

    Shared by `run_job` and the Ray driver (`kosmos_cli.distributed`): it keeps the progress logs
    that make runs resumable and the manifest that records finished documents, writes outputs
    atomically to the output store (a local folder or an object store), prints to stdout in input
    order, counts the summary and reports to the reporter. A result for a page that already has one
    is ignored, so a page redone after a lost worker is neither counted nor written twice. No
    output is written where it would overwrite an input. Whatever one document causes while it is
    written (a writer that fails on it, a full disk) fails that document alone.
    """

    def __init__(
        self,
        documents: Sequence[Document],
        job: Job,
        reporter: Reporter,
        stdout: BinaryIO,
        summary: Summary,
        *,
        inputs: Sequence[Document] | None = None,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.job = job
        self.reporter = reporter
        self.summary = summary
        self.sandbox = sandbox  # builds the formats that read the input again (searchable PDF)
        self.writers = [make_writer(name, job) for name in job.formats]
        self.order = _StdoutOrder(documents, job, self.writers, stdout)
        self.states: dict[Document, _DocumentState] = {}
        self.store = output_store(job.output_dir) if job.output_dir is not None else None
        self.manifest = Manifest(self.store) if self.store is not None else None
        self.guard = _InputGuard(documents if inputs is None else inputs, self.store)

    def admit(self, documents: Sequence[Document]) -> list[Document]:
        """Refuse (report, count failed) documents whose outputs would overwrite an input; return the rest.

        `--draw` images are checked as they come, since their names depend on the page count.
        """
        admitted = []
        for document in documents:
            names = [writer.file_name(document) for writer in self.writers]
            clash = self.guard.clashes(names)
            if clash is None:
                admitted.append(document)
            else:
                self.states[document] = _DocumentState(document, None)
                self.document_error(document, self.guard.error(*clash))
        if self.store is not None and not self.job.overwrite:
            self.store.expect_logs([progress_name(document) for document in admitted])
        return admitted

    def start(self, document: Document) -> set[int]:
        """Begin a document: note what its input is now, load the pages an earlier run finished."""
        progress = progress_name(document) if self.store is not None else None
        state = self.states[document] = _DocumentState(document, progress)
        if self.store is None or progress is None:
            return set()
        try:
            state.identity = identify(document)
        except OSError as error:
            self.document_error(document, InputError(f"cannot read `{document.display_name}`: {error}"))
            return set()
        state.results, state.progress_started = self._load_progress(state)
        if self.job.draw and not state.results:
            self.store.remove_folder(staging_folder(document))  # pictures a killed run staged, unlogged
        for result in state.results.values():
            self.summary.pages_resumed += 1
            self.reporter.page_done(result)
        return set(state.results)

    def expect(self, document: Document, page_indices: Iterable[int]) -> None:
        """Note pages handed to the model; the document is written once each has a result."""
        state = self.states[document]
        state.pending.update(index for index in page_indices if index not in state.results)

    def listed(self, document: Document) -> None:
        """Note that every page of a document has been expected or reported; write it if it is complete."""
        state = self.states[document]
        state.listed = True
        self._finish_if_complete(state)

    def page_error(self, document: Document, error: PageError) -> None:
        """Report a page that could not be read and mark it failed in place."""
        state = self.states[document]
        if error.page_index in state.results or state.failed or state.finished:
            return
        self.reporter.error(error)
        self._record(state, failed_result(_failed_info(document, error), self.job.task, error.message))
        self.summary.pages_failed += 1
        self._finish_if_complete(state)

    def document_error(self, document: Document, error: KosmosError) -> None:
        """Report a document that cannot be read or written; nothing more is written for it."""
        state = self.states[document]
        if state.failed or state.finished:
            return
        self.reporter.error(error)
        state.failed = True
        state.results.clear()
        self.order.abandon(document)
        self.summary.documents_failed += 1

    def page_done(self, result: PageResult, *, drawing: bytes | None = None) -> bool:
        """Take one page's result (and its --draw PNG); return False if the page already had one."""
        state = self.states[result.info.document]
        if state.finished or result.info.page_index in state.results:
            return False
        if drawing is not None and self.store is not None and not state.failed:
            try:
                self.store.write(_staged(state.document, result.info.page_index), drawing)
            except KosmosError as error:
                self.document_error(state.document, error)
                return False
        self._record(state, result)
        _count_result(result, self.summary, self.reporter)
        if self.job.output_dir is None and self.job.formats == ("jsonl",):
            self.order.stream_page(result)
        self._finish_if_complete(state)
        return True

    def close(self) -> None:
        """Print whatever stdout still holds back (nothing, unless a page went missing)."""
        self.order.flush_all()

    def _record(self, state: _DocumentState, result: PageResult) -> None:
        state.pending.discard(result.info.page_index)
        if state.failed:
            return
        state.results[result.info.page_index] = result
        if self.store is None or state.progress is None or (state.listed and not state.pending):
            return  # the document is written next: progress would be removed straight away
        try:
            if not state.progress_started:
                self.store.append_log(state.progress, json.dumps(self._progress_header(state)))
                state.progress_started = True
            self.store.append_log(state.progress, json.dumps(_result_to_json(result), ensure_ascii=True))
        except KosmosError as error:
            self.document_error(state.document, error)

    def _progress_header(self, state: _DocumentState) -> dict[str, Any]:
        identity = state.identity.to_dict() if state.identity is not None else None
        return {"kosmos_progress": PROGRESS_VERSION, "fingerprint": self.job.fingerprint, "input": identity}

    def _load_progress(self, state: _DocumentState) -> tuple[dict[int, PageResult], bool]:
        """Read finished pages back, and whether the log can be added to (its header is this job's).

        A torn line is skipped (that page is redone); a log with a torn header, or from other
        settings or another input, is discarded with a warning and every page redone.
        """
        assert self.store is not None and state.progress is not None
        if self.job.overwrite:
            self.store.remove_folder(staging_folder(state.document))
            self.store.remove_log(state.progress)
            return {}, False
        lines = self.store.read_log(state.progress)
        if not lines:
            return {}, False
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            header = None
        if header != self._progress_header(state):
            self.reporter.warning(
                f"discarding the saved pages of `{state.document.display_name}`: "
                "they were made from other settings or another version of the input"
            )
            self.store.remove_folder(staging_folder(state.document))
            self.store.remove_log(state.progress)
            return {}, False
        results: dict[int, PageResult] = {}
        for line in lines[1:]:
            try:
                result = _result_from_json(json.loads(line), state.document)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if result.status is not Status.FAILED:
                results[result.info.page_index] = result
        return results, True

    def _finish_if_complete(self, state: _DocumentState) -> None:
        if not state.listed or state.pending or state.failed or state.finished:
            return
        results = [state.results[i] for i in sorted(state.results)]
        if self.store is None:
            state.finished = True
            state.results = {}
            self.order.ready(state.document, results)
            self.summary.documents_done += 1
            return
        try:
            rendered = [
                (writer.file_name(state.document), self._render(writer, results)) for writer in self.writers
            ]
            for name, data in rendered:
                self.store.write(name, data)
            drawings = self._place_drawings(state.document, results)
            if self.manifest is not None and state.identity is not None:
                outputs = tuple(name for name, _ in rendered) + tuple(drawings)
                record = Record(
                    state.identity, state.document.name, self.job.task.value, self.job.fingerprint, outputs
                )
                self.manifest.add(record)
            if drawings:
                self.store.remove_folder(staging_folder(state.document))
            if state.progress is not None and state.progress_started:
                self.store.remove_log(state.progress)
        except KosmosError as error:
            self.document_error(state.document, error)
            return
        state.finished = True
        state.results = {}  # a long run holds only the documents in flight
        self.summary.documents_done += 1

    def _place_drawings(self, document: Document, results: list[PageResult]) -> list[str]:
        """Move a finished document's staged --draw pictures into place; return their names."""
        assert self.store is not None
        if not self.job.draw:
            return []
        placed = []
        for result in results:
            info = result.info
            name = draw_file_name(document, info.page_index, info.page_count)
            clash = self.guard.clashes([name])
            if clash is not None:
                raise self.guard.error(*clash)
            if self.store.move(_staged(document, info.page_index), name):
                placed.append(name)
        return placed

    def _render(self, writer: Writer, results: list[PageResult]) -> bytes:
        """Render one format; formats that read the input again do it in the sandbox, time-limited."""
        if not writer.reads_input or self.sandbox is None:
            return writer.render(results)
        try:
            return self.sandbox.call(writer.render, results, timeout=self.job.page_timeout * len(results))
        except ReaderStopped as error:
            document = results[0].info.document
            raise InputError(
                f"building the {writer.format} output of `{document.display_name}` {error.message}",
                hint=error.hint,
            ) from None


class _InputGuard:
    """Tell whether an output would land on an input file (an -o inside the input tree)."""

    def __init__(self, inputs: Sequence[Document], store: OutputStore | None) -> None:
        self.store = store
        self.inputs: dict[str, Document] | None = None  # identity -> document, built on first use
        self._documents = inputs

    def clashes(self, names: Iterable[str]) -> tuple[str, Document] | None:
        """Return the first output (relative name) that is an input file, with that input; else None."""
        if self.store is None:
            return None
        if self.inputs is None:
            self.inputs = {location_identity(d.path): d for d in self._documents}
        for name in names:
            document = self.inputs.get(self.store.identity(name))
            if document is not None:
                return name, document
        return None

    def error(self, name: str, document: Document) -> InputError:
        """Return the one-line error for an output that would overwrite an input."""
        assert self.store is not None
        return InputError(
            f"`{self.store.describe(name)}` would overwrite the input `{document.display_name}`",
            hint="choose another -o",
        )


def _count(documents: Sequence[Document], job: Job, reporter: Reporter) -> None:
    """Count pages ahead of the model so the progress bar has a total; unreadable files count as 0."""
    for document in documents:
        try:
            count = count_pages(document, password=job.password)
            reporter.add_total(len(job.pages.indices(count)) if job.pages else count)
        except KosmosError:
            continue  # reported when the document is read


def _read(
    documents: Sequence[Document], job: Job, reader: Sandbox | None
) -> Iterator[tuple[str, Document, object]]:
    """Yield ("start" | "page" | "page_error" | "error" | "end", document, payload) events, in order."""
    for document in documents:
        yield "start", document, None
        try:
            pages = iter_pages(document, pages=job.pages, dpi=job.dpi, password=job.password, sandbox=reader)
            for page in pages:
                yield ("page_error" if isinstance(page, PageError) else "page"), document, page
        except InputError as error:
            yield "error", document, error
        yield "end", document, None


def _count_result(result: PageResult, summary: Summary, reporter: Reporter) -> None:
    summary.pages_done += 1
    if result.status is Status.FAILED:
        summary.pages_failed += 1
        reporter.error(
            KosmosError(
                f"`{result.info.document.display_name}` page {result.info.page_number}: {result.error}"
            )
        )
    elif result.status is Status.TRUNCATED:
        summary.pages_truncated += 1
        reason = result.extra.get("truncation", "truncated")
        reporter.warning(
            f"`{result.info.document.display_name}` page {result.info.page_number} is truncated: {reason}"
        )
    reporter.page_done(result)


def _failed_info(document: Document, error: PageError) -> PageInfo:
    return PageInfo(document, error.page_index, error.page_count, 0, 0)


def _result_to_json(result: PageResult) -> dict[str, Any]:
    info = result.info
    return {
        "page_index": info.page_index,
        "page_count": info.page_count,
        "width": info.width,
        "height": info.height,
        "dpi": info.dpi,
        "pixel_to_pdf": info.pixel_to_pdf,
        "task": result.task.value,
        "text": result.text,
        "lines": [{"text": line.text, "polygon": line.polygon} for line in result.lines],
        "raw": result.raw,
        "status": result.status.value,
        "error": result.error,
        "token_count": result.token_count,
        "extra": result.extra,
    }


def _result_from_json(data: dict[str, Any], document: Document) -> PageResult:
    matrix = data["pixel_to_pdf"]
    info = PageInfo(
        document,
        data["page_index"],
        data["page_count"],
        data["width"],
        data["height"],
        data["dpi"],
        tuple(matrix) if matrix else None,
    )
    lines = tuple(
        Line(line["text"], tuple(tuple(p) for p in line["polygon"]) if line["polygon"] else None)  # type: ignore[arg-type]
        for line in data["lines"]
    )
    return PageResult(
        info,
        Task(data["task"]),
        data["text"],
        lines,
        data["raw"],
        Status(data["status"]),
        data["error"],
        data["token_count"],
        data["extra"],
    )


class _StdoutOrder:
    """Print finished documents to stdout in input order, whatever order they finish in."""

    def __init__(
        self, documents: Sequence[Document], job: Job, writers: list[Writer], stdout: BinaryIO
    ) -> None:
        self.pending = list(documents)
        self.done: dict[Document, list[PageResult]] = {}
        self.writer = writers[0] if job.output_dir is None else None
        self.streaming = job.formats == ("jsonl",)
        self.separate = len(documents) > 1
        self.stdout = stdout

    def stream_page(self, result: PageResult) -> None:
        assert self.writer is not None
        self.stdout.write(self.writer.render_page(result))  # type: ignore[attr-defined]
        self.stdout.flush()

    def ready(self, document: Document, results: list[PageResult]) -> None:
        self.done[document] = results
        self.flush_ready()

    def flush_ready(self) -> None:
        while self.pending and self.pending[0] in self.done:
            document = self.pending.pop(0)
            results = self.done.pop(document)
            if self.writer is None or self.streaming:
                continue
            if self.separate:
                self.stdout.write(self.writer.document_header(document))
            self.stdout.write(self.writer.render(results))
            self.stdout.flush()

    def abandon(self, document: Document) -> None:
        """Forget a document that failed, so later ones are not held back."""
        self.pending.remove(document)
        self.flush_ready()

    def flush_all(self) -> None:
        """Print whatever is still held back (there is nothing unless a page went missing)."""
        self.pending = [d for d in self.pending if d in self.done]
        self.flush_ready()
