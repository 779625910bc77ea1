"""Page numbering: users' 1-based page numbers and `--pages`, kosmos's 0-based page indices.

This is the one place where one becomes the other (`page_number`, `PageSelection.indices`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kosmos_cli.errors import UsageError


def page_number(page_index: int) -> int:
    """Return the 1-based page number users see for a 0-based page index."""
    return page_index + 1


def page_index(page_number: int) -> int:
    """Return the 0-based page index of a 1-based page number (as a file kosmos wrote gives it)."""
    if page_number < 1:
        raise ValueError(f"pages are numbered from 1, not {page_number}")
    return page_number - 1


_PAGES_HINT = "use 1-based page numbers and ranges, e.g. 1-3,7,10- (10- runs to the last page)"
_RANGE = re.compile(r"(\d*)\s*(-?)\s*(\d*)", re.ASCII)


@dataclass(frozen=True)
class PageSelection:
    """Pages asked for with --pages: 1-based inclusive ranges, `None` as the end of an open range."""

    ranges: tuple[tuple[int, int | None], ...]

    def indices(self, page_count: int) -> list[int]:
        """Return the 0-based indices selected in a document of `page_count` pages, ascending, once each.

        A range past the document's end selects the pages it has: `--pages 1-3` over a folder reads
        one-page images too. The selection may be empty (`--pages 2-` of a one-page image).
        """
        chosen: set[int] = set()
        for first, last in self.ranges:
            chosen.update(range(first - 1, page_count if last is None else min(last, page_count)))
        return sorted(chosen)

    def __str__(self) -> str:
        """The selection as --pages takes it: `1-3,7,10-`."""
        return ",".join(
            f"{first}-" if last is None else str(first) if last == first else f"{first}-{last}"
            for first, last in self.ranges
        )


def parse_pages(spec: str) -> PageSelection:
    """Parse a --pages value such as `1-3,7,10-` (1-based, inclusive, `10-` open-ended, `-3` from 1)."""
    if not spec.strip():
        raise UsageError("--pages is empty", hint=_PAGES_HINT)
    ranges: list[tuple[int, int | None]] = []
    for part in spec.split(","):
        ranges.append(_parse_range(part.strip(), spec))
    return PageSelection(tuple(ranges))


def _parse_range(part: str, spec: str) -> tuple[int, int | None]:
    match = _RANGE.fullmatch(part)
    if not part:
        problem = "an empty range"
    elif match is None or not (match[1] or match[3]) or (match[1] and match[3] and not match[2]):
        problem = f"`{part}` is not a page number or range"
    else:
        first = int(match[1]) if match[1] else 1
        last = first if not match[2] else int(match[3]) if match[3] else None
        if first == 0 or last == 0:
            problem = "pages are numbered from 1"
        elif last is not None and last < first:
            problem = f"the range `{part}` runs backwards"
        else:
            return first, last
    raise UsageError(f"--pages `{spec}`: {problem}", hint=_PAGES_HINT)
