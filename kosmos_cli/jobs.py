"""The steps of a job on one machine: count pages (`probe`), decide what is done (`plan`), run (`run_job`).

`kosmos_cli.api.transcribe_files` calls them in that order; the Ray driver plans with `plan` too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kosmos_cli.assembly import Assembly, Outputs
from kosmos_cli.config import Job, Settings
from kosmos_cli.errors import InputError, UsageError
from kosmos_cli.manifest import Record, fingerprint, input_path, progress_name, staging_folder, unchanged
from kosmos_cli.model import Runner
from kosmos_cli.rasterize import PageError, count_pages, document_source, iter_pages
from kosmos_cli.reporting import Reporter, Summary
from kosmos_cli.sandbox import Sandbox
from kosmos_cli.text_layer import layer_result
from kosmos_cli.transcribe import prefetch, transcribe_pages
from kosmos_cli.values import Document, Page, Task, safe_text
from kosmos_cli.writers import render_pages

NAME_BYTES = 255  # longest file or folder name most file systems take (NAME_MAX)


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
    A document --pages selects no page of is left out with a warning (`unselected`); a selection
    that leaves no page of any readable document is a UsageError.
    """
    found: dict[Document, Pages] = {}
    unselected = 0
    for document in documents:
        try:
            count = count_pages(document, password=job.password, sandbox=sandbox)
        except InputError as error:
            reporter.error(error)
            summary.documents_failed += 1
            continue
        selected = selected_pages(job, count)
        if not selected:
            reporter.warning(unselected_message(job, document, count))
            summary.documents_unselected += 1
            unselected += 1
            continue
        found[document] = Pages(count, selected)
    if unselected and not found:
        raise UsageError(
            f"--pages {job.pages} selects no page of any input", hint="the first page is 1; see each warning"
        )
    return found


def selected_pages(job: Job, count: int) -> tuple[int, ...]:
    """Return the 0-based indices --pages selects in a document of `count` pages (all without --pages)."""
    if job.pages is None:
        return tuple(range(count))
    return tuple(job.pages.indices(count))


def unselected_message(job: Job, document: Document, count: int) -> str:
    """Say that --pages selects no page of a document, which is skipped."""
    pages = "page" if count == 1 else "pages"
    return f"`{document.display_name}` has {count} {pages}: --pages {job.pages} selects none of them; skipped"


def plan(
    documents: Sequence[Document],
    outputs: Outputs,
    reporter: Reporter,
    summary: Summary,
    *,
    pages: dict[Document, Pages] | None = None,
) -> list[Document]:
    """Return the documents to transcribe: those not already done, as the manifest says.

    A document is skipped (and counted) when every output it would get exists and the manifest
    recorded it from the same input, unchanged, with this job's fingerprint. A document one of
    whose outputs exists but was not recorded from its input (another input's output, or a file
    kosmos did not write) is refused with one error line, unless --overwrite; one that would
    overwrite an input of the run (`Outputs.set_inputs`) is refused even then. Page-scoped outputs
    are checked only where `pages` says how many pages a document has.
    """
    store, manifest, job = outputs.store, outputs.manifest, outputs.job
    if store is None or manifest is None:
        return list(documents)
    names_of = {}
    for document in documents:
        found = pages.get(document) if pages else None
        names = outputs.names(document, found.count if found else None, found.selected if found else ())
        too_long = next((name for name in names if _too_long(name)), None)
        if too_long is not None:
            reporter.error(
                InputError(
                    f"`{document.display_name}` would be written as `{too_long[:60]}...`, a name longer than"
                    f" file systems allow ({NAME_BYTES} bytes a part)",
                    hint="rename the input, or pass --root to drop folders from its name",
                )
            )
            summary.documents_failed += 1
            continue
        names_of[document] = names
    documents = list(names_of)
    present = store.existing(name for names in names_of.values() for name in names)
    todo: list[Document] = []
    skipped: list[Document] = []
    for document in documents:
        names = names_of[document]
        clash = outputs.clash(names)
        if clash is not None:
            reporter.error(clash)
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
            source = (
                "kosmos did not write it"
                if owner is None
                else f"it was written from `{safe_text(owner.input.path)}`"
            )
            message = (
                f"`{store.describe(name)}` exists and {source}; `{document.display_name}` is not transcribed"
            )
            reporter.error(InputError(message, hint="choose another -o, or pass --overwrite to replace it"))
            summary.documents_failed += 1
            continue
        if _is_done(document, names, owners, present, job):
            summary.documents_skipped += 1
            skipped.append(document)
        else:
            todo.append(document)
    store.expect_logs([progress_name(document, job.task) for document in skipped])
    for document in skipped:  # what a run saved before it was killed after writing the outputs
        if store.read_log(progress_name(document, job.task)):
            store.remove_folder(staging_folder(document, job.task))
            store.remove_log(progress_name(document, job.task))
    return todo


