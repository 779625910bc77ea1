"""Run a job on a Ray cluster: the same documents, pages, model, writers and resume logic, spread out.

The driver (the process that runs `kosmos ... --ray`) plans the job exactly as on one machine and
is the only process that writes outputs. Everything in between is one Ray Data pipeline:

    documents --list (CPU task)--> page items --render (CPU task)--> pages
              --transcribe (actor pool: one model per actor, on one GPU)--> page results --> driver

- *list* opens each document once to count its pages and apply `--pages`; it emits one `listed`
  row per document (the pages it selects) and one `page` row per page still to do.
- *render* rasterizes one page per task (`rasterize.iter_pages` for that page alone, in the worker's
  reader process under `--page-timeout`, as on one machine), so the pages
  of one long PDF render in parallel; a page that cannot be read becomes a `page_error` row.
- *transcribe* is a callable class run by an `ActorPoolStrategy` pool: each actor loads the model
  once with `model.loading.load_runner` and runs `transcribe.transcribe_pages` (tiling and parsing
  included) on batches of pages, and renders page-scoped outputs (`--draw`) while it holds the pixels.
- The driver reads results as they stream in (`Dataset.iter_rows`) and hands them to
  `assembly.Assembly`, the code `run_job` uses: progress files, atomic writes, stdout order, summary.

Fault tolerance is Ray's: Ray Data gives its actors `max_restarts=-1` and `max_task_retries=-1`, so
an actor lost mid-batch (a crash, a preempted node) is restarted and its batch redone. A redone batch
may repeat results the driver already has; `Assembly` keeps the first result of each page and writes
a document only when every one of its pages has exactly one, so nothing is lost or duplicated.

Rows carry four columns, so every block has the same Arrow schema: `document` (its index in the
driver's list), `kind`, `page_index` (-1 for a whole-document row) and `payload`, the pickled Python
value of that kind: page results as `PageResult.to_dict`, pages and documents as kosmos's own frozen
dataclasses (the driver and workers run the same code).

Inputs may be URIs of any file system `pyarrow.fs.FileSystem.from_uri` knows (`s3://`, `gs://`,
`hdfs://`, `file://`): `discovery.discover_uris` lists them on the driver and each worker fetches a
document into a local temporary file before `rasterize` opens it. Outputs go wherever `stores.output_store`
writes: a local folder or an object-store URI, written by the driver alone, as on one machine.

Ray is imported inside functions only: `kosmos --help` stays fast and kosmos works without Ray.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, cast

from kosmos_cli.assembly import Assembly, Outputs, job_writers
from kosmos_cli.config import Job, RayOptions, Settings
from kosmos_cli.discovery import input_filesystem
from kosmos_cli.errors import InputError, KosmosError, ModelLoadError, UsageError
from kosmos_cli.jobs import selected_pages, unselected_message
from kosmos_cli.model import Runner
from kosmos_cli.rasterize import PageError
from kosmos_cli.reporting import Reporter, Summary
from kosmos_cli.sandbox import Sandbox
from kosmos_cli.stores import is_uri, public_location
from kosmos_cli.values import Document, Page, PageResult

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'kosmos-transcribe[ray]'"
# Pages handed to a model actor per call (unless --batch-size is larger): the most that
# `model.sizing.default_batch_size` puts in one GPU batch, so a batch is never cut short by Ray Data.
WORKER_BATCH_PAGES = 64
CPU_WORKER_CPUS = 1.0  # CPUs a model actor reserves on a cluster without GPUs
CPU_SHARE_FOR_MODELS = 0.5  # on a cluster without GPUs, at most this share of its CPUs runs models
LIST_CPUS = 0.25  # CPUs a listing task reserves: it opens a document and counts its pages
RENDER_CPUS = 1.0  # CPUs a render task reserves
# Heap a render task reserves: a page of a few megapixels plus PyMuPDF's working set. It also keeps
# Ray Data from fusing rendering into the model actors on CPU-only clusters (it fuses map stages whose
# resource requests are equal), so a model never waits for a page to be drawn.
RENDER_MEMORY_BYTES = 256 * 2**20
FETCHED_DOCUMENTS = 4  # object-store documents a worker keeps a local copy of, so each is fetched once

# Row kinds, in pipeline order.
_DOCUMENT = "document"  # payload: (Document, resumed page indices)
_LISTED = "listed"  # payload: the page indices the document selects
_SOURCE = "source"  # payload: the document's bytes, for the formats built from them (searchable PDF)
_PAGE_ITEM = "page_item"  # payload: Document
_PAGE = "page"  # payload: Page
_PAGE_ERROR = "page_error"  # payload: (message, hint, page_count)
_ERROR = "error"  # payload: (message, hint)
_UNSELECTED = "unselected"  # payload: the page count of a document --pages selects no page of
_RESULT = "result"  # payload: (PageResult.to_dict(), page-scoped files by format)
_LOAD_ERROR = "load_error"  # payload: (message, hint) of the ModelLoadError an actor met
_COLUMNS = ("document", "kind", "page_index", "payload")


@dataclass(frozen=True)
class WorkerPlan:
    """How many model actors to run and what each one reserves."""

    count: int  # the pool's size (its upper bound when `fixed` is False)
    fixed: bool  # a pool of exactly `count` actors (--workers), else 1 to `count` as work allows
    gpus: float  # per actor; 0 on CPU-only clusters or with --device cpu
    cpus: float | None  # per actor; None leaves Ray's default
    device: str  # the `--device` each actor loads the model on


def require_ray() -> None:
    """Raise a one-line UsageError naming the install command if Ray Data cannot be imported."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UsageError("--ray needs Ray, which is not installed", hint=INSTALL_HINT) from None


