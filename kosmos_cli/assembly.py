"""Gather page results into documents and write each one once, whatever order its pages finish in.

`Assembly` is shared by the local run loop (`jobs.run_job`) and the Ray driver
(`kosmos_cli.distributed`): it keeps the progress logs that make runs resumable and the manifest
that records finished documents, stages page-scoped outputs (`--draw`), writes outputs atomically
to the output store (a local folder or an object store), prints to stdout in input order, counts
the summary and reports to the reporter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from kosmos_cli.config import Job
from kosmos_cli.errors import InputError, KosmosError
from kosmos_cli.manifest import Manifest, Record, identify, progress_name, staging_folder
from kosmos_cli.rasterize import PageError
from kosmos_cli.reporting import Reporter, Summary
from kosmos_cli.sandbox import ReaderStopped, Sandbox
from kosmos_cli.stores import LocalStore, location_identity, output_store
from kosmos_cli.values import Document, InputIdentity, PageInfo, PageResult, Status, Task, failed_result
from kosmos_cli.writers import DocumentWriter, PageWriter, WriterOptions, check_destination, get_writer

# Per-page results of unfinished documents (`PageResult.to_dict`), in `manifest.PROGRESS_FOLDER`.
PROGRESS_VERSION = 3


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
    source: bytes | None = None  # the document's bytes as read, for the formats that `needs_source`


class Outputs:
    """Where a run's outputs go: an output store with its manifest, read once per run, or stdout."""

    def __init__(self, job: Job, stdout: BinaryIO, *, model: str = "") -> None:
        self.job = job
        self.stdout = stdout
        self.writers = job_writers(job, model=model)
        check_destination(self.writers, to_stdout=job.output_dir is None)
        # Whether a format is built from the documents' own bytes (`DocumentWriter.needs_source`).
        self.needs_source = any(isinstance(w, DocumentWriter) and w.needs_source for w in self.writers)
        self.store = output_store(job.output_dir) if job.output_dir is not None else None
        self.manifest: Manifest | None = None  # read on entering
        self._inputs: dict[str, Document] = {}  # every input of the run by `location_identity`

    def __enter__(self) -> Outputs:
        """Check the output location can be written (and lock a local one), then read its manifest."""
        if self.store is not None:
            self.store.open_for_run()
            self.manifest = Manifest(self.store)
        return self

    def __exit__(self, *_: object) -> None:
        if self.store is not None:
            self.store.close()

    def set_inputs(self, documents: Sequence[Document]) -> None:
        """Note every document of the run, skipped ones included: no output may overwrite one."""
        self._inputs = {location_identity(document.path): document for document in documents}

    def files(self) -> list[str]:
        """Return the local output folder and every output the manifest records, for walks to skip."""
        if not isinstance(self.store, LocalStore) or self.manifest is None:
            return []
        root = self.store.root
        return [str(root)] + [str(root / name) for name in self.manifest.owners]

    def names(self, document: Document, page_count: int | None, page_indices: Iterable[int]) -> list[str]:
        """Return the names of every output a document gets (page-scoped ones only with `page_count`)."""
        names = [writer.file_name(document) for writer in self.writers if isinstance(writer, DocumentWriter)]
        if page_count is not None:
            for writer in self.writers:
                if isinstance(writer, PageWriter):
                    names += [writer.file_name(document, index, page_count) for index in page_indices]
        return names

    def clash(self, names: Iterable[str]) -> InputError | None:
        """Return the error for the first output that would overwrite an input file, else None."""
        if self.store is None:
            return None
        for name in names:
            document = self._inputs.get(self.store.identity(name))
            if document is not None:
                return InputError(
                    f"`{self.store.describe(name)}` would overwrite the input `{document.display_name}`",
                    hint="choose another -o",
                )
        return None


def job_writers(job: Job, *, model: str = "") -> list[DocumentWriter | PageWriter]:
    """Return the writer of each of the job's formats, with the job's options and the model's name."""
    options = WriterOptions(password=job.password, numbered=job.numbered, model=model)
    return [get_writer(name, task=job.task, options=options) for name in job.formats]