def _too_long(name: str) -> bool:
    """Whether a part of an output's name is longer than file systems allow."""
    return any(len(os.fsencode(part)) > NAME_BYTES for part in name.split("/"))


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
    from kosmos_cli.model.loading import output_settings

    pages = [list(pair) for pair in job.pages.ranges] if job.pages else None
    described = {"kosmos": __version__, "task": job.task.value, "dpi": job.dpi, "pages": pages}
    described |= {"tiling": True, "numbered": job.numbered, **output_settings(settings, resolve=resolve)}
    if job.task is Task.OCR:
        described["text_layer"] = job.text_layer
    return fingerprint(described)


def run_job(
    documents: Sequence[Document],
    runner: Runner,
    outputs: Outputs,
    reporter: Reporter,
    summary: Summary,
    *,
    pages: dict[Document, Pages],
    sandbox: Sandbox,
) -> None:
    """Transcribe planned documents and write their outputs, reporting as it goes.

    `pages` are what `probe` found; documents are opened and rendered again in `sandbox`, under the
    job's page timeout. A page whose result comes from its own text layer (`text_layer.layer_result`)
    never reaches `runner`.
    """
    job = outputs.job
    with Sandbox(timeout=job.page_timeout) as builder:  # starts only if a format needs it
        assembly = Assembly(documents, outputs, reporter, summary, sandbox=builder)
        reporter.add_total(sum(len(pages[document].selected) for document in documents))
        resumed: set[int] = set()

        def pages_to_do() -> Iterator[tuple[Page, Document]]:
            nonlocal resumed
            for event in prefetch(read_pages(documents, pages, job, sandbox, sources=outputs.needs_source)):
                document, payload = event.document, event.payload
                if event.kind == "start":
                    resumed = assembly.start(document)
                elif isinstance(payload, bytes):
                    assembly.source(document, payload)
                elif isinstance(payload, Page):
                    if payload.info.page_index in resumed:
                        continue
                    assembly.expect(document, [payload.info.page_index])
                    own = layer_result(payload, job)
                    if own is None:
                        yield payload, document
                    else:  # the page's own text: no model
                        assembly.page_done(own, render_pages(outputs.writers, payload, own))
                elif event.kind == "page_error":
                    assert isinstance(payload, PageError)
                    assembly.page_error(document, payload)
                elif event.kind == "error":
                    assert isinstance(payload, InputError)
                    assembly.document_error(document, payload)
                else:
                    assembly.listed(document)

        for page, _, result in transcribe_pages(pages_to_do(), runner, task=job.task):
            assembly.page_done(result, render_pages(outputs.writers, page, result))
        assembly.close()


@dataclass(frozen=True)
class ReadEvent:
    """One step of reading documents: a document starts, a page or its error, a document error, its end."""

    kind: str  # "start", "source", "page", "page_error", "error" or "end"
    document: Document
    payload: bytes | Page | PageError | InputError | None = None


def read_pages(
    documents: Sequence[Document],
    pages: dict[Document, Pages],
    job: Job,
    reader: Sandbox,
    *,
    sources: bool = False,
) -> Iterator[ReadEvent]:
    """Read the selected pages of each document in `reader`, in order, as events.

    With `sources`, each document's bytes come first, read in the same process as its pages.
    """
    for document in documents:
        yield ReadEvent("start", document)
        try:
            if sources:
                yield ReadEvent("source", document, document_source(document, reader))
            read = iter_pages(
                document,
                page_indices=pages[document].selected,
                dpi=job.dpi,
                password=job.password,
                sandbox=reader,
                text_layer=job.reads_text_layer,
            )
            for page in read:
                yield ReadEvent("page_error" if isinstance(page, PageError) else "page", document, page)
        except InputError as error:
            yield ReadEvent("error", document, error)
        yield ReadEvent("end", document)
