"""The `kosmos` command: parse options, wire the pieces, show progress, turn errors into exit codes."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from kosmos_cli import __version__
from kosmos_cli.config import DEFAULT_MODEL, MODEL_ENV
from kosmos_cli.errors import KosmosError, UsageError
from kosmos_cli.sandbox import DEFAULT_PAGE_TIMEOUT
from kosmos_cli.values import PageResult, Task

if TYPE_CHECKING:
    from kosmos_cli.jobs import Summary

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: stdout's reader went away (`| head`)
EXIT_TERMINATED = 143  # 128 + SIGTERM
PROGRESS_LOG_SECONDS = 30.0  # when stderr is not a terminal: one progress line this often

app = typer.Typer(
    name="kosmos",
    help="Transcribe scans, photos and PDFs with Kosmos-2.5: markdown (`kosmos md`) or text lines with boxes "
    "(`kosmos ocr`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class MdFormat(str, Enum):
    md = "md"
    json = "json"
    jsonl = "jsonl"


class OcrFormat(str, Enum):
    txt = "txt"
    json = "json"
    jsonl = "jsonl"
    hocr = "hocr"
    pdf = "pdf"


class DType(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class Quantization(str, Enum):
    int8 = "int8"


class Attention(str, Enum):
    auto = "auto"
    sdpa = "sdpa"
    eager = "eager"
    flash_attention_2 = "flash_attention_2"


Inputs = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer reads the annotation at runtime on Python 3.10
    typer.Argument(
        help="Images, PDFs or folders (walked recursively); `-` reads one file from stdin.",
        show_default=False,
    ),
]
Output = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--output",
        "-o",
        help="Write one file per input and format here (a folder or an s3://, gs:// URI); default: stdout. "
        "Names mirror the inputs: see below.",
    ),
]
FromList = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--from-list", help="Read input paths, one per line, from this file (`-`: stdin).", show_default=False
    ),
]
Pages = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--pages", help="Pages to read in each document, 1-based: `1-3,7,10-`.", show_default=False),
]
Dpi = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(
        "--dpi", help="PDF render resolution; default: the size the model reads (about 1 megapixel).", min=10
    ),
]
Password = Annotated[Optional[str], typer.Option("--password", help="Password for encrypted PDFs.")]  # noqa: UP045
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Redo every input, replacing existing outputs (but never an input file)."
    ),
]
Model = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--model",
        help=f"Hub id or local folder [env {MODEL_ENV}; default {DEFAULT_MODEL}].",
        show_default=False,
    ),
]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit of --model.")]  # noqa: UP045


def _check_device(value: str) -> str:
    if value in ("auto", "cpu", "cuda", "mps") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise typer.BadParameter(f"`{value}` is not a device: use auto, cpu, cuda, cuda:N or mps")


DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", callback=_check_device)
]
DTypeOpt = Annotated[
    DType,
    typer.Option(
        "--dtype",
        help="auto: bfloat16 on GPUs that support it, else float16 on GPU; on CPU bfloat16 where native, "
        "else float32.",
    ),
]
AttnOpt = Annotated[
    Attention, typer.Option("--attn", help="Attention kernel; auto picks flash_attention_2 when installed.")
]
BatchSize = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--batch-size",
        "-b",
        min=1,
        help="Pages per batch; default: from the device and its free memory.",
        show_default=False,
    ),
]
MaxNewTokens = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--max-new-tokens",
        min=1,
        help="Token budget per page; default: 4000, the reference inference code's (a dense page needs it).",
        show_default=False,
    ),
]
Compile = Annotated[
    bool,
    typer.Option("--compile", help="Static KV cache and torch.compile'd decoding, in fixed batches (GPU)."),
]
Quantize = Annotated[
    Optional[Quantization],  # noqa: UP045
    typer.Option(
        "--quantize",
        help=(
            "int8: the text decoder in int8, CPU only. For CPUs without native bf16: 1.26x float32's speed,"
            " but output drifts from float32 and RAM peaks higher; where bf16 is native the default is"
            " faster and closer (see BENCHMARKS.md)."
        ),
        show_default=False,
    ),
]
Threads = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--threads", min=1, help="CPU threads; default: the cores this process may use.", show_default=False
    ),
]
Ray = Annotated[
    bool, typer.Option("--ray", help="Run on a Ray cluster (the one RAY_ADDRESS names, or a local instance).")
]
PageTimeout = Annotated[
    float,
    typer.Option(
        "--page-timeout",
        min=1.0,
        help="Seconds to open or render one page before it is marked failed (hostile PDFs can spin).",
    ),
]
RayAddress = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--ray-address", help="Ray cluster to join (implies --ray).", show_default=False),
]
Workers = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--workers",
        min=1,
        help="Model actors on Ray; default: as many as the cluster has room for.",
        show_default=False,
    ),
]
GpusPerWorker = Annotated[
    float,
    typer.Option("--gpus-per-worker", min=0.0, help="GPUs each Ray model actor reserves (0.5: two per GPU)."),
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bar or warnings; errors and the summary only.")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs and tracebacks.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kosmos {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Transcribe scans, photos and PDFs with Kosmos-2.5."""


