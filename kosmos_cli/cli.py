"""The `kosmos` command: options to typed values, one library call, progress, errors to exit codes."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import signal
import sys
import time
import traceback
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeAlias

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
from typer.core import TyperGroup

try:  # typer 0.27 and later carry a copy of click of their own
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_errors  # type: ignore[no-redef]

from kosmos_cli import __version__
from kosmos_cli.api import transcribe_files
from kosmos_cli.config import (
    ATTENTIONS,
    DEFAULT_GPUS_PER_WORKER,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_PAGE_TIMEOUT,
    DEVICES,
    DTYPES,
    KV_DTYPES,
    MODEL_ENV,
    QUANTIZATIONS,
    RAY_ADDRESS_ENV,
    TEXT_LAYERS,
    RayOptions,
    Settings,
    default_model,
)
from kosmos_cli.errors import KosmosError
from kosmos_cli.reporting import Summary
from kosmos_cli.values import PageResult, Task
from kosmos_cli.writers import formats_for

EXIT_USAGE = 2  # as UsageError says; also what Click's own option errors exit with
EXIT_CRASH = 70  # EX_SOFTWARE (sysexits.h): a bug in kosmos, not bad input
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: stdout's reader went away (`| head`)
EXIT_TERMINATED = 143  # 128 + SIGTERM
PROGRESS_LOG_SECONDS = 30.0  # when stderr is not a terminal: one progress line this often


class _Commands(TyperGroup):
    """Typer's group, with Click's own usage errors printed as `error:` and `hint:` lines like kosmos's."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as error:
            error.show()  # the help text itself
            sys.exit(EXIT_USAGE)
        except click_errors.UsageError as error:
            message = error.format_message().replace("Value error, ", "")  # typer's coercion prefix
            typer.echo(f"error: {message[:1].lower()}{message[1:]}", err=True)
            command = error.ctx.command_path if error.ctx is not None else "kosmos"
            typer.echo(f"hint: see `{command} --help`", err=True)
            sys.exit(EXIT_USAGE)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="kosmos",
    cls=_Commands,
    help="Transcribe scans, photos and PDFs with Kosmos-2.5: markdown (`kosmos md`) or text lines with boxes "
    "(`kosmos ocr`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _choices(name: str, values: Iterable[str]) -> type[Enum]:
    """Return an Enum of an option's choices, the form Typer lists and checks them in."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


if TYPE_CHECKING:  # made at runtime from the one list of each option's choices
    DType: TypeAlias = Enum
    KvDType: TypeAlias = Enum
    Attention: TypeAlias = Enum
    Quantization: TypeAlias = Enum
    TextLayerMode: TypeAlias = Enum
    MdFormat: TypeAlias = Enum
    OcrFormat: TypeAlias = Enum
    ConvertFormat: TypeAlias = Enum
else:
    DType = _choices("DType", DTYPES)
    KvDType = _choices("KvDType", KV_DTYPES)
    Attention = _choices("Attention", ATTENTIONS)
    Quantization = _choices("Quantization", QUANTIZATIONS)
    TextLayerMode = _choices("TextLayerMode", TEXT_LAYERS)
    MdFormat = _choices("MdFormat", formats_for(Task.MD))
    OcrFormat = _choices("OcrFormat", formats_for(Task.OCR))
    ConvertFormat = _choices("ConvertFormat", dict.fromkeys(formats_for(Task.MD) + formats_for(Task.OCR)))


Inputs = Annotated[
    Optional[list[str]],  # noqa: UP045 - typer reads the annotation at runtime on Python 3.10
    typer.Argument(
        help="Images, PDFs or folders (walked recursively); `-` reads one file from stdin.",
        show_default=False,
        metavar="INPUT",
    ),
]
Output = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--output",
        "-o",
        help="Write one file per input and format here (a folder or an s3://, gs:// URI); default: stdout. "
        "Names follow the inputs' paths: see below.",
    ),
]
FromList = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--from-list", help="Read input paths, one per line, from this file (`-`: stdin).", show_default=False
    ),
]
Root = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--root",
        help="Name every input's outputs by its path below this folder (default: a folder given is"
        " mirrored below itself, a file by its path from the current folder, or its name if it lies"
        " outside).",
        show_default=False,
        metavar="DIR",
    ),
]
Pages = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--pages", help="Pages to read in each document, 1-based: `1-3,7,10-`.", show_default=False),
]
Dpi = Annotated[
    Optional[float],  # noqa: UP045
    typer.Option(
        "--dpi", help="PDF render resolution; default: the size the model reads (about 1 megapixel)."
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
DeviceOpt = Annotated[str, typer.Option("--device", help=f"{', '.join(DEVICES)}.")]
DTypeOpt = Annotated[
    DType,
    typer.Option(
        "--dtype",
        help="auto: bfloat16 on GPUs that support it, else float16 on GPU; on CPU bfloat16 where native, "
        "else float32.",
    ),
]
AttnOpt = Annotated[
    Attention,
    typer.Option(
        "--attn",
        help="Attention kernel; auto picks flash_attention_2 when installed.",
    ),
]
BatchSize = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--batch-size",
        "-b",
        help="Pages per batch; default: from the device and its free memory.",
        show_default=False,
    ),
]
MaxNewTokens = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--max-new-tokens",
        help=f"Token budget per page; default: {DEFAULT_MAX_NEW_TOKENS}, the reference inference code's "
        "(a dense page needs it).",
        show_default=False,
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="Decode in fixed batches through transformers' generate with a static KV cache,"
        " torch.compile'd (any device). A batch ends with its longest page.",
    ),
]
CudaGraph = Annotated[
    bool,
    typer.Option(
        "--cuda-graph",
        help="CUDA only: the decode step captured once as a CUDA graph and replayed, pages still joining"
        " and leaving the running batch as they come.",
    ),
]
AttentionOpt = Annotated[
    bool,
    typer.Option(
        "--attention",
        help="Keep where each token looked on the page: regions of markdown blocks and each OCR line's"
        " attention_agreement in JSON and chunks, and with -o a PNG per page of outlines and one of heat"
        " maps (NAME.attention.png, NAME.heat.png).",
    ),
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
KvDTypeOpt = Annotated[
    KvDType,
    typer.Option(
        "--kv-dtype",
        help="What the KV cache stores; auto: the weights' dtype. A smaller one holds more pages and reads"
        " fewer bytes a token: float8 (e4m3, GPUs of compute capability 8.9+) halves a 16-bit cache; output"
        " may drift (see BENCHMARKS.md).",
    ),
]
Threads = Annotated[
    Optional[int],  # noqa: UP045
    typer.Option(
        "--threads", help="CPU threads; default: the cores this process may use.", show_default=False
    ),
]
Ray = Annotated[
    bool,
    typer.Option(
        "--ray", help=f"Run on a Ray cluster (the one {RAY_ADDRESS_ENV} names, or a local instance)."
    ),
]
PageTimeout = Annotated[
    float,
    typer.Option(
        "--page-timeout",
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
        help="Model actors on Ray; default: as many as the cluster has room for.",
        show_default=False,
    ),
]
GpusPerWorker = Annotated[
    float,
    typer.Option("--gpus-per-worker", help="GPUs each Ray model actor reserves (0.5: two per GPU)."),
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
    "Outputs (-o DIR): one file per input and format, named by the input's path, suffix kept, never "
    "by the run's other inputs: below a folder given (kosmos md scans: scans/2024/a.pdf -> "
    "DIR/2024/a.pdf.md), a file by its path from the current folder (DIR/scans/2024/a.pdf.md) or its "
    "name if it lies outside, everything below --root DIR if given. A run records each "
    "finished document in DIR/.kosmos/manifest.jsonl; a rerun skips a document only when its outputs "
    "exist and were recorded from the same, unchanged input with the same settings, redoes the rest, "
    "and never replaces a file it did not write from that input (--overwrite does). "
    f"Exit codes: 0 done, 1 some inputs or pages failed, {EXIT_USAGE} usage error, 3 model did not load, "
    f"{EXIT_CRASH} a bug in kosmos (with a traceback), {EXIT_INTERRUPTED} interrupted, "
    f"{EXIT_BROKEN_PIPE} stdout closed, {EXIT_TERMINATED} terminated."
)


@dataclass(frozen=True)
class ModelOptions:
    """The model's options, which `md`, `ocr` and `serve` share."""

    model: Model = None
    revision: Revision = None
    device: DeviceOpt = "auto"
    dtype: DTypeOpt = "auto"  # type: ignore[assignment]  # typer turns it into its DType
    attn: AttnOpt = "auto"  # type: ignore[assignment]
    batch_size: BatchSize = None
    max_new_tokens: MaxNewTokens = None
    compile: Compile = False
    cuda_graph: CudaGraph = False
    quantize: Quantize = None
    kv_dtype: KvDTypeOpt = "auto"  # type: ignore[assignment]
    threads: Threads = None
    attention: AttentionOpt = False

    def settings(self) -> Settings:
        """Return the model's settings (raises UsageError for a value that names nothing)."""
        return Settings(
            model=self.model or default_model(),
            revision=self.revision,
            device=self.device,
            dtype=self.dtype.value,
            attn=self.attn.value,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            compile=self.compile,
            cuda_graph=self.cuda_graph,
            quantize=self.quantize.value if self.quantize is not None else None,
            kv_dtype=self.kv_dtype.value,
            threads=self.threads,
            attention=self.attention,
        )


