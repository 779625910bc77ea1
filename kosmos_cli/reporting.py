"""What a run tells its caller as it goes (`Reporter`) and at the end (`Summary`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

from kosmos_cli.errors import KosmosError
from kosmos_cli.values import PageResult

logger = logging.getLogger("kosmos_cli")


@dataclass
class Summary:
    """Counts for the end-of-run line."""

    documents_done: int = 0
    documents_skipped: int = 0
    documents_failed: int = 0  # inputs that do not exist or cannot be read or written included
    documents_unselected: int = 0  # documents --pages selects no page of (`--pages 2-` of an image)
    pages_done: int = 0
    pages_resumed: int = 0
    pages_failed: int = 0
    pages_truncated: int = 0
    unsupported: list[str] = field(default_factory=list)  # files in folders that are not images or PDFs
    started: float = field(default_factory=time.monotonic)

    @property
    def failed(self) -> bool:
        """Whether anything failed, so the exit code must say so."""
        return self.documents_failed > 0 or self.pages_failed > 0


class Reporter(Protocol):
    """Where a run reports progress and problems (the CLI draws a bar and prints lines)."""

    def loading(self, message: str) -> None:
        """Say that the model is loading, which takes a while."""

    def add_total(self, pages: int) -> None:
        """Add pages to the expected total."""

    def page_done(self, result: PageResult) -> None:
        """Count one finished page."""

    def error(self, error: KosmosError) -> None:
        """Report one failed input or page."""

    def warning(self, message: str) -> None:
        """Report something the user should know that is not a failure."""


class LogReporter:
    """A Reporter for library calls: errors and warnings go to the `kosmos_cli` logger, with hints."""

    def loading(self, message: str) -> None:
        """Log the message at INFO."""
        logger.info("%s", message)

    def add_total(self, pages: int) -> None:
        """Nothing: no progress bar."""

    def page_done(self, result: PageResult) -> None:
        """Nothing: no progress bar."""

    def error(self, error: KosmosError) -> None:
        """Log `message (hint: ...)` at ERROR."""
        logger.error("%s", error.one_line())

    def warning(self, message: str) -> None:
        """Log the message at WARNING."""
        logger.warning("%s", message)