class Assembly:
    """Gather page results per document, in any order, and write each document once it has every page.

    A result for a page that already has one is ignored, so a page redone after a lost worker is
    neither counted nor written twice. Whatever one document causes while it is written (a writer
    that fails on it, a full disk) fails that document alone.
    """

    def __init__(
        self,
        documents: Sequence[Document],
        outputs: Outputs,
        reporter: Reporter,
        summary: Summary,
        *,
        sandbox: Sandbox | None = None,
    ) -> None:
        self.job = outputs.job
        self.outputs = outputs
        self.reporter = reporter
        self.summary = summary
        self.sandbox = sandbox  # builds the formats made from the document's bytes (searchable PDF)
        self.writers = outputs.writers
        self.page_writers = [writer for writer in outputs.writers if isinstance(writer, PageWriter)]
        self.order = _StdoutOrder(documents, outputs)
        self.states: dict[Document, _DocumentState] = {}
        self.store = outputs.store
        if self.store is not None and not self.job.overwrite:
            self.store.expect_logs([progress_name(document, self.job.task) for document in documents])

    def start(self, document: Document) -> set[int]:
        """Begin a document: note what its input is now, load the pages an earlier run finished."""
        progress = progress_name(document, self.job.task) if self.store is not None else None
        state = self.states[document] = _DocumentState(document, progress)
        if self.store is None or progress is None:
            return set()
        try:
            state.identity = identify(document)
        except OSError as error:
            self.document_error(document, InputError(f"cannot read `{document.display_name}`: {error}"))
            return set()
        state.results, state.progress_started = self._load_progress(state)
        if self.page_writers and not state.results:
            # pages a killed run staged, unlogged
            self.store.remove_folder(staging_folder(document, self.job.task))
        for result in state.results.values():
            self.summary.pages_resumed += 1
            self.reporter.page_done(result)
        return set(state.results)

    def source(self, document: Document, data: bytes) -> None:
        """Keep the document's bytes, as the reader read them, for the formats built from them."""
        state = self.states[document]
        if not state.failed and not state.finished:
            state.source = data
            self._finish_if_complete(state)  # on Ray, the bytes may come after the last page

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
        """Report a page that could not be read (and the pages `also` failing with it, in the same line)
        and mark each failed in place."""
        state = self.states[document]
        pages = [index for index in error.page_indices if index not in state.results]
        if not pages or state.failed or state.finished:
            return
        self.reporter.error(error)
        for page_index in pages:
            info = PageInfo(document, page_index, error.page_count, 0, 0)
            self._record(state, failed_result(info, self.job.task, error))
            self.summary.pages_failed += 1
        self._finish_if_complete(state)

    def unselected(self, document: Document, message: str) -> None:
        """Leave out a document --pages selects no page of, with a warning; nothing is written for it."""
        if self._abandon(document):
            self.reporter.warning(message)
            self.summary.documents_unselected += 1

    def document_error(self, document: Document, error: KosmosError) -> None:
        """Report a document that cannot be read or written; nothing more is written for it."""
        if self._abandon(document):
            self.reporter.error(error)
            self.summary.documents_failed += 1

    def _abandon(self, document: Document) -> bool:
        """Drop what is held of a document that will not be written; False if it was dropped or written."""
        state = self.states[document]
        if state.failed or state.finished:
            return False
        state.failed = True
        state.results.clear()
        state.source = None
        self.order.abandon(document)
        return True

    def page_done(self, result: PageResult, pieces: dict[str, bytes] | None = None) -> bool:
        """Take one page's result and its page-scoped files by format; False if the page had a result."""
        state = self.states[result.info.document]
        if state.finished or result.info.page_index in state.results:
            return False
        if pieces and self.store is not None and not state.failed:
            try:
                for format_name, data in pieces.items():
                    staged = _staged(state.document, self.job.task, result.info.page_index, format_name)
                    self.store.write(staged, data)
            except KosmosError as error:
                self.document_error(state.document, error)
                return False
        self._record(state, result)
        _count_result(result, self.summary, self.reporter)
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
        self.order.stream_page(result)
        if self.store is None or state.progress is None or (state.listed and not state.pending):
            return  # the document is written next: progress would be removed straight away
        try:
            if not state.progress_started:
                self.store.append_log(state.progress, json.dumps(self._progress_header(state)))
                state.progress_started = True
            self.store.append_log(state.progress, json.dumps(result.to_dict(), ensure_ascii=True))
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
            self.store.remove_folder(staging_folder(state.document, self.job.task))
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
            self.store.remove_folder(staging_folder(state.document, self.job.task))
            self.store.remove_log(state.progress)
            return {}, False
        results: dict[int, PageResult] = {}
        for line in lines[1:]:
            try:
                result = PageResult.from_dict(json.loads(line), state.document)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if result.status is not Status.FAILED:
                results[result.info.page_index] = result
        return results, True

    def _finish_if_complete(self, state: _DocumentState) -> None:
        if not state.listed or state.pending or state.failed or state.finished:
            return
        if self.outputs.needs_source and state.source is None and self.store is not None:
            return  # on Ray, the document's bytes may come after its last page
        results = [state.results[i] for i in sorted(state.results)]
        if self.store is None:
            state.finished = True
            state.results = {}
            self.order.ready(state.document, results)
            self._count_finished(results)
            return
        rendered: list[tuple[str, bytes]] = []
        failed_formats: list[InputError] = []  # a format that cannot be built costs only itself
        for writer in self.writers:
            if isinstance(writer, DocumentWriter):
                try:
                    rendered.append((writer.file_name(state.document), self._render(writer, results, state)))
                except InputError as error:
                    failed_formats.append(error)
        try:
            for name, data in rendered:
                self.store.write(name, data)
            placed = self._place_pages(state.document, results)
            manifest = self.outputs.manifest
            if manifest is not None and state.identity is not None:
                names = tuple(name for name, _ in rendered) + tuple(placed)
                record = Record(
                    state.identity, state.document.name, self.job.task.value, self.job.fingerprint, names
                )
                manifest.add(record)
            if self.page_writers:
                self.store.remove_folder(staging_folder(state.document, self.job.task))
            if state.progress is not None and state.progress_started and not failed_formats:
                self.store.remove_log(state.progress)  # kept otherwise: a rerun rebuilds without the model
        except KosmosError as error:
            self.document_error(state.document, error)
            return
        state.finished = True
        state.results, state.source = {}, None  # a long run holds only the documents in flight
        for failure in failed_formats:
            self.reporter.error(failure)
        if failed_formats:
            self.summary.documents_failed += 1
        else:
            self._count_finished(results)

    def _count_finished(self, results: list[PageResult]) -> None:
        """Count a written document: done, or failed when not one of its pages could be read."""
        if all(result.status is Status.FAILED for result in results):
            self.summary.documents_failed += 1
        else:
            self.summary.documents_done += 1

    def _place_pages(self, document: Document, results: list[PageResult]) -> list[str]:
        """Move a finished document's staged page-scoped files into place; return their names."""
        assert self.store is not None
        placed = []
        for writer in self.page_writers:
            for result in results:
                info = result.info
                name = writer.file_name(document, info.page_index, info.page_count)
                clash = self.outputs.clash([name])
                if clash is not None:
                    raise clash
                if self.store.move(_staged(document, self.job.task, info.page_index, writer.format), name):
                    placed.append(name)
        return placed

    def _render(self, writer: DocumentWriter, results: list[PageResult], state: _DocumentState) -> bytes:
        return render_document(
            writer, results, state.source, identity=state.identity, sandbox=self.sandbox,
            page_timeout=self.job.page_timeout,
        )  # fmt: skip