@dataclass(frozen=True)
class RunOptions(ModelOptions):
    """The options `md` and `ocr` share, as typer parsed them; `with_options` adds them to each command."""

    inputs: Inputs = None
    output: Output = None
    from_list: FromList = None
    root: Root = None
    pages: Pages = None
    dpi: Dpi = None
    password: Password = None
    page_timeout: PageTimeout = DEFAULT_PAGE_TIMEOUT
    overwrite: Overwrite = False
    ray: Ray = False
    ray_address: RayAddress = None
    workers: Workers = None
    gpus_per_worker: GpusPerWorker = DEFAULT_GPUS_PER_WORKER
    quiet: Quiet = False
    verbose: Verbose = False

    def ray_options(self) -> RayOptions | None:
        """Return how to run on Ray, or None to run here."""
        if not self.ray and self.ray_address is None:
            return None
        return RayOptions(
            address=self.ray_address, workers=self.workers, gpus_per_worker=self.gpus_per_worker
        )


def with_options(kind: type[ModelOptions]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the options of `kind` (a `ModelOptions` dataclass), declared once there.

    Typer reads options from a function's signature, so the one it is handed lists the command's own
    parameters, then `kind`'s own fields, then the model's; the command is called with its own and
    `options=`.
    """
    shared = typing.get_type_hints(kind, include_extras=True)
    model_fields = {field.name for field in dataclasses.fields(ModelOptions)}
    fields = sorted(dataclasses.fields(kind), key=lambda field: field.name in model_fields)

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            parameter.replace(annotation=hints[parameter.name])
            for parameter in inspect.signature(command).parameters.values()
            if parameter.name != "options"
        ]
        keyword = inspect.Parameter.KEYWORD_ONLY
        added = [
            inspect.Parameter(field.name, keyword, default=field.default, annotation=shared[field.name])
            for field in fields
        ]

        @functools.wraps(command)
        def parsed(**values: Any) -> None:
            options = kind(**{field.name: values.pop(field.name) for field in fields})
            command(**values, options=options)

        parsed.__signature__ = inspect.Signature([*own, *added])  # type: ignore[attr-defined]
        parsed.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
        del parsed.__wrapped__  # typer must read the signature above, not the command's
        return parsed

    return decorate


def _transcribe(
    task: Task,
    options: RunOptions,
    *,
    formats: list[Enum] | None,
    draw: bool = False,
    numbered: bool = False,
    text_layer: str = "auto",
) -> None:
    """Run md or ocr: the one library call, with progress, the summary and the exit code."""
    with _session(quiet=options.quiet, verbose=options.verbose) as reporter:
        reporter.summary = transcribe_files(
            options.inputs or [],
            task=task,
            formats=[choice.value for choice in formats or []],
            output=options.output,
            from_list=options.from_list,
            root=options.root,
            pages=options.pages,
            dpi=options.dpi,
            password=options.password,
            page_timeout=options.page_timeout,
            text_layer=text_layer,
            draw=draw,
            numbered=numbered,
            overwrite=options.overwrite,
            settings=options.settings(),
            ray=options.ray_options(),
            reporter=reporter,
        )


@app.command(epilog=RUN_EPILOG)
@with_options(RunOptions)
def md(
    format: Annotated[
        Optional[list[MdFormat]],  # noqa: UP045
        typer.Option(
            "--format",
            "-f",
            help=f"Output format, repeatable (with -o): {', '.join(formats_for(Task.MD))}.",
            show_default="md",
            metavar="FORMAT",
        ),
    ] = None,
    *,
    options: RunOptions,
) -> None:
    """Transcribe to markdown."""
    _transcribe(Task.MD, options, formats=format)


@app.command(epilog=RUN_EPILOG)
@with_options(RunOptions)
def ocr(
    format: Annotated[
        Optional[list[OcrFormat]],  # noqa: UP045
        typer.Option(
            "--format",
            "-f",
            help=f"Output format, repeatable (with -o): {', '.join(formats_for(Task.OCR))}.",
            show_default="txt",
            metavar="FORMAT",
        ),
    ] = None,
    draw: Annotated[
        bool, typer.Option("--draw", help="Also write a PNG per page with each line's box drawn (needs -o).")
    ] = False,
    numbered: Annotated[bool, typer.Option("--numbered", help="Number the boxes drawn by --draw.")] = False,
    text_layer: Annotated[
        TextLayerMode,
        typer.Option(
            "--text-layer",
            help="A PDF page's own text: `auto` takes its lines and boxes from the file where the page has "
            "real text (visible, not over a page-covering scan) and runs the model on the rest; `ignore` "
            "runs the model on every page (and -f pdf replaces an old invisible OCR layer); `only` never "
            "loads the model, taking any text layer and failing pages without one.",
        ),
    ] = "auto",  # type: ignore[assignment]  # typer turns it into its TextLayerMode
    *,
    options: RunOptions,
) -> None:
    """Transcribe to text lines with boxes: `x0,y0,x1,y0,x1,y1,x0,y1,text` in original-image pixels."""
    _transcribe(Task.OCR, options, formats=format, draw=draw, numbered=numbered, text_layer=text_layer.value)


@app.command()
def convert(
    results: Annotated[
        list[str],
        typer.Argument(
            help="JSON or JSON lines files kosmos wrote (`-f json`, `-f jsonl`), folders of them, globs.",
            show_default=False,
            metavar="RESULT",
        ),
    ],
    format: Annotated[
        list[ConvertFormat],
        typer.Option(
            "--format",
            "-f",
            help="Format to write, repeatable: any `md` or `ocr` format that the file's task can hold.",
            metavar="FORMAT",
        ),
    ],
    output: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--output",
            "-o",
            help="Folder to write to, named as a run names its inputs (a folder given is mirrored below"
            " itself); default: beside each JSON file.",
        ),
    ] = None,
    source: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--source", help="Where the input is now, if it moved (the searchable PDF reads it)."),
    ] = None,
    password: Password = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace files that exist.")] = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """Write other formats from kosmos's JSON output, without the model: ALTO tomorrow from JSON today."""
    from kosmos_cli.api import convert_files

    with _session(quiet=quiet, verbose=verbose) as reporter:
        reporter.summary = convert_files(
            results,
            formats=[choice.value for choice in format],
            output=output,
            source=source,
            password=password,
            overwrite=overwrite,
            reporter=reporter,
        )


@dataclass(frozen=True)
class ServeOptions(ModelOptions):
    """The options of `kosmos serve`, as typer parsed them."""

    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; any but loopback needs --api-key.")
    ] = "127.0.0.1"
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000
    api_key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--api-key",
            envvar="KOSMOS_API_KEY",
            help="Every /v1/ route then needs `Authorization: Bearer KEY`.",
            show_default=False,
            show_envvar=True,
        ),
    ] = None
    jobs_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--jobs-dir",
            help="Where jobs are kept until their results expire; default: $XDG_STATE_HOME/kosmos/jobs.",
            show_default=False,
        ),
    ] = None
    max_upload_mb: Annotated[
        float, typer.Option("--max-upload-mb", help="Largest request body taken, in MiB (413 past it).")
    ] = 100.0
    max_jobs: Annotated[
        int, typer.Option("--max-jobs", help="Unfinished jobs held at once; past it, 429 with Retry-After.")
    ] = 64
    wait: Annotated[
        float,
        typer.Option(
            "--wait", help="Seconds POST /v1/transcribe holds a request before answering 202 and a job."
        ),
    ] = 60.0
    keep_hours: Annotated[
        float, typer.Option("--keep-hours", help="Hours a job's results are kept after it ends.")
    ] = 24.0
    page_timeout: PageTimeout = DEFAULT_PAGE_TIMEOUT
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No access log; warnings and errors only.")] = (
        False
    )
    verbose: Verbose = False