RUN_EPILOG = (
    "Outputs (-o DIR): one file per input and format, named by the input's path below the common "
    "folder of all inputs, suffix kept: scans/2024/a.pdf -> DIR/2024/a.pdf.md. A run records each "
    "finished document in DIR/.kosmos/manifest.jsonl; a rerun skips a document only when its outputs "
    "exist and were recorded from the same, unchanged input with the same settings, redoes the rest, "
    "and never replaces a file it did not write from that input (--overwrite does). "
    "Exit codes: 0 done, 1 some inputs or pages failed, 2 usage error, 3 model did not load, "
    "130 interrupted, 141 stdout closed, 143 terminated."
)


@app.command(epilog=RUN_EPILOG)
def md(
    inputs: Inputs = None,
    output: Output = None,
    format: Annotated[
        Optional[list[MdFormat]],  # noqa: UP045
        typer.Option(
            "--format", "-f", help="Output format, repeatable (with -o): md, json, jsonl.", show_default="md"
        ),
    ] = None,
    from_list: FromList = None,
    pages: Pages = None,
    dpi: Dpi = None,
    password: Password = None,
    page_timeout: PageTimeout = DEFAULT_PAGE_TIMEOUT,
    overwrite: Overwrite = False,
    model: Model = None,
    revision: Revision = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.auto,
    attn: AttnOpt = Attention.auto,
    batch_size: BatchSize = None,
    max_new_tokens: MaxNewTokens = None,
    compile: Compile = False,
    quantize: Quantize = None,
    threads: Threads = None,
    ray: Ray = False,
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = 1.0,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Transcribe to markdown."""
    formats = tuple(f.value for f in format) if format else ("md",)
    _run(Task.MD, locals() | {"formats": formats, "draw": False, "numbered": False})


@app.command(epilog=RUN_EPILOG)
def ocr(
    inputs: Inputs = None,
    output: Output = None,
    format: Annotated[
        Optional[list[OcrFormat]],  # noqa: UP045
        typer.Option(
            "--format",
            "-f",
            help="Output format, repeatable (with -o): txt, json, jsonl, hocr, pdf.",
            show_default="txt",
        ),
    ] = None,
    draw: Annotated[
        bool, typer.Option("--draw", help="Also write a PNG per page with each line's box drawn (needs -o).")
    ] = False,
    numbered: Annotated[bool, typer.Option("--numbered", help="Number the boxes drawn by --draw.")] = False,
    from_list: FromList = None,
    pages: Pages = None,
    dpi: Dpi = None,
    password: Password = None,
    page_timeout: PageTimeout = DEFAULT_PAGE_TIMEOUT,
    overwrite: Overwrite = False,
    model: Model = None,
    revision: Revision = None,
    device: DeviceOpt = "auto",
    dtype: DTypeOpt = DType.auto,
    attn: AttnOpt = Attention.auto,
    batch_size: BatchSize = None,
    max_new_tokens: MaxNewTokens = None,
    compile: Compile = False,
    quantize: Quantize = None,
    threads: Threads = None,
    ray: Ray = False,
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = 1.0,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Transcribe to text lines with boxes: `x0,y0,x1,y0,x1,y1,x0,y1,text` in original-image pixels."""
    formats = tuple(f.value for f in format) if format else ("txt",)
    _run(Task.OCR, locals() | {"formats": formats})


@app.command()
def download(
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(
            help=f"Hub id to fetch [env {MODEL_ENV}; default {DEFAULT_MODEL}].", show_default=False
        ),
    ] = None,
    revision: Revision = None,
    to: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--to", help="Copy the checkpoint into this folder instead of the Hugging Face cache."),
    ] = None,
) -> None:
    """Fetch a checkpoint for offline use later."""
    from kosmos_cli.config import default_model
    from kosmos_cli.model.loading import download_model

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    name = model or default_model()
    try:
        path = download_model(name, revision=revision, to=to)
    except KosmosError as error:
        _print_error(console, error)
        raise typer.Exit(error.exit_code) from None
    typer.echo(str(path))
    console.print(
        f"downloaded `{name}`; use it offline with HF_HUB_OFFLINE=1 or --model {path}", markup=False
    )


