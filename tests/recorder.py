"""What a job tells and leaves behind, kept for tests: a recording Reporter, summary counts, written files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kosmos_cli import KosmosError, PageResult
from kosmos_cli.reporting import Summary


@dataclass
class Recorder:
    """A Reporter that keeps what it is told; errors as `message` plus `\\nhint: ...` when there is one."""

    total: int = 0
    loaded: list[str] = field(default_factory=list)
    results: list[PageResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def loading(self, message: str) -> None:
        self.loaded.append(message)

    def add_total(self, pages: int) -> None:
        self.total += pages

    def page_done(self, result: PageResult) -> None:
        self.results.append(result)

    def error(self, error: KosmosError) -> None:
        self.errors.append(error.message + (f"\nhint: {error.hint}" if error.hint else ""))

    def warning(self, message: str) -> None:
        self.warnings.append(message)


def counts(summary: Summary) -> tuple[int, ...]:
    """Done, skipped, failed documents; pages done, resumed, failed."""
    return (
        summary.documents_done,
        summary.documents_skipped,
        summary.documents_failed,
        summary.pages_done,
        summary.pages_resumed,
        summary.pages_failed,
    )


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` but the run records in `.kosmos/`, by relative POSIX path, with its bytes."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and ".kosmos" not in path.relative_to(folder).parts
    }