@app.command()
@with_options(ServeOptions)
def serve(*, options: ServeOptions) -> None:
    """Serve the model over HTTP: uploads in, any format out, jobs, metrics, an OpenAI-style chat route."""
    from kosmos_cli.server.run import Listen, check_listen, jobs_folder, missing_packages

    console = Console(stderr=True, highlight=False, soft_wrap=True)
    _configure_logging(console, verbose=options.verbose, quiet=options.quiet)
    listen = Listen(
        options.host,
        options.port,
        options.api_key,
        "debug" if options.verbose else "warning" if options.quiet else "info",
    )
    try:
        missing_packages()
        check_listen(listen)
        settings = options.settings()
        limits, http = _serve_limits(options)
        folder = jobs_folder(options.jobs_dir)
    except KosmosError as error:
        _print_error(console, error)
        raise typer.Exit(error.exit_code) from None
    from kosmos_cli.server.run import serve as run_server

    try:
        run_server(settings, listen, folder, limits, http)
    except KosmosError as error:  # the model did not load
        _print_error(console, error)
        raise typer.Exit(error.exit_code) from None


def _serve_limits(options: ServeOptions) -> tuple[Any, Any]:
    """The service's limits and the HTTP side's options; raises UsageError for a value out of range."""
    from kosmos_cli.errors import UsageError
    from kosmos_cli.server.app import Options
    from kosmos_cli.server.service import Limits

    numbers = {
        "--max-upload-mb": options.max_upload_mb,
        "--wait": options.wait,
        "--keep-hours": options.keep_hours,
        "--page-timeout": options.page_timeout,
    }
    for name, value in numbers.items():
        if not (value > 0 and value < float("inf")):
            raise UsageError(f"{name} must be a positive number, not {value:g}")
    if options.max_jobs < 1:
        raise UsageError(f"--max-jobs must be 1 or more, not {options.max_jobs}")
    limits = Limits(
        max_jobs=options.max_jobs, keep=options.keep_hours * 3600, page_timeout=options.page_timeout
    )
    http = Options(
        api_key=options.api_key, max_upload=int(options.max_upload_mb * (1 << 20)), wait=options.wait
    )
    return limits, http


