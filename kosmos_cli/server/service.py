"""The jobs behind `kosmos serve`: each accepted upload kept on disk until its results expire.

A job is a folder below the service's `--jobs-dir`:

    ID/order.json    what the client asked for, written atomically before the job is answered
    ID/input/NAME    the upload, under the name the client gave it (cleaned)
    ID/output/       a `kosmos ocr|md -f json -o` folder: the progress log as pages finish, the JSON
    ID/ended.json    written atomically when the job ends: its state and errors

A job runs as one CLI job (`api.transcribe_files`) in a thread of its own, with its own lane of the
shared model (`sharing`): the CLI's atomic writes and progress log make a job killed with the server
(SIGKILL) finish at the next start with the same bytes. Results are rendered on demand from the JSON,
in any format, as `kosmos convert` renders them. A job's folder is removed `keep` seconds after it
ends, or when it is deleted.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from kosmos_cli.config import DEFAULT_PAGE_TIMEOUT, TEXT_LAYERS, Job, Settings
from kosmos_cli.errors import InputError, KosmosError, UsageError, first_line
from kosmos_cli.pages import parse_pages
from kosmos_cli.rasterize import HEADER_BYTES, SUPPORTED_FORMATS, sniff
from kosmos_cli.reporting import Summary
from kosmos_cli.sandbox import Sandbox
from kosmos_cli.sharing import JobCancelled, LaneRunner, ServiceStopping, SharedModel, Watcher
from kosmos_cli.stores import atomic_write
from kosmos_cli.values import Document, PageResult, Status, Task
from kosmos_cli.writers import WRITERS, DocumentWriter, formats_for

if TYPE_CHECKING:
    from kosmos_cli.writers.data import Results

logger = logging.getLogger(__name__)

ORDER_FILE = "order.json"
ENDED_FILE = "ended.json"
INPUT_FOLDER = "input"
OUTPUT_FOLDER = "output"
UPLOAD_PREFIX = ".upload-"  # an upload being received, beside the jobs (`Service.spool`)
RUNNING_JOBS = 16  # jobs with a thread and a reader process each; more wait their turn, queued
SWEEP_SECONDS = 60.0  # how often expired jobs are looked for
CANCEL_SECONDS = 30.0  # how long deleting a running job waits for its thread to let go of its folder
_ID = re.compile(r"[0-9a-f]{32}")
_UNSAFE = re.compile(r"[^\w.+-]+")


class Busy(KosmosError):
    """The service holds as many unfinished jobs as it may (HTTP 429)."""


class Unsupported(InputError):
    """The upload is not an image or PDF kosmos reads (HTTP 415)."""


@dataclass(frozen=True)
class Limits:
    """How much the service takes on."""

    max_jobs: int = 64  # unfinished jobs held at once; past it, 429
    keep: float = 24 * 3600.0  # seconds a job's results are kept after it ends
    page_timeout: float = DEFAULT_PAGE_TIMEOUT


@dataclass(frozen=True)
class Order:
    """What a client asked for (`order.json`)."""

    task: str
    file_name: str
    pages: str | None = None
    text_layer: str = "auto"
    created: float = 0.0  # seconds since the epoch

    @classmethod
    def read(cls, path: Path) -> Order:
        """Read an order back; raises ValueError if it is not one."""
        try:
            value = json.loads(path.read_bytes())
            return cls(**value)
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"`{path}` is not a job's order: {first_line(error)}") from None


def _idle() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


class Counter(Watcher):
    """What the service tells its metrics; the default tells nothing (`metrics.Metrics` does)."""

    def page_done(self, job: ServedJob, result: PageResult, first: bool) -> None:
        """A job's page finished; `first`: the job's first."""

    def job_ended(self, job: ServedJob) -> None:
        """A job ended."""


@dataclass(eq=False)
class ServedJob:
    """A job as the service knows it, and the `Reporter` its run reports to.

    `state`: queued, running, done (every page has a result, some may have failed), failed (nothing
    could be transcribed), cancelled, or interrupted (the service stopped; it resumes at the next start).
    """

    id: str
    folder: Path
    order: Order
    total: int
    state: str = "queued"
    results: dict[int, PageResult] = field(default_factory=dict)  # by page index, in finishing order
    errors: list[str] = field(default_factory=list)
    ended: float | None = None  # seconds since the epoch
    accepted: float = field(default_factory=time.monotonic)
    first_page_seconds: float | None = None
    lane: LaneRunner | None = None
    counter: Counter = field(default_factory=Counter)
    idle: threading.Event = field(default_factory=_idle)  # set while no thread runs it
    follow: bool = False  # keep its page's tokens as they come (a streamed chat answer)
    _tokens: list[int] = field(default_factory=list)  # the decode loop's own list: read, never written
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def task(self) -> Task:
        """The job's task."""
        return Task(self.order.task)

    @property
    def input_path(self) -> Path:
        """The upload."""
        return self.folder / INPUT_FOLDER / self.order.file_name

    @property
    def document(self) -> Document:
        """The upload as a run reads it: named, in messages and outputs, as the client named it."""
        return uploaded(self.input_path, self.order.file_name)

    @property
    def finished(self) -> bool:
        """Whether the job has ended, one way or another (an interrupted job has not)."""
        return self.state in ("done", "failed", "cancelled")

    def describe(self) -> dict[str, Any]:
        """The job's state, for GET /v1/jobs/ID."""
        with self.changed:
            counts = {"done": 0, "failed": 0, "truncated": 0}
            for result in self.results.values():
                counts["failed" if result.status is Status.FAILED else "done"] += 1
                counts["truncated"] += result.status is Status.TRUNCATED
            return {
                "id": self.id,
                "state": self.state,
                "task": self.order.task,
                "file_name": self.order.file_name,
                "pages": {"total": self.total, **counts},
                "errors": list(self.errors),
                "created": self.order.created,
                "ended": self.ended,
            }

    def finished_pages(self, after: int) -> tuple[list[PageResult], bool]:
        """The results after the first `after` to finish, and whether no more will come."""
        with self.changed:
            return list(self.results.values())[after:], self.finished or self.state == "interrupted"

    def tokens(self) -> list[int]:
        """The tokens of its page so far, where the job `follow`s them."""
        return list(self._tokens)

    def _follow(self, ids: list[int]) -> None:
        self._tokens = ids

    def wait(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the job to change."""
        with self.changed:
            self.changed.wait(timeout)

    def _set(self, **fields: Any) -> None:
        with self.changed:
            for name, value in fields.items():
                setattr(self, name, value)
            self.changed.notify_all()

    # The Reporter of the job's run (`reporting.Reporter`).
    def loading(self, message: str) -> None:
        """Nothing: the model is loaded."""

    def add_total(self, pages: int) -> None:
        """Nothing: the total is known when the job is accepted."""

    def page_done(self, result: PageResult) -> None:
        """Keep a finished page (or one an earlier run finished)."""
        with self.changed:
            self.results[result.info.page_index] = result
            first = self.first_page_seconds is None
            if first:
                self.first_page_seconds = time.monotonic() - self.accepted
            self.changed.notify_all()
        self.counter.page_done(self, result, first)

    def error(self, error: KosmosError) -> None:
        """Keep one failed page's or the document's error."""
        with self.changed:
            self.errors.append(error.one_line())
            self.changed.notify_all()

    def warning(self, message: str) -> None:
        """Log it."""
        logger.warning("job %s: %s", self.id, message)


class Service:
    """The shared model and the jobs on disk: accept, run, resume, cancel, render, expire."""

    def __init__(self, settings: Settings, folder: Path, limits: Limits, counter: Counter | None = None):
        """A service keeping its jobs in `folder`, which must exist (`run.jobs_folder` makes it)."""
        self.settings = settings
        self.folder = folder
        self.limits = limits
        self.counter = counter or Counter()
        self.model: SharedModel | None = None
        self.failure: Exception | None = None  # why the model did not load
        self.stopping = False
        self._jobs: dict[str, ServedJob] = {}
        self._accepting = 0  # uploads being accepted right now
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=RUNNING_JOBS, thread_name_prefix="kosmos-job")
        self._reader = Sandbox(timeout=limits.page_timeout)  # counts and draws pages of uploads
        # Each job thread keeps a reader process of its own for the jobs it runs: one started a job
        # would cost every one-page request a process start.
        self._job_readers: list[Sandbox] = []
        self._thread_reader = threading.local()
        self._swept = threading.Event()

    # --- life -------------------------------------------------------------------------------------

    def start(self, load: Callable[[Settings], Any]) -> None:
        """Load the model with `load(settings)`, start its thread, resume the jobs on disk, and begin
        removing expired ones."""
        model = SharedModel(load(self.settings), self.counter)
        jobs = self._read_jobs()
        with self._lock:
            self._jobs.update((job.id, job) for job in jobs)
        model.start()
        self.model = model  # ready from here
        for job in jobs:
            if not job.finished:
                self._pool.submit(self._run, job)
        threading.Thread(target=self._sweep, name="kosmos-expire", daemon=True).start()

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and its thread takes pages."""
        return self.model is not None and self.model.running and not self.stopping

    def stop(self, timeout: float) -> None:
        """Stop taking jobs; running jobs keep their finished pages and resume at the next start."""
        self.stopping = True
        self._swept.set()
        if self.model is not None:
            self.model.stop(ServiceStopping("the service is stopping"), timeout=timeout)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for reader in [self._reader, *self._job_readers]:
            reader.close()

    # --- jobs -------------------------------------------------------------------------------------

    def accept(
        self,
        upload: Path,
        file_name: str,
        *,
        task: str,
        pages: str | None,
        text_layer: str,
        follow: bool = False,
    ) -> ServedJob:
        """Check an upload (moved from `upload`, a file on the same file system), keep it as a job, start it.

        `follow`: keep the tokens of its page as they come (`ServedJob.tokens`), for a one-page job.

        Raises Busy when the service is full, Unsupported for a file that is no image or PDF,
        UsageError for a bad field and InputError for a file that cannot be read.
        """
        check_task(task)
        if text_layer not in TEXT_LAYERS:
            raise UsageError(f"text_layer `{text_layer}` is not one of: {', '.join(TEXT_LAYERS)}")
        selection = parse_pages(pages) if pages is not None else None
        Job(task=Task(task), formats=(), pages=selection, text_layer=text_layer)  # checks the combination
        name = clean_name(file_name)
        with upload.open("rb") as stream:
            header = stream.read(HEADER_BYTES)
        if not header:
            raise InputError("the upload is empty (0 bytes)")
        if sniff(header, Path(name).suffix.lower()) is None:
            raise Unsupported(
                f"`{name}` is not an image or PDF", hint=f"supported formats: {SUPPORTED_FORMATS}"
            )
        with self._lock:
            unfinished = self._accepting + sum(not job.finished for job in self._jobs.values())
            if unfinished >= self.limits.max_jobs:
                raise Busy(f"the service holds {unfinished} unfinished jobs, as many as it takes")
            self._accepting += 1  # counted from here, so that uploads arriving together cannot pass the limit
        job_id = secrets.token_hex(16)
        folder = self.folder / job_id
        try:
            (folder / INPUT_FOLDER).mkdir(parents=True)
            os.replace(upload, folder / INPUT_FOLDER / name)
            order = Order(task, name, pages, text_layer, created=time.time())
            total = self._count(folder / INPUT_FOLDER / name, order)
            atomic_write(folder / ORDER_FILE, json.dumps(asdict(order)).encode())
            job = ServedJob(job_id, folder, order, total, counter=self.counter, follow=follow)
            with self._lock:
                self._jobs[job_id] = job
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._accepting -= 1
        self._pool.submit(self._run, job)
        return job

    def spool(self, upload: BinaryIO | bytes) -> Path:
        """Keep an upload in a new file beside the jobs, which `accept` moves into its job."""
        descriptor, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, dir=self.folder)
        with os.fdopen(descriptor, "wb") as stream:
            if isinstance(upload, bytes):
                stream.write(upload)
            else:
                shutil.copyfileobj(upload, stream)
        return Path(name)

    def job(self, job_id: str) -> ServedJob | None:
        """The job of that id, if the service has it."""
        with self._lock:
            return self._jobs.get(job_id)

    def unfinished(self) -> int:
        """How many jobs are queued or running."""
        with self._lock:
            return sum(not job.finished for job in self._jobs.values())

    def delete(self, job: ServedJob) -> None:
        """Cancel a job (its pages leave the batch) and remove it with its files."""
        with self._lock:
            self._jobs.pop(job.id, None)
        with job.changed:
            running = job.lane
            if not job.finished:
                job.state, job.ended = "cancelled", time.time()
            job.changed.notify_all()
        if running is not None:
            running.cancel(JobCancelled("the job was cancelled"))
        job.idle.wait(CANCEL_SECONDS)  # its thread writes no more into the folder
        shutil.rmtree(job.folder, ignore_errors=True)

    def _count(self, path: Path, order: Order) -> int:
        """Count the pages a new job will read; raises InputError or UsageError if it has none."""
        from kosmos_cli.jobs import selected_pages
        from kosmos_cli.rasterize import count_pages

        count = count_pages(uploaded(path, order.file_name), sandbox=self._reader)
        selection = parse_pages(order.pages) if order.pages is not None else None
        selected = selected_pages(Job(task=Task(order.task), formats=(), pages=selection), count)
        if not selected:
            raise UsageError(f"pages `{order.pages}` selects none of the document's {count}")
        return len(selected)

    def _run(self, job: ServedJob) -> None:
        """Run one job to its end, in a thread of the pool."""
        assert self.model is not None
        with job.changed:
            if job.finished or self.stopping:
                return
            job.state, job.lane = "running", self.model.lane(job.id)
            if job.follow:
                job.lane.lane.partial = job._follow
            job.idle.clear()
        try:
            self._transcribe(job)
        finally:
            job.idle.set()

    def _transcribe(self, job: ServedJob) -> None:
        from kosmos_cli.api import transcribe_files

        try:
            summary = transcribe_files(
                [job.document],
                task=job.task,
                formats=["json"],
                output=job.folder / OUTPUT_FOLDER,
                pages=job.order.pages,
                page_timeout=self.limits.page_timeout,
                text_layer=job.order.text_layer,
                settings=self.settings,
                runner=job.lane,
                reporter=job,
                reader=self._own_reader(),
            )
        except ServiceStopping:
            job._set(state="interrupted", lane=None)
            return
        except JobCancelled:
            return
        except KosmosError as error:
            job.error(error)
            summary = None
        except Exception as error:  # a bug: this job fails, the service goes on
            logger.exception("job %s crashed", job.id)
            job.error(KosmosError(f"kosmos crashed: {error!r}"))
            summary = None
        self._end(job, summary)

    def _own_reader(self) -> Sandbox:
        """This job thread's reader process (started on its first call)."""
        reader = getattr(self._thread_reader, "sandbox", None)
        if reader is None:
            reader = self._thread_reader.sandbox = Sandbox(timeout=self.limits.page_timeout)
            with self._lock:
                self._job_readers.append(reader)
        return reader

    def _end(self, job: ServedJob, summary: Summary | None) -> None:
        done = summary is not None and (summary.documents_done or summary.documents_skipped)
        state = "done" if done and self.result_path(job).exists() else "failed"
        if state == "done" and len(job.results) < job.total:  # finished before a restart: read it back
            for result in self._read_json(job):
                job.results.setdefault(result.info.page_index, result)
        ended = time.time()
        with job.changed:
            if job.state == "cancelled":
                return
            errors = list(job.errors)
        try:
            atomic_write(
                job.folder / ENDED_FILE,
                json.dumps({"state": state, "ended": ended, "errors": errors}).encode(),
            )
        except OSError as error:
            logger.error("job %s: cannot record its end: %s", job.id, error)
        job._set(state=state, ended=ended, lane=None)
        self.counter.job_ended(job)

    # --- results ----------------------------------------------------------------------------------

    def result_path(self, job: ServedJob) -> Path:
        """Where the job's JSON is (once it is done)."""
        from kosmos_cli.writers import get_writer

        writer = get_writer("json", task=job.task)
        assert isinstance(writer, DocumentWriter)
        return job.folder / OUTPUT_FOLDER / writer.file_name(Document("", job.order.file_name))

    def render(self, job: ServedJob, format_name: str) -> tuple[bytes, str, str]:
        """Render a done job's results in a format: its bytes, media type and file name.

        A format with one file per page gives a ZIP of them for a document of several pages. Raises
        UsageError for a format the task cannot hold or that draws pixels.
        """
        from kosmos_cli.api import render_results

        check_format(job.order.task, format_name)
        read = self._read_results(job)
        files = render_results(read, [format_name], source=job.document, password=None, sandbox=self._reader)
        if len(files) == 1:
            ((name, data),) = files.items()
            return data, WRITERS[format_name].media_type, name
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return buffer.getvalue(), "application/zip", f"{job.order.file_name}.{format_name}.zip"

    def page_image(self, job: ServedJob, page_index: int) -> bytes:
        """A page of the job's input as PNG, as the model saw it (its lines' boxes are in the page's
        full size, `PageInfo.width` and `height`)."""
        from kosmos_cli.rasterize import PageError, iter_pages

        (page,) = list(iter_pages(job.document, page_indices=[page_index], sandbox=self._reader))
        if isinstance(page, PageError):
            raise page
        buffer = io.BytesIO()
        page.image.save(buffer, "PNG")
        return buffer.getvalue()

    def _read_results(self, job: ServedJob) -> Results:
        """A done job's results, read back from its JSON; raises InputError or ValueError if they
        cannot be."""
        from kosmos_cli.api import MAX_RESULT_BYTES
        from kosmos_cli.rasterize import read_regular_file
        from kosmos_cli.writers.data import read_results

        data = read_regular_file(str(self.result_path(job)), "the job's results", limit=MAX_RESULT_BYTES)
        return read_results(data, job.order.file_name)

    def _read_json(self, job: ServedJob) -> list[PageResult]:
        try:
            return self._read_results(job).pages
        except (InputError, ValueError) as error:
            logger.error("job %s: cannot read its results: %s", job.id, first_line(error))
            return []

    # --- on disk ----------------------------------------------------------------------------------

    def _read_jobs(self) -> list[ServedJob]:
        """The jobs an earlier run left, oldest first; what is not a job is left alone."""
        jobs = []
        for leftover in self.folder.glob(f"{UPLOAD_PREFIX}*"):  # uploads a killed server was receiving
            leftover.unlink(missing_ok=True)
        for folder in sorted(self.folder.iterdir()):
            if not _ID.fullmatch(folder.name):
                continue
            if not (folder / ORDER_FILE).exists():  # a job a killed server was accepting
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                order = Order.read(folder / ORDER_FILE)
                total = self._count(folder / INPUT_FOLDER / order.file_name, order)
            except (ValueError, KosmosError) as error:
                logger.warning("removing job %s: %s", folder.name, first_line(error))
                shutil.rmtree(folder, ignore_errors=True)
                continue
            job = ServedJob(folder.name, folder, order, total, counter=self.counter)
            try:
                ended = json.loads((folder / ENDED_FILE).read_bytes())
            except (OSError, json.JSONDecodeError):
                ended = None
            if isinstance(ended, dict):
                job.state, job.ended, job.errors = ended["state"], ended["ended"], list(ended["errors"])
                if job.state == "done":
                    job.results = {result.info.page_index: result for result in self._read_json(job)}
            jobs.append(job)
        return sorted(jobs, key=lambda job: job.order.created)

    def _sweep(self) -> None:
        """Remove jobs `keep` seconds after they ended, every SWEEP_SECONDS."""
        while not self._swept.wait(SWEEP_SECONDS):
            self.expire(time.time())

    def expire(self, now: float) -> None:
        """Remove the jobs that ended more than `keep` seconds before `now`."""
        with self._lock:
            old = [
                job for job in self._jobs.values()
                if job.ended is not None and job.finished and now - job.ended > self.limits.keep
            ]  # fmt: skip
        for job in old:
            self.delete(job)


def check_task(task: str) -> None:
    """Raise UsageError unless `task` names one: md or ocr."""
    if task not in (Task.MD.value, Task.OCR.value):
        raise UsageError(f"task `{task}` is not md or ocr")


def check_format(task: str, format_name: str) -> None:
    """Raise UsageError unless `task` names one and `format_name` is one of its formats."""
    check_task(task)
    if format_name not in formats_for(Task(task)):
        raise UsageError(
            f"format `{format_name}` is not one of {task}'s",
            hint=f"use one of: {', '.join(formats_for(Task(task)))}",
        )


def uploaded(path: Path, name: str) -> Document:
    """An upload kept at `path`, which the client called `name`."""
    return Document(str(path), name, label=name)


def clean_name(file_name: str) -> str:
    """An upload's name as kept on disk: its last part, with only letters, digits and `._+-`."""
    name = _UNSAFE.sub("_", Path(file_name.replace("\\", "/")).name).strip("._")[:120]
    return name or "upload"
