"""What a run is asked to do: the model's `Settings`, the `Job`, Ray's `RayOptions`, and every default.

Each option's choices, default and unit are stated here once; the CLI builds its help from them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from kosmos_cli.errors import UsageError
from kosmos_cli.pages import PageSelection
from kosmos_cli.values import Task

DEFAULT_MODEL = "microsoft/kosmos-2.5"
MODEL_ENV = "KOSMOS_MODEL"  # overrides DEFAULT_MODEL
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")
QUANTIZATIONS = ("int8",)
KV_DTYPES = ("auto", "bfloat16", "float16", "float8")  # --kv-dtype: the KV cache's; auto: the weights'
TEXT_LAYERS = ("auto", "ignore", "only")  # --text-layer: how a PDF page's own text is used (`text_layer`)
# The reference's budget: microsoft/unilm kosmos-2.5/inference.py generates up to max_len_b=4000 new
# tokens. A dense OCR page costs about 24 tokens a line, so 2,044 (what the 4096-row position table
# leaves after the 2052-token prompt) cut pages of more than about 85 lines; the sinusoidal table is
# grown to fit instead (`model.patches.fit_positions`).
DEFAULT_MAX_NEW_TOKENS = 4000
MIN_DPI = 10.0  # PDF render resolution below which no text is legible
DEFAULT_PAGE_TIMEOUT = 120.0  # seconds to open or render one page (BENCHMARKS.md: real pages take < 2 s)
DEFAULT_FORMATS = {Task.MD: "md", Task.OCR: "txt"}  # what a run writes when no format is asked for
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own variable: the cluster `--ray` joins when no address is given
DEFAULT_GPUS_PER_WORKER = 1.0  # GPUs each Ray model actor reserves; 0.5 puts two models on one GPU

_DEVICE = re.compile(r"auto|cpu|cuda(?::\d+)?|mps")


def default_model() -> str:
    """Return the model named by `KOSMOS_MODEL`, else the hub default."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def check_device(device: str) -> str:
    """Return a device name as given, or raise UsageError for one that names no device."""
    if _DEVICE.fullmatch(device) is None:
        raise UsageError(f"`{device}` is not a device", hint=f"use one of: {', '.join(DEVICES)}")
    return device


def check_dpi(dpi: float | None) -> float | None:
    """Return a --dpi value, or raise UsageError for one below MIN_DPI or not a number."""
    if dpi is not None and not (math.isfinite(dpi) and dpi >= MIN_DPI):
        raise UsageError(f"--dpi must be at least {MIN_DPI:g}, not {dpi:g}")
    return dpi


