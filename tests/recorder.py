"""A Reporter for tests that keeps what the job tells it."""

from __future__ import annotations

from dataclasses import dataclass, field

from kosmos_cli import KosmosError, PageResult


@dataclass
class Recorder:
    """A Reporter that keeps what it is told; errors as `message` plus `\\nhint: ...` when there is one."""

    total: int = 0
    results: list[PageResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add_total(self, pages: int) -> None:
        self.total += pages

    def page_done(self, result: PageResult) -> None:
        self.results.append(result)

    def error(self, error: KosmosError) -> None:
        self.errors.append(error.message + (f"\nhint: {error.hint}" if error.hint else ""))

    def warning(self, message: str) -> None:
        self.warnings.append(message)
