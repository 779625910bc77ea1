"""The library's front door: `transcribe_files` runs a whole job, `Transcriber` returns results in memory.

The CLI, the benchmarks and the tests all go through `transcribe_files`; with `ray` it runs the
same job on a Ray cluster:

    inputs -> discovery -> probe (count pages, --pages) -> plan (skip, redo, refuse)
           -> model (loaded only when a page needs it) -> run_job or run_on_ray -> Summary
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from kosmos_cli.config import (
    DEFAULT_FORMATS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PAGE_TIMEOUT,
    Job,
    RayOptions,
    Settings,
    default_model,
)
from kosmos_cli.errors import InputError, KosmosError, UsageError, first_line
from kosmos_cli.model import Runner
from kosmos_cli.pages import PageSelection, parse_pages
from kosmos_cli.reporting import LogReporter, Reporter, Summary
from kosmos_cli.values import Document, Page, PageInfo, PageResult, Task, failed_result

MAX_RESULT_BYTES = 1 << 30  # largest JSON or JSON lines file `kosmos convert` reads (1 GiB)

if TYPE_CHECKING:
    from PIL import Image

    from kosmos_cli.assembly import Outputs
    from kosmos_cli.discovery import Discovery
    from kosmos_cli.jobs import Pages
    from kosmos_cli.sandbox import Sandbox
    from kosmos_cli.writers.data import Results


def transcribe_files(
    inputs: Sequence[str | os.PathLike[str] | Document],
    *,
    task: Task | str,
    formats: Sequence[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    from_list: str | None = None,
    root: str | os.PathLike[str] | None = None,
    pages: str | PageSelection | None = None,
    dpi: float | None = None,
    password: str | None = None,
    page_timeout: float = DEFAULT_PAGE_TIMEOUT,
    text_layer: str = "auto",
    draw: bool = False,
    numbered: bool = False,
    overwrite: bool = False,
    settings: Settings | None = None,
    ray: RayOptions | None = None,
    runner: Runner | None = None,
    reporter: Reporter | None = None,
    stdout: BinaryIO | None = None,
    reader: Sandbox | None = None,
) -> Summary:
    """Transcribe files, folders, globs and `-` (stdin) to output files, or to stdout; return the counts.

    A `Document` among `inputs` is read as it is: its path, its name (the outputs' stem) and its label
    (what messages and outputs call it; `kosmos serve` names uploads by the name the client gave).

    - `formats`: writer names (`writers.formats_for(task)`); default: md, or txt for ocr. `draw`
      adds a PNG per page with the boxes drawn (`numbered`: with line numbers).
    - `output`: a folder or an object-store URI; None prints the one format to `stdout` (default:
      this process's), documents in input order. A rerun into the same folder skips what is done.
      Outputs are named by each input's path (`discovery.discover`); `root`: below this folder.
    - `pages`: 1-based, e.g. `"1-3,7,10-"`; `dpi`, `password`: how PDFs are rendered and opened;
      `page_timeout`: seconds one page may take to open or render.
    - `text_layer` (ocr): `auto` takes a PDF page's lines from its own text where it has real text,
      `ignore` always runs the model, `only` never does (`text_layer` module).
    - `settings`: the model and how it generates (default: the default model, device auto);
      `runner`: a model already loaded, used instead of loading one from `settings`. With
      `settings.attention`, an `output` folder also gets the attention pictures (`writers.looking`).
    - `ray`: run on a Ray cluster; inputs may then be object-store URIs.
    - `reporter`: told of progress, warnings and every failed input or page (default: logging).
    - `reader`: the reader process inputs are opened in, kept by a caller that runs many jobs
      (`kosmos serve`); its time limit is the one that applies. Default: one started for this call.

    A failed input or page is reported and counted, and the run goes on (`Summary.failed`).
    Raises UsageError for impossible requests and ModelLoadError when the model cannot be loaded.
    """
    from kosmos_cli.assembly import Outputs
    from kosmos_cli.discovery import Discovery, discover, name_clashes, remove_stale_spools
    from kosmos_cli.stores import output_location

    task = Task(task)
    reporter = reporter or LogReporter()
    settings = settings or Settings(model=default_model())
    looked = ("attention", "heat") if settings.attention and output is not None else ()
    pictures = (*(("draw",) if draw else ()), *looked)
    names = (*(formats or (DEFAULT_FORMATS[task],)), *pictures)
    job = Job(
        task=task,
        formats=tuple(dict.fromkeys(names)),  # each once, in the order asked
        output_dir=output_location(output) if output is not None else None,
        numbered=numbered,
        pages=parse_pages(pages) if isinstance(pages, str) else pages,
        dpi=dpi,
        password=password,
        overwrite=overwrite,
        page_timeout=page_timeout,
        text_layer=text_layer,
    )
    given = [location for location in inputs if isinstance(location, Document)]
    locations = [os.fspath(location) for location in inputs if not isinstance(location, Document)]
    if not locations and not given and from_list is None:
        raise UsageError("no inputs given", hint="name files or folders, `-` for stdin, or --from-list FILE")
    if ray is not None:
        from kosmos_cli.distributed import require_ray

        require_ray()
    summary = Summary()
    with Outputs(job, stdout or sys.stdout.buffer, model=settings.model) as outputs:
        remove_stale_spools()
        discovery = (
            discover(
                locations,
                from_list=from_list,
                exclude=outputs.files(),
                uris=ray is not None,
                root=os.fspath(root) if root is not None else None,
            )
            if locations or from_list is not None
            else Discovery([], [], [])
        )
        discovery.documents[:0] = given
        if job.output_dir is not None and (clash := name_clashes(discovery.documents)) is not None:
            raise clash
        _report_discovery(discovery, reporter, summary)
        outputs.set_inputs(discovery.documents)
        if ray is None:
            _run_here(discovery.documents, outputs, settings, runner, reporter, summary, reader)
        else:
            _run_on_ray(discovery.documents, outputs, settings, ray, reporter, summary)
    return summary


def _run_here(
    documents: Sequence[Document],
    outputs: Outputs,
    settings: Settings,
    runner: Runner | None,
    reporter: Reporter,
    summary: Summary,
    reader: Sandbox | None,
) -> None:
    """Count every document's pages, plan, and run on this machine; the model loads when a page needs it."""
    from kosmos_cli.jobs import job_fingerprint, plan, probe, run_job
    from kosmos_cli.sandbox import Sandbox

    kept = contextlib.nullcontext(reader) if reader is not None else None
    with kept or Sandbox(timeout=outputs.job.page_timeout) as sandbox:
        found = probe(documents, outputs.job, reporter, summary, sandbox=sandbox)
        readable = [document for document in documents if document in found]
        if readable and outputs.store is not None:  # resolving the device imports torch: only if needed
            outputs.job = replace(outputs.job, fingerprint=job_fingerprint(outputs.job, settings))
        todo = plan(readable, outputs, reporter, summary, pages=found)
        if not todo:
            return
        if runner is None:
            runner = _lazy_runner(settings, reporter)
        run_job(todo, runner, outputs, reporter, summary, pages=found, sandbox=sandbox)


def _lazy_runner(settings: Settings, reporter: Reporter) -> Runner:
    """Return a runner that loads `settings`' model when the first page needs it (`LazyRunner`)."""
    from kosmos_cli.model import LazyRunner

    def load() -> Runner:
        from kosmos_cli.model.loading import load_runner

        reporter.loading(f"loading model `{settings.model}`")
        return load_runner(settings)

    return LazyRunner(load, settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)


def _run_on_ray(
    documents: Sequence[Document],
    outputs: Outputs,
    settings: Settings,
    options: RayOptions,
    reporter: Reporter,
    summary: Summary,
) -> None:
    """Plan here, then run on Ray: the workers count and read the documents, the model loads there.

    This plan refuses what must not be written before Ray starts; `run_on_ray` plans the rest again
    with the settings as its workers resolve them.
    """
    from kosmos_cli.distributed import run_on_ray
    from kosmos_cli.jobs import job_fingerprint, plan

    if documents and outputs.store is not None:  # as asked: the workers' hardware may differ from this
        outputs.job = replace(outputs.job, fingerprint=job_fingerprint(outputs.job, settings, resolve=False))
    todo = plan(documents, outputs, reporter, summary)
    if todo:
        run_on_ray(todo, outputs, settings, reporter, summary, options)


def _report_discovery(discovery: Discovery, reporter: Reporter, summary: Summary) -> None:
    for error in discovery.errors:
        reporter.error(error)
    summary.documents_failed += len(discovery.errors)
    for empty in discovery.empty:
        reporter.warning(f"no images or PDFs found in `{empty}`")
    summary.unsupported = discovery.unsupported


class Transcriber:
    """Kosmos-2.5 as a Python call: load once, then transcribe images and documents in memory."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    @classmethod
    def load(cls, settings: Settings | None = None, **options: object) -> Transcriber:
        """Load a checkpoint (hub id or folder) from `Settings` or its fields as keywords.

        `Transcriber.load(model="microsoft/kosmos-2.5", device="cuda")`; raises ModelLoadError with
        a hint, UsageError for an option that names nothing.
        """
        from kosmos_cli.model.loading import load_runner

        if settings is None:
            settings = Settings(**{"model": default_model(), **options})  # type: ignore[arg-type]
        elif options:
            settings = replace(settings, **options)  # type: ignore[arg-type]
        return cls(load_runner(settings))

    def transcribe(
        self,
        sources: Iterable[Image.Image | str | os.PathLike[str]],
        *,
        task: Task | str = Task.MD,
        pages: str | PageSelection | None = None,
        dpi: float | None = None,
        password: str | None = None,
        page_timeout: float = DEFAULT_PAGE_TIMEOUT,
        text_layer: str = "auto",
    ) -> list[PageResult]:
        """Transcribe PIL images and files (images, PDFs, multi-page TIFFs) and return every page's result.

        `text_layer` is `kosmos ocr --text-layer`: with `auto`, a PDF page with real text of its own
        gives its lines from the file (`result.text_source`); md always runs the model.

        Results come in input order, a document's selected pages in page order (`result.info.page_number`).
        A page that cannot be read or transcribed is a result with `status` FAILED and its `error`.
        Raises InputError for a file that cannot be opened at all; `pages` past a document's end
        selects the pages it has, and UsageError when it leaves no page of any document.
        """
        from kosmos_cli.jobs import probe, read_pages
        from kosmos_cli.rasterize import PageError
        from kosmos_cli.sandbox import Sandbox
        from kosmos_cli.text_layer import layer_result
        from kosmos_cli.transcribe import transcribe_pages

        task = Task(task)
        job = Job(
            task=task,
            formats=(),
            pages=parse_pages(pages) if isinstance(pages, str) else pages,
            dpi=dpi,
            password=password,
            page_timeout=page_timeout,
            text_layer=text_layer,
        )
        items = [
            Document(os.fspath(source), Path(source).name)
            if isinstance(source, (str, os.PathLike))
            else source.convert("RGB")
            for source in sources
        ]
        documents = [item for item in items if isinstance(item, Document)]
        slots: list[PageResult | None] = []  # one per page, in order; None until transcribed

        def work(sandbox: Sandbox, found: dict[Document, Pages]) -> Iterator[tuple[Page, int]]:
            events = read_pages(documents, found, job, sandbox)
            for number, item in enumerate(items, start=1):
                if not isinstance(item, Document):
                    label = f"image {number}"
                    slots.append(None)
                    yield (
                        Page(PageInfo(Document(label, label), 0, 1, item.width, item.height), item),
                        len(slots) - 1,
                    )
                    continue
                for event in events:
                    payload = event.payload
                    if isinstance(payload, Page):
                        own = layer_result(payload, job)
                        slots.append(own)
                        if own is None:
                            yield payload, len(slots) - 1
                    elif event.kind == "page_error":
                        assert isinstance(payload, PageError)
                        for page_index in payload.page_indices:
                            info = PageInfo(item, page_index, payload.page_count, 0, 0)
                            slots.append(failed_result(info, task, payload))
                    elif event.kind == "error":
                        assert isinstance(payload, InputError)
                        raise payload
                    elif event.kind == "end":
                        break

        with Sandbox(timeout=page_timeout) as sandbox:
            found = probe(documents, job, _Raise(), Summary(), sandbox=sandbox)
            for _, slot, result in transcribe_pages(work(sandbox, found), self.runner, task=task):
                slots[slot] = result
        return [result for result in slots if result is not None]


class _Raise:
    """A Reporter that raises the first error it is told of."""

    def loading(self, message: str) -> None:
        """Nothing to say."""

    def add_total(self, pages: int) -> None:
        """No progress to show."""

    def page_done(self, result: PageResult) -> None:
        """No progress to show."""

    def error(self, error: KosmosError) -> None:
        """Raise it."""
        raise error

    def warning(self, message: str) -> None:
        """Nothing to say."""


def convert_files(
    results: Sequence[str | os.PathLike[str]],
    *,
    formats: Sequence[str],
    output: str | os.PathLike[str] | None = None,
    source: str | os.PathLike[str] | None = None,
    password: str | None = None,
    overwrite: bool = False,
    page_timeout: float = DEFAULT_PAGE_TIMEOUT,
    reporter: Reporter | None = None,
) -> Summary:
    """Write other formats from kosmos's own JSON or JSON lines output, without the model.

    `results` are files (`-f json` or `-f jsonl`), folders (walked for them, recursively) and quoted
    globs. Each `NAME.json` (`NAME.md.json` for md) gives `NAME` plus each format's suffix, in
    `output` named as a run names its inputs (below a folder given: its path there; a file: its
    path from the current folder, or its file name if outside), or beside it without `output`. The
    searchable PDF reads the input again, from the absolute path the JSON records or `source` (one
    JSON only), and parses it in a reader process, `page_timeout` seconds a page, as a run does;
    page-scoped formats that need pixels (`--draw`) cannot be made. Each file is checked before use
    (`writers.data.read_results`), and the input must still be the file the JSON recorded. An
    existing file is refused unless `overwrite`; an input or a result is never written over. A file
    that cannot be read or written is reported and counted.
    """
    from kosmos_cli.discovery import find_results, name_clashes
    from kosmos_cli.sandbox import Sandbox

    reporter = reporter or LogReporter()
    if not results:
        raise UsageError("no JSON files given", hint="name the .json files `kosmos ... -f json` wrote")
    if not formats:
        raise UsageError("no formats given", hint="add -f FORMAT, e.g. -f alto -f page")
    found = find_results([os.fspath(result) for result in results])
    if source is not None and len(found.documents) > 1:
        raise UsageError("--source names the input of one JSON file", hint="convert one file at a time")
    if output is not None and (clash := name_clashes(found.documents)) is not None:
        raise clash
    summary = Summary()
    _report_discovery(found, reporter, summary)
    with Sandbox(timeout=page_timeout) as sandbox:  # starts only if a format parses the input
        for result in found.documents:
            try:
                pages = _convert_one(result, formats, output, source, password, overwrite, sandbox)
            except InputError as error:
                reporter.error(error)
                summary.documents_failed += 1
                continue
            summary.documents_done += 1
            summary.pages_done += pages
    return summary


def _convert_one(
    result: Document,
    formats: Sequence[str],
    output: str | os.PathLike[str] | None,
    source: str | os.PathLike[str] | None,
    password: str | None,
    overwrite: bool,
    sandbox: Sandbox,
) -> int:
    """Write the formats of one JSON file and return its page count; raise InputError if it cannot."""
    from kosmos_cli.rasterize import read_regular_file
    from kosmos_cli.stores import atomic_write
    from kosmos_cli.writers.data import read_results

    result_path = Path(result.path)
    if output is None:  # beside the JSON file: its own stem
        folder, name = result_path.parent, PurePosixPath(result.name).name
    else:
        folder, name = Path(output), result.name
    label = f"`{result.display_name}`"
    data = read_regular_file(result.path, label, limit=MAX_RESULT_BYTES)
    try:
        read = read_results(data, name)
    except ValueError as error:
        raise InputError(f"{label} is not a result kosmos wrote ({first_line(error)})") from None
    document = read.pages[0].info.document
    input_document = Document(os.fspath(source), document.name) if source is not None else document
    rendered = render_results(read, formats, source=input_document, password=password, sandbox=sandbox)
    written = {folder / name: data for name, data in rendered.items()}
    for path in written:
        for kept, what in ((input_document.path, "the input"), (result.path, "the result it is made from")):
            if path.exists() and os.path.exists(kept) and os.path.samefile(path, kept):
                raise InputError(f"`{path}` would overwrite {what} `{kept}`", hint="choose another -o")
        if path.exists() and not overwrite:
            raise InputError(f"`{path}` exists", hint="pass --overwrite to replace it")
    for path, bytes_written in written.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, bytes_written)
    return len(read.pages)


def render_results(
    read: Results, formats: Sequence[str], *, source: Document, password: str | None, sandbox: Sandbox
) -> dict[str, bytes]:
    """Render formats from results read back (`writers.data.read_results`): each file's name and bytes.

    The searchable PDF reads `source` again, in `sandbox`, only if it is still the file the results
    recorded. Raises UsageError for a format that draws the page's pixels, InputError if the source
    cannot be read.
    """
    from kosmos_cli.assembly import render_document
    from kosmos_cli.writers import DocumentWriter, PageWriter, WriterOptions, get_writer

    pages = read.pages
    options = WriterOptions(password=password, model=read.model)
    document = pages[0].info.document
    rendered: dict[str, bytes] = {}
    for format_name in formats:
        writer = get_writer(format_name, task=pages[0].task, options=options)
        if isinstance(writer, DocumentWriter):
            bytes_read = _read_input(source, read.input, sandbox) if writer.needs_source else None
            rendered[writer.file_name(document)] = render_document(
                writer, pages, bytes_read, sandbox=sandbox, page_timeout=sandbox.timeout
            )
        elif isinstance(writer, PageWriter) and not writer.needs_pixels:
            for page in pages:
                info = page.info
                if (piece := writer.render_page(None, page)) is not None:
                    rendered[writer.file_name(document, info.page_index, info.page_count)] = piece
        else:
            raise UsageError(f"{writer.asked_as()} draws the page's pixels, which a JSON file does not hold")
    return rendered


def _read_input(document: Document, recorded: dict[str, Any] | None, sandbox: Sandbox) -> bytes:
    """Read the input again for the formats built from its bytes, in the reader process (a regular
    file, within its size and time limits), and only if it is still the file the result recorded."""
    from kosmos_cli.rasterize import document_source

    try:
        data = document_source(document, sandbox)
    except InputError as error:
        raise InputError(
            f"cannot read the input for the searchable PDF: {error.message}",
            hint="pass its place with --source",
        ) from None
    if recorded is not None and (
        len(data) != recorded["size"]
        or (recorded["sha256"] is not None and hashlib.sha256(data).hexdigest() != recorded["sha256"])
    ):
        raise InputError(
            f"`{document.display_name}` is not the input this result was made from (size or bytes differ)",
            hint="pass the input it was made from with --source",
        )
    return data