def plan_workers(resources: dict[str, float], settings: Settings, options: RayOptions) -> WorkerPlan:
    """Size the model actor pool from the cluster's resources and the --workers / --gpus-per-worker asked."""
    workers, gpus_per_worker = options.workers, options.gpus_per_worker
    cluster_gpus = float(resources.get("GPU", 0.0))
    cluster_cpus = float(resources.get("CPU", 1.0))
    use_gpus = cluster_gpus > 0 and gpus_per_worker > 0 and settings.device not in ("cpu", "mps")
    if settings.device.startswith("cuda") and not use_gpus:
        raise UsageError(
            f"--device {settings.device} asks for GPUs, but the Ray cluster has none"
            if cluster_gpus == 0
            else "--device cuda needs --gpus-per-worker above 0",
            hint="use --device auto to run the model on CPU actors",
        )
    if use_gpus:
        if gpus_per_worker > cluster_gpus:
            raise UsageError(
                f"--gpus-per-worker {gpus_per_worker:g} is more than the cluster's {cluster_gpus:g} GPUs"
            )
        most = max(1, int(cluster_gpus / gpus_per_worker + 1e-9))
        # An actor sees only the GPUs Ray gives it (CUDA_VISIBLE_DEVICES), so `cuda` is always its own.
        return WorkerPlan(workers or most, workers is not None, gpus_per_worker, None, "cuda")
    most = max(1, int(cluster_cpus * CPU_SHARE_FOR_MODELS / CPU_WORKER_CPUS))
    device = settings.device if settings.device == "mps" else "cpu"
    return WorkerPlan(workers or most, workers is not None, 0.0, CPU_WORKER_CPUS, device)


def run_on_ray(
    documents: Sequence[Document],
    outputs: Outputs,
    settings: Settings,
    reporter: Reporter,
    summary: Summary,
    options: RayOptions,
) -> None:
    """Transcribe planned documents (`jobs.plan`) on Ray and write them as `jobs.run_job` does.

    `options.address` is a cluster to join (`HOST:PORT`, `ray://HOST:PORT` or `auto`); without one,
    Ray joins the cluster named by `RAY_ADDRESS` or started on this machine with `ray start`, else
    starts a local instance with every CPU and GPU here. A Ray instance already running in this
    process is used as it is. Raises UsageError without Ray, ModelLoadError when no actor can load
    the model.
    """
    require_ray()
    import ray

    todo = list(documents)
    if not todo:
        return
    builder = Sandbox(timeout=outputs.job.page_timeout)  # builds the formats that parse the input again
    quiet = not logger.isEnabledFor(logging.WARNING)
    started = _connect(options.address, quiet=quiet)
    try:
        plan = plan_workers(ray.cluster_resources(), settings, options)
        logger.info(
            "ray: %d model worker(s)%s, %s GPU(s) each, on %s",
            plan.count,
            "" if plan.fixed else " at most",
            f"{plan.gpus:g}",
            plan.device,
        )
        model = os.path.abspath(settings.model) if os.path.exists(settings.model) else settings.model
        worker_settings = replace(settings, device=plan.device, model=model)
        if outputs.store is not None:
            todo = _plan_as_workers_resolve(todo, outputs, settings, worker_settings, plan, reporter, summary)
            if not todo:
                return
        job = outputs.job
        assembly = Assembly(todo, outputs, reporter, summary, sandbox=builder)
        resumed = [assembly.start(document) for document in todo]
        dataset = _pipeline(todo, resumed, job, worker_settings, plan, sources=outputs.needs_source)
        _collect(_rows(dataset), todo, assembly, reporter)
        assembly.close()
    finally:
        builder.close()
        if started:
            ray.shutdown()


