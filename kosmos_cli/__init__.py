"""kosmos: transcribe scans, photos and PDFs to markdown or OCR lines with boxes, using Kosmos-2.5."""

from __future__ import annotations

from kosmos_cli.api import Transcriber, transcribe_files
from kosmos_cli.config import Job, RayOptions, Settings
from kosmos_cli.errors import InputError, KosmosError, ModelLoadError, UsageError
from kosmos_cli.parsing import parse_ocr, tidy_markdown
from kosmos_cli.reporting import Reporter, Summary
from kosmos_cli.values import Document, Line, Page, PageInfo, PageResult, Status, Task

__version__ = "0.1.0"

__all__ = [
    "Document",
    "InputError",
    "Job",
    "KosmosError",
    "Line",
    "ModelLoadError",
    "Page",
    "PageInfo",
    "PageResult",
    "RayOptions",
    "Reporter",
    "Settings",
    "Status",
    "Summary",
    "Task",
    "Transcriber",
    "UsageError",
    "__version__",
    "parse_ocr",
    "tidy_markdown",
    "transcribe_files",
]