@app.command()
def download(
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(
            help=f"Hub id to fetch [env {MODEL_ENV}; default {DEFAULT_MODEL}].",
            show_default=False,
            metavar="MODEL",
        ),
    ] = None,
    revision: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--revision", help="Hub branch, tag or commit to fetch."),
    ] = None,
    to: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--to", help="Copy the checkpoint into this folder instead of the Hugging Face cache."),
    ] = None,
) -> None:
    """Fetch a checkpoint for offline use later."""
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


@contextlib.contextmanager
def _session(*, quiet: bool, verbose: bool) -> Iterator[_Reporter]:
    """Run one md or ocr command: report as it goes, print the summary, exit with the code it earned."""
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    _configure_logging(console, verbose=verbose, quiet=quiet)
    reporter = _Reporter(console, quiet=quiet, verbose=verbose)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield reporter
    except KosmosError as error:
        reporter.stop()
        reporter.error(error)
        raise typer.Exit(error.exit_code) from None
    except BrokenPipeError:
        # The reader of stdout is gone (`| head`): stop quietly, as a shell tool killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(EXIT_BROKEN_PIPE) from None
    except KeyboardInterrupt:
        reporter.stop()
        console.print("error: interrupted; finished documents are kept, rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except _Terminated:
        reporter.stop()
        console.print("error: terminated; finished documents are kept, rerun the same command to resume")
        raise typer.Exit(EXIT_TERMINATED) from None
    except Exception as error:  # a bug, not bad input: the traceback, for the report
        reporter.stop()
        console.print("".join(traceback.format_exception(error)).rstrip(), markup=False)
        console.print(f"error: kosmos crashed: {type(error).__name__}: {error}", markup=False)
        console.print("hint: this is a bug; please report it with the traceback above", markup=False)
        raise typer.Exit(EXIT_CRASH) from None
    finally:
        reporter.stop()
    summary = reporter.summary
    console.print(_summary_line(summary), markup=False)
    raise typer.Exit(1 if summary.failed else 0)


class _Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C, with its own exit code."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


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
        self.showing = False  # the bar is live: from the first pages counted to `stop`
        self.summary = Summary()  # the run's, once it returns

    def stop(self) -> None:
        """Take the bar down, for the summary or an error to follow."""
        if self.showing:
            self.progress.stop()
            self.showing = False

    def add_total(self, pages: int) -> None:
        if not self.showing:
            self.progress.start()
            self.showing = True
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
        console.print("".join(traceback.format_exception(cause)).rstrip(), markup=False)


def _summary_line(summary: Summary) -> str:
    elapsed = time.monotonic() - summary.started
    parts = [
        f"{summary.documents_done} done",
        f"{summary.documents_skipped} skipped (done before)",
        f"{summary.documents_failed} failed",
    ]
    if summary.documents_unselected:
        parts.append(f"{summary.documents_unselected} without a selected page")
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
        # The run is over and its exit code decided: a Ctrl-C from here on (exit handlers, teardown)
        # changes nothing, and must not print a traceback or end the process by SIGINT instead.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if done.code not in (EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_BROKEN_PIPE, EXIT_CRASH):
            raise
        # Stopped early, torch's and the tokenizer's native threads may still run, and tearing the
        # interpreter down under them can abort ("terminate called without an active exception").
        # Run the exit handlers (temporary files, the reader process), then leave at once.
        atexit._run_exitfuncs()
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os._exit(int(done.code))