@app.command()
def doctor(
    smoke: Annotated[bool, typer.Option("--smoke/--no-smoke", help="Run a tiny random model once.")] = True,
) -> None:
    """Print versions, the device and dtype kosmos would pick, and a smoke run: paste it into bug reports."""
    from kosmos_cli.doctor import diagnose

    _configure_logging(Console(stderr=True), verbose=False, quiet=True)
    rows = diagnose(smoke=smoke)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        typer.echo(f"{name:<{width}}  {value}")
    if any(name == "smoke run" and value.startswith("failed") for name, value in rows):
        raise typer.Exit(1)


def _run(task: Task, options: dict[str, Any]) -> None:
    """Run md or ocr with the parsed options and exit with the right code."""
    from kosmos_cli.config import Settings, default_model
    from kosmos_cli.discovery import discover, name_clashes, remove_stale_spools
    from kosmos_cli.jobs import Job, Summary, job_fingerprint, plan, probe, run_job
    from kosmos_cli.model.loading import load_runner
    from kosmos_cli.pages import parse_pages
    from kosmos_cli.sandbox import Sandbox
    from kosmos_cli.stores import OutputStore, output_location, output_store

    verbose, quiet = bool(options["verbose"]), bool(options["quiet"])
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    _configure_logging(console, verbose=verbose, quiet=quiet)
    reporter = _Reporter(console, quiet=quiet, verbose=verbose)
    on_ray = bool(options["ray"] or options["ray_address"])
    summary = Summary()
    input_errors = 0
    store: OutputStore | None = None
    try:
        signal.signal(signal.SIGTERM, _terminate)
        formats: tuple[str, ...] = options["formats"]
        _check_formats(formats, output_dir=options["output"], draw=options["draw"])
        inputs = list(options["inputs"] or [])
        if not inputs and not options["from_list"]:
            raise UsageError(
                "no inputs given", hint="name files or folders, `-` for stdin, or --from-list FILE"
            )
        page_selection = parse_pages(options["pages"]) if options["pages"] else None
        output_dir = output_location(options["output"]) if options["output"] else None
        store = output_store(output_dir) if output_dir is not None else None
        if store is not None:
            store.open_for_run()
        remove_stale_spools()
        exclude = _own_outputs(output_dir) if isinstance(output_dir, Path) else []
        if on_ray:
            from kosmos_cli.distributed import discover_inputs, require_ray

            require_ray()
            discovery = discover_inputs(inputs, from_list=options["from_list"])
        else:
            discovery = discover(inputs, from_list=options["from_list"], exclude=exclude)
        if output_dir is not None and (clash := name_clashes(discovery.documents)) is not None:
            raise clash
        for error in discovery.errors:
            reporter.error(error)
        input_errors = len(discovery.errors)
        for empty in discovery.empty:
            reporter.warning(f"no images or PDFs found in `{empty}`")
        summary.unsupported = discovery.unsupported
        settings = Settings(
            model=options["model"] or default_model(),
            revision=options["revision"],
            device=options["device"],
            dtype=options["dtype"].value,
            attn=options["attn"].value,
            batch_size=options["batch_size"],
            max_new_tokens=options["max_new_tokens"],
            compile=options["compile"],
            quantize=options["quantize"].value if options["quantize"] else None,
            threads=options["threads"],
        )
        job = Job(
            task=task,
            formats=formats,
            output_dir=output_dir,
            draw=options["draw"],
            numbered=options["numbered"],
            pages=page_selection,
            dpi=options["dpi"],
            password=options["password"],
            overwrite=options["overwrite"],
            page_timeout=options["page_timeout"],
        )
        documents = discovery.documents
        if on_ray:
            if documents and output_dir is not None:
                job = replace(job, fingerprint=job_fingerprint(job, settings, resolve=False))
            todo = plan(documents, job, reporter, summary, inputs=discovery.documents)
            if todo:
                from kosmos_cli.distributed import run_on_ray

                with reporter:
                    run_on_ray(
                        todo,
                        job,
                        settings,
                        reporter,
                        stdout=sys.stdout.buffer,
                        summary=summary,
                        address=options["ray_address"],
                        workers=options["workers"],
                        gpus_per_worker=options["gpus_per_worker"],
                        inputs=discovery.documents,
                        quiet=quiet,
                    )
        else:
            with Sandbox(timeout=job.page_timeout) as sandbox:
                pages = probe(documents, job, reporter, summary, sandbox=sandbox)
                documents = [document for document in documents if document in pages]
                if documents and output_dir is not None:
                    job = replace(job, fingerprint=job_fingerprint(job, settings))
                todo = plan(documents, job, reporter, summary, pages=pages, inputs=discovery.documents)
                if todo:
                    reporter.loading(f"loading model `{settings.model}`")
                    runner = load_runner(settings)
                    with reporter:
                        run_job(
                            todo, runner, job, reporter, sys.stdout.buffer, summary,
                            inputs=discovery.documents, pages=pages, sandbox=sandbox,
                        )  # fmt: skip
    except KosmosError as error:
        reporter.error(error)
        raise typer.Exit(error.exit_code) from None
    except BrokenPipeError:
        # The reader of stdout is gone (`| head`): stop quietly, as a shell tool killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except KeyboardInterrupt:
        console.print("error: interrupted; finished documents are kept, rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except _Terminated:
        console.print("error: terminated; finished documents are kept, rerun the same command to resume")
        raise typer.Exit(EXIT_TERMINATED) from None
    except Exception as error:  # a bug, not bad input: one line, the traceback with --verbose
        crash = KosmosError(
            f"unexpected {type(error).__name__}: {error}",
            hint="rerun with --verbose for the traceback, and please report it",
        )
        crash.__cause__ = error
        reporter.error(crash)
        raise typer.Exit(1) from None
    finally:
        if store is not None:
            store.close()
    console.print(_summary_line(summary), markup=False)
    raise typer.Exit(1 if summary.failed or input_errors else 0)


def _own_outputs(output_dir: Path) -> list[str]:
    """Return what discovery must not read back: the output folder and every output it records."""
    from kosmos_cli.manifest import Manifest
    from kosmos_cli.stores import LocalStore

    return [str(output_dir)] + [str(output_dir / name) for name in Manifest(LocalStore(output_dir)).owners]


class _Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C, with its own exit code."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _check_formats(formats: tuple[str, ...], *, output_dir: str | None, draw: bool) -> None:
    if output_dir is not None:
        return
    if draw:
        raise UsageError("--draw writes PNG files and needs an output folder", hint="add -o DIR")
    if "pdf" in formats:
        raise UsageError("--format pdf writes a PDF file and needs an output folder", hint="add -o DIR")
    if len(formats) > 1:
        raise UsageError("several formats need an output folder; stdout takes one", hint="add -o DIR")


class _Reporter:
    """Progress bar and messages on stderr; stdout stays clean for data."""

    def __init__(
        self,
        console: Console,
        *,
        quiet: bool,
        verbose: bool,
        interval: float = PROGRESS_LOG_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.quiet = quiet
        self.verbose = verbose
        self.interval = interval  # between plain progress lines, when stderr is not a terminal
        self.clock = clock
        self.started = self.last_line = clock()
        self.done = 0
        self.total = 0
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[current]}"),
            console=console,
            disable=quiet or not console.is_terminal,
            transient=True,
        )
        self.task_id = self.progress.add_task("pages", total=0, rate="", current="")

    def __enter__(self) -> _Reporter:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def add_total(self, pages: int) -> None:
        self.total += pages
        self.progress.update(self.task_id, total=self.total)

    def page_done(self, result: PageResult) -> None:
        self.done += 1
        if not self.quiet and not self.console.is_terminal:
            self._log_progress()
        task = self.progress.tasks[0]
        # Pages finish in batches, so a windowed speed jumps; the mean since the start does not.
        elapsed = task.elapsed or 0.0
        rate = (task.completed + 1) / elapsed if elapsed > 0 else 0.0
        self.progress.update(
            self.task_id,
            advance=1,
            rate=f"{rate:.2f} pages/s" if rate else "",
            current=result.info.document.name,
        )

    def _log_progress(self) -> None:
        """Print `kosmos: 12/40 pages, 0.05 pages/s, about 9 min left` once per interval, for logs."""
        now = self.clock()
        if now - self.last_line < self.interval:
            return
        self.last_line = now
        line = f"kosmos: {self.done}/{self.total} pages"
        elapsed = now - self.started
        if elapsed > 0:
            rate = self.done / elapsed
            line += f", {rate:.2f} pages/s"
            if rate > 0 and self.total > self.done:
                line += f", about {_duration((self.total - self.done) / rate)} left"
        self.console.print(line, markup=False)

    def loading(self, message: str) -> None:
        """Say the model is loading (it takes a while): on a terminal, or with --verbose."""
        if self.verbose or (self.console.is_terminal and not self.quiet):
            self.console.print(message, markup=False)

    def error(self, error: KosmosError) -> None:
        _print_error(self.console, error, verbose=self.verbose)

    def warning(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"warning: {message}", markup=False)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _print_error(console: Console, error: KosmosError, *, verbose: bool = False) -> None:
    """Print `error: ...` and `hint: ...` lines; the cause's traceback only with --verbose."""
    console.print(f"error: {error.message}", markup=False)
    if error.hint:
        console.print(f"hint: {error.hint}", markup=False)
    cause = error.__cause__
    if verbose and cause is not None:
        import traceback

        console.print("".join(traceback.format_exception(cause)).rstrip(), markup=False)