def _plan_as_workers_resolve(
    documents: list[Document],
    outputs: Outputs,
    settings: Settings,
    worker_settings: Settings,
    plan: WorkerPlan,
    reporter: Reporter,
    summary: Summary,
) -> list[Document]:
    """Record the settings as a model worker resolves them (`--dtype auto`, `--attn auto` on its
    hardware), and skip what a run on one machine finished with the same ones.

    The driver planned with the settings as asked (its own hardware may differ from the workers');
    a worker on the actors' resources tells what `auto` means there, so a run here and a run on Ray
    into one folder record one fingerprint and skip each other's finished documents.
    """
    import ray

    from kosmos_cli.jobs import job_fingerprint
    from kosmos_cli.jobs import plan as plan_documents

    resolve = ray.remote(_resolved_speed_settings).options(num_gpus=plan.gpus, num_cpus=plan.cpus or 1)
    dtype, attn = ray.get(resolve.remote(worker_settings))
    if (dtype, attn) == (settings.dtype, settings.attn):
        return documents
    resolved = replace(settings, dtype=dtype, attn=attn)
    outputs.job = replace(outputs.job, fingerprint=job_fingerprint(outputs.job, resolved, resolve=False))
    return plan_documents(documents, outputs, reporter, summary)


def _resolved_speed_settings(settings: Settings) -> tuple[str, str]:
    """On a model worker: the dtype and attention `auto` picks on its device (`loading.output_settings`)."""
    from kosmos_cli.model.loading import output_settings

    resolved = output_settings(settings, resolve=True)
    return str(resolved["dtype"]), str(resolved["attn"])