@dataclass(frozen=True)
class Settings:
    """How to load the model and generate; fields have a CLI option of the same name unless noted."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"  # one of DEVICES
    dtype: str = "auto"  # one of DTYPES
    attn: str = "auto"  # one of ATTENTIONS
    batch_size: int | None = None  # None: chosen from the device and its free memory
    max_new_tokens: int | None = None  # None: DEFAULT_MAX_NEW_TOKENS
    compile: bool = False  # fixed batches through transformers' generate: a static cache, torch.compile'd
    cuda_graph: bool = False  # CUDA with Triton: the continuous batch's decode step captured as a CUDA graph
    quantize: str | None = None  # one of QUANTIZATIONS: int8 linears in the text decoder (CPU only)
    kv_dtype: str = "auto"  # one of KV_DTYPES: what the KV cache stores (float8: e4m3, no scale)
    threads: int | None = None  # CPU threads; None: the cores this process may run on
    attention: bool = False  # keep where each token looked on the page (decode loop only)
    detect_loops: bool = True  # stop a page whose output repeats itself (no CLI option)
    ignore_eos: bool = False  # benchmarks only: always generate max_new_tokens (no CLI option)

    def __post_init__(self) -> None:
        check_device(self.device)
        for name, value, choices in (
            ("dtype", self.dtype, DTYPES),
            ("attn", self.attn, ATTENTIONS),
            ("quantize", self.quantize, (None, *QUANTIZATIONS)),
            ("kv-dtype", self.kv_dtype, KV_DTYPES),
        ):
            if value not in choices:
                shown = ", ".join(str(choice) for choice in choices if choice is not None)
                raise UsageError(f"--{name} `{value}` is not one of: {shown}")
        for name, number in (
            ("batch-size", self.batch_size),
            ("max-new-tokens", self.max_new_tokens),
            ("threads", self.threads),
        ):
            if number is not None and number < 1:
                raise UsageError(f"--{name} must be at least 1, not {number}")
        if self.quantize is not None:
            if self.device not in ("auto", "cpu"):
                raise UsageError(
                    "--quantize int8 runs on CPU only", hint="drop --quantize, or use --device cpu"
                )
            if self.dtype not in ("auto", "float32"):
                hint = "use --dtype float32, or leave --dtype auto"
                raise UsageError("--quantize int8 needs float32 weights", hint=hint)
            if self.compile:
                raise UsageError("--quantize and --compile do not work together", hint="pick one")
        if self.compile and self.cuda_graph:
            raise UsageError(
                "--compile and --cuda-graph do not work together",
                hint="--cuda-graph keeps pages joining a running batch; --compile decodes in fixed batches",
            )
        if self.compile and self.kv_dtype != "auto":
            raise UsageError(
                "--kv-dtype applies to kosmos's own KV cache; --compile uses transformers' static one",
                hint="drop one of them (--cuda-graph keeps kosmos's cache)",
            )
        for flag, on in (("--compile", self.compile), ("--cuda-graph", self.cuda_graph)):
            if self.attention and on:
                raise UsageError(
                    f"--attention and {flag} do not work together",
                    hint=f"drop {flag}: --attention keeps rows the decode loop computes step by step",
                )
        if self.cuda_graph and not self.device.startswith(("auto", "cuda")):
            raise UsageError("--cuda-graph needs a CUDA GPU", hint="drop --cuda-graph, or use --device cuda")


@dataclass(frozen=True)
class Job:
    """What to do with every document: the task, formats, where outputs go and how pages are read."""

    task: Task
    formats: tuple[str, ...]  # writer names (`writers.WRITERS`), `draw` included for --draw
    output_dir: Path | str | None = None  # a folder or object-store URI (`stores.output_store`); None: stdout
    numbered: bool = False  # number the boxes --draw draws
    pages: PageSelection | None = None
    dpi: float | None = None  # PDF render resolution; None: the size the model reads
    password: str | None = None
    overwrite: bool = False
    fingerprint: str = ""  # every setting that changes outputs (`jobs.job_fingerprint`)
    page_timeout: float = DEFAULT_PAGE_TIMEOUT  # seconds to open or render one page
    text_layer: str = "auto"  # one of TEXT_LAYERS; md always runs the model

    def __post_init__(self) -> None:
        check_dpi(self.dpi)
        if self.text_layer not in TEXT_LAYERS:
            raise UsageError(f"--text-layer `{self.text_layer}` is not one of: {', '.join(TEXT_LAYERS)}")
        if self.task is Task.MD and self.text_layer == "only":
            raise UsageError(
                "--text-layer only applies to kosmos ocr",
                hint="kosmos md always runs the model: a PDF's text layer has no markdown structure",
            )
        if not (math.isfinite(self.page_timeout) and self.page_timeout > 0):
            raise UsageError(
                f"--page-timeout must be a positive number of seconds, not {self.page_timeout:g}"
            )
        if self.numbered and "draw" not in self.formats:
            raise UsageError("--numbered numbers the boxes --draw draws", hint="add --draw")

    @property
    def reads_text_layer(self) -> bool:
        """Whether PDF pages are read with their own text (`text_layer`): ocr, unless --text-layer ignore."""
        return self.task is Task.OCR and self.text_layer != "ignore"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a run goes on Ray (`--ray`)."""

    address: str | None = None  # a cluster to join; None: RAY_ADDRESS_ENV, else a local instance
    workers: int | None = None  # model actors; None: as many as the cluster has room for
    gpus_per_worker: float = DEFAULT_GPUS_PER_WORKER

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers must be at least 1, not {self.workers}")
        if not (math.isfinite(self.gpus_per_worker) and self.gpus_per_worker >= 0):
            raise UsageError(f"--gpus-per-worker must be 0 or more, not {self.gpus_per_worker:g}")