def render_document(
    writer: DocumentWriter,
    results: Sequence[PageResult],
    source: bytes | None,
    *,
    identity: InputIdentity | None = None,
    sandbox: Sandbox | None,
    page_timeout: float,
) -> bytes:
    """Render one document in one format; formats built from its bytes run in `sandbox`, time-limited."""
    if not writer.needs_source:
        return writer.render(results, identity=identity)
    if source is None:
        document = results[0].info.document
        raise InputError(f"`{document.display_name}` was not read whole for the {writer.format} output")
    if sandbox is None:
        return writer.render(results, source, identity)
    try:
        return sandbox.call(writer.render, results, source, identity, timeout=page_timeout * len(results))
    except ReaderStopped as error:
        document = results[0].info.document
        raise InputError(
            f"building the {writer.format} output of `{document.display_name}` {error.message}",
            hint=error.hint,
        ) from None


def _count_result(result: PageResult, summary: Summary, reporter: Reporter) -> None:
    summary.pages_done += 1
    if result.status is Status.FAILED:
        summary.pages_failed += 1
        where = f"`{result.info.document.display_name}` page {result.info.page_number}"
        reporter.error(KosmosError(f"{where}: {result.error}", hint=result.hint))
    elif result.status is Status.TRUNCATED:
        summary.pages_truncated += 1
        reason = result.truncation or "truncated"
        reporter.warning(
            f"`{result.info.document.display_name}` page {result.info.page_number} is truncated: {reason}"
        )
    reporter.page_done(result)


def _staged(document: Document, task: Task, page_index: int, format_name: str) -> str:
    return f"{staging_folder(document, task)}/{page_index}.{format_name}"


class _StdoutOrder:
    """Print finished documents to stdout in input order, whatever order they finish in.

    A format whose pages stand alone (jsonl) is printed page by page as pages finish instead.
    """

    def __init__(self, documents: Sequence[Document], outputs: Outputs) -> None:
        self.pending = list(documents)
        self.done: dict[Document, list[PageResult]] = {}
        writer = outputs.writers[0] if outputs.store is None and outputs.writers else None
        self.writer = writer if isinstance(writer, DocumentWriter) else None
        self.streaming = self.writer is not None and self.writer.streams
        self.separate = len(documents) > 1
        self.stdout = outputs.stdout

    def stream_page(self, result: PageResult) -> None:
        if self.streaming:
            assert self.writer is not None
            self.stdout.write(self.writer.stream_page(result))
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