def _connect(address: str | None, *, quiet: bool = False) -> bool:
    """Join or start Ray unless this process already has; return whether it was started here."""
    import ray
    import ray.data

    verbose = logger.isEnabledFor(logging.DEBUG)
    # Ray Data announces each execution at INFO on its own logger; kosmos draws its own progress.
    logging.getLogger("ray.data").setLevel(logging.DEBUG if verbose else logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if ray.is_initialized():
        return False
    if quiet:
        logging.getLogger("ray").setLevel(logging.CRITICAL)
    ray.init(
        address=address,  # None: RAY_ADDRESS, else a cluster started here, else a new local instance
        logging_level=logging.INFO if verbose else logging.CRITICAL if quiet else logging.ERROR,
        log_to_driver=verbose,
    )
    return True


def _pipeline(
    documents: Sequence[Document],
    resumed: Sequence[set[int]],
    job: Job,
    settings: Settings,
    plan: WorkerPlan,
    *,
    sources: bool,
) -> Any:
    """Build the lazy Ray Data pipeline from documents to page results."""
    import ray.data

    cwd = os.getcwd()  # workers resolve relative input paths against the driver's folder
    items = [
        _row(number, _DOCUMENT, -1, (document, sorted(done)))
        for number, (document, done) in enumerate(zip(documents, resumed, strict=True))
    ]
    compute = (
        ray.data.ActorPoolStrategy(size=plan.count)
        if plan.fixed
        else ray.data.ActorPoolStrategy(min_size=1, max_size=plan.count)
    )
    batch_size = max(settings.batch_size or 0, WORKER_BATCH_PAGES)
    return (
        ray.data.from_items(items, override_num_blocks=len(items))
        # Ray's annotations leave out fn_kwargs, which these functions take their options from.
        .flat_map(
            cast("Any", _list_pages),
            fn_kwargs={"job": job, "cwd": cwd, "sources": sources},
            num_cpus=LIST_CPUS,
        )
        # One page per block, so the pages of one document render in parallel.
        .repartition(target_num_rows_per_block=1)
        .map(
            cast("Any", _render_page),
            fn_kwargs={"job": job, "cwd": cwd, "model": settings.model},
            num_cpus=RENDER_CPUS,
            memory=RENDER_MEMORY_BYTES,
        )
        .map_batches(
            _TranscribeWorker,
            fn_constructor_kwargs={"settings": settings, "job": job},
            batch_size=batch_size,
            compute=compute,
            num_gpus=plan.gpus or None,
            num_cpus=plan.cpus,
        )
    )


def _rows(dataset: Any) -> Iterator[dict[str, Any]]:
    """Stream the pipeline's rows to the driver; a failure Ray could not recover from is a KosmosError."""
    from ray.exceptions import RayError

    try:
        yield from dataset.iter_rows()
    except RayError as error:
        lines = str(error).strip().splitlines()
        raise KosmosError(
            f"the Ray job failed: {lines[0] if lines else type(error).__name__}",
            hint="finished documents are kept; rerun the same command to resume (--verbose shows why)",
        ) from error


def _collect(
    rows: Iterable[dict[str, Any]], documents: Sequence[Document], assembly: Assembly, reporter: Reporter
) -> None:
    """Hand each row that reaches the driver to the assembly, in whatever order rows arrive."""
    listed: set[int] = set()
    for row in rows:
        number, kind, page_index = int(row["document"]), str(row["kind"]), int(row["page_index"])
        payload = pickle.loads(row["payload"])
        if kind == _LOAD_ERROR:
            message, hint = payload
            raise ModelLoadError(message, hint=hint)
        document = documents[number]
        if kind == _LISTED:
            if number in listed:
                continue  # a listing task that was retried
            listed.add(number)
            reporter.add_total(len(payload))
            assembly.expect(document, payload)
            assembly.listed(document)
        elif kind == _SOURCE:
            assembly.source(document, payload)
        elif kind == _RESULT:
            result, pieces = payload
            assembly.page_done(PageResult.from_dict(result, document), pieces)
        elif kind == _PAGE_ERROR:
            message, hint, page_count = payload
            error = PageError(
                message, document=document, page_index=page_index, page_count=page_count, hint=hint
            )
            assembly.page_error(document, error)
        elif kind == _ERROR:
            message, hint = payload
            assembly.document_error(document, InputError(message, hint=hint))
        elif kind == _UNSELECTED:
            assembly.unselected(document, unselected_message(assembly.job, document, payload))
        else:
            raise RuntimeError(f"unexpected row kind {kind!r} from the Ray pipeline")


# --- object-store inputs, fetched where they are read -------------------------------------------


_fetched: OrderedDict[str, str] = OrderedDict()  # URI -> local copy in this worker, most recent last


def _localize(document: Document, *, cwd: str) -> Document:
    """Return a document this worker can open: a relative path made absolute, a URI fetched (once)."""
    if not is_uri(document.path):
        if os.path.isabs(document.path):
            return document
        return Document(os.path.join(cwd, document.path), document.name, label=document.display_name)
    local = _fetched.get(document.path)
    if local is None or not os.path.exists(local):
        local = _fetched[document.path] = _fetch(document.path)
    _fetched.move_to_end(document.path)
    while len(_fetched) > FETCHED_DOCUMENTS:
        _remove(_fetched.popitem(last=False)[1])
    return Document(local, document.name, label=document.display_name)


def _fetch(uri: str) -> str:
    """Copy an object to a local temporary file, removed when the worker exits, and return its path."""
    from pyarrow import ArrowException

    filesystem, path = input_filesystem(uri)
    # The suffix stays: sources tells XPS, EPUB and CBZ apart by it.
    descriptor, local = tempfile.mkstemp(prefix="kosmos-fetched-", suffix=PurePosixPath(path).suffix)
    atexit.register(_remove, local)
    try:
        with os.fdopen(descriptor, "wb") as copy, filesystem.open_input_stream(path) as stream:
            shutil.copyfileobj(stream, copy)
    except (OSError, ArrowException) as error:
        _remove(local)
        raise InputError(f"cannot read `{public_location(uri)}`: {error}") from None
    return local


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


# --- worker side: these run in Ray tasks and actors -------------------------------------------------


def _row(document: int, kind: str, page_index: int, payload: object) -> dict[str, Any]:
    return {"document": document, "kind": kind, "page_index": page_index, "payload": pickle.dumps(payload)}


_reader: Sandbox | None = None  # this Ray worker's reader process, started on first use


def _worker_reader(timeout: float) -> Sandbox:
    """Return the reader process of this Ray worker: documents open and render there, time-limited."""
    global _reader
    if _reader is None or _reader.timeout != timeout:
        _reader = Sandbox(timeout=timeout)
    return _reader


def _list_pages(row: dict[str, Any], *, job: Job, cwd: str, sources: bool) -> list[dict[str, Any]]:
    """Count a document's pages, apply --pages, and emit its `listed` row and one item per page to do.

    With `sources`, the document's bytes go to the driver too, for the formats built from them.
    """
    from kosmos_cli.rasterize import count_pages, document_source

    number = int(row["document"])
    document, resumed = pickle.loads(row["payload"])
    rows = []
    try:
        local = _localize(document, cwd=cwd)
        reader = _worker_reader(job.page_timeout)
        count = count_pages(local, password=job.password, sandbox=reader)
        selected = list(selected_pages(job, count))
        if not selected:
            return [_row(number, _UNSELECTED, -1, count)]
        if sources:
            rows.append(_row(number, _SOURCE, -1, document_source(local, reader)))
    except InputError as error:
        return [_row(number, _ERROR, -1, (error.message, error.hint))]
    done = set(resumed)
    todo = [page_index for page_index in selected if page_index not in done]
    rows.append(_row(number, _LISTED, -1, selected))
    return rows + [_row(number, _PAGE_ITEM, i, document) for i in todo]


def _render_page(row: dict[str, Any], *, job: Job, cwd: str, model: str) -> dict[str, Any]:
    """Rasterize one page item; pass other rows through.

    A page whose result comes from its own text layer (`text_layer.layer_result`) becomes its result
    row here, and skips the model.
    """
    from kosmos_cli.rasterize import iter_pages
    from kosmos_cli.text_layer import layer_result
    from kosmos_cli.writers import render_pages

    if row["kind"] != _PAGE_ITEM:
        return row
    number, page_index = int(row["document"]), int(row["page_index"])
    document = pickle.loads(row["payload"])
    try:
        local = _localize(document, cwd=cwd)
        reader = _worker_reader(job.page_timeout)
        read = iter_pages(
            local,
            page_indices=[page_index],
            dpi=job.dpi,
            password=job.password,
            sandbox=reader,
            text_layer=job.reads_text_layer,
        )
        for page in read:
            if isinstance(page, PageError):
                return _row(number, _PAGE_ERROR, page_index, (page.message, page.hint, page.page_count))
            # Results name the document as the driver knows it (its URI), not the local copy.
            page = replace(page, info=replace(page.info, document=document))
            own = layer_result(page, job)
            if own is None:
                return _row(number, _PAGE, page_index, page)
            payload = (own.to_dict(), render_pages(job_writers(job, model=model), page, own))
            return _row(number, _RESULT, page_index, payload)
    except InputError as error:
        return _row(number, _ERROR, -1, (error.message, error.hint))
    raise AssertionError("iter_pages yields one item per page index or raises")


class _TranscribeWorker:
    """A Ray Data actor holding one model: transcribes the `page` rows of each batch it is handed."""

    def __init__(self, *, settings: Settings, job: Job) -> None:
        from kosmos_cli.model.loading import load_runner

        self.job = job
        self.writers = job_writers(job, model=settings.model)
        self.runner: Runner | None = None
        self.load_error: ModelLoadError | None = None
        try:
            self.runner = load_runner(settings)
        except ModelLoadError as error:
            # Handed to the driver as a row: an actor that raises here would only be retried by Ray
            # and end in an error that has lost the message and hint.
            self.load_error = error

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        """Transcribe a batch's pages and return the batch with a `result` row in place of each page."""
        from kosmos_cli.transcribe import transcribe_pages
        from kosmos_cli.writers import render_pages

        if self.load_error is not None:
            error = self.load_error
            return _columns([_row(-1, _LOAD_ERROR, -1, (error.message, error.hint))])
        assert self.runner is not None
        rows: list[dict[str, Any]] = [
            {
                "document": int(number),
                "kind": str(kind),
                "page_index": int(page_index),
                "payload": bytes(payload),
            }
            for number, kind, page_index, payload in zip(*(batch[column] for column in _COLUMNS), strict=True)
        ]
        pages: list[tuple[Page, int]] = [
            (pickle.loads(row["payload"]), position)
            for position, row in enumerate(rows)
            if row["kind"] == _PAGE
        ]
        for page, position, result in transcribe_pages(pages, self.runner, task=self.job.task):
            payload = (result.to_dict(), render_pages(self.writers, page, result))
            rows[position] = _row(rows[position]["document"], _RESULT, page.info.page_index, payload)
        return _columns(rows)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {column: [row[column] for row in rows] for column in _COLUMNS}