def _summary_line(summary: Summary) -> str:
    elapsed = time.monotonic() - summary.started
    parts = [
        f"{summary.documents_done} done",
        f"{summary.documents_skipped} skipped (done before)",
        f"{summary.documents_failed} failed",
    ]
    pages = f"{summary.pages_done} pages in {elapsed:.1f}s"
    if summary.pages_done and elapsed > 0:
        pages += f" ({summary.pages_done / elapsed:.2f} pages/s)"
    if summary.pages_resumed:
        pages += f", {summary.pages_resumed} resumed"
    if summary.pages_failed:
        pages += f", {summary.pages_failed} failed"
    if summary.pages_truncated:
        pages += f", {summary.pages_truncated} truncated"
    line = "kosmos: " + ", ".join(parts) + "; " + pages
    if summary.unsupported:
        line += f"; {len(summary.unsupported)} unsupported files ignored"
    return line


class _MessageHandler(logging.Handler):
    """Print log records as `warning: ...` lines on the stderr console, like every other message."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "error" if record.levelno >= logging.ERROR else record.levelname.lower()
        self.console.print(f"{prefix}: {record.getMessage()}", markup=False)


def _configure_logging(console: Console, *, verbose: bool, quiet: bool) -> None:
    logging.captureWarnings(True)  # PIL reports large images and bad EXIF as Python warnings
    for name in ("kosmos_cli", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [_MessageHandler(console)]
        logger.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
        logger.propagate = False
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    if verbose:  # transformers' INFO lists every one of the tokenizer's 8,000 added tokens
        hf_logging.set_verbosity_warning()
        hub_logging.set_verbosity_info()
    else:  # their retries and load reports say nothing the one-line error will not
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        hub_logging.set_verbosity_error()


def main() -> None:
    """Entry point of the `kosmos` console script."""
    try:
        app()
    except SystemExit as done:
        if done.code not in (EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_BROKEN_PIPE):
            raise
        # Stopped early, torch's and the tokenizer's native threads may still run, and tearing the
        # interpreter down under them can abort ("terminate called without an active exception").
        # Run the exit handlers (temporary files, the reader process), then leave at once.
        atexit._run_exitfuncs()
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os._exit(int(done.code))
