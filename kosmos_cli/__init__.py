"""kosmos: transcribe scans, photos and PDFs to markdown or OCR lines with boxes, using Kosmos-2.5."""

from __future__ import annotations

from kosmos_cli.errors import InputError, KosmosError, ModelLoadError, UsageError
from kosmos_cli.parsing import parse_ocr, tidy_markdown
from kosmos_cli.transcribe import Transcriber
from kosmos_cli.values import Document, Line, Page, PageInfo, PageResult, Status, Task

__version__ = "0.1.0"

__all__ = [
    "Document",
    "InputError",
    "KosmosError",
    "Line",
    "ModelLoadError",
    "Page",
    "PageInfo",
    "PageResult",
    "Status",
    "Task",
    "Transcriber",
    "UsageError",
    "__version__",
    "parse_ocr",
    "tidy_markdown",
]
