"""A page's markdown as blocks: headings, paragraphs, tables, list items, formulas and code.

The unit `--attention` gives a region and `-f chunks` writes as one retrieval chunk. Blocks are found
in the tidy markdown (`parsing.tidy_markdown`) line by line; each knows which of the page's non-blank
lines it holds, the lines `parsing.markdown_line_tokens` maps to the model's tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class BlockKind(str, Enum):
    HEADING = "heading"
    PARAGRAPH = "paragraph"
    TABLE = "table"
    LIST_ITEM = "list_item"
    FORMULA = "formula"
    CODE = "code"


@dataclass(frozen=True)
class Block:
    """One block of a page's markdown."""

    kind: BlockKind
    text: str
    lines: range  # which of the page's non-blank lines it holds (0-based)
    level: int = 0  # a heading's level (1-6); 0 for other kinds


_HEADING = re.compile(r"(#{1,6})\s+(.*)")
_ITEM = re.compile(r"(?:[-*+]|\d{1,9}[.)])\s")
_FENCE = re.compile(r"```|~~~")
# What opens a block that runs to its closing line: (kind, opening, closing).
_SPANS = (
    (BlockKind.CODE, _FENCE, _FENCE),
    (BlockKind.FORMULA, re.compile(r"\$\$"), re.compile(r".*\$\$\s*$")),
    (BlockKind.FORMULA, re.compile(r"\\\["), re.compile(r".*\\\]\s*$")),
    (BlockKind.TABLE, re.compile(r"<table\b", re.IGNORECASE), re.compile(r".*</table>", re.IGNORECASE)),
)


def markdown_blocks(markdown: str) -> list[Block]:
    """Split markdown into blocks, in reading order."""
    lines = [line.strip() for line in markdown.split("\n")]
    blocks: list[Block] = []
    ordinal = 0  # non-blank lines seen
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line:
            index += 1
            continue
        kind, end = _block_at(lines, index)
        taken = [text for text in lines[index:end] if text]
        first = ordinal
        ordinal += len(taken)
        heading = _HEADING.fullmatch(line) if kind is BlockKind.HEADING else None
        text = "\n".join(taken)
        level = len(heading[1]) if heading else 0
        blocks.append(Block(kind, text, range(first, ordinal), level))
        index = end
    return blocks


def _block_at(lines: list[str], start: int) -> tuple[BlockKind, int]:
    """The kind of the block that starts at `lines[start]` (non-blank) and the index just past it."""
    line = lines[start]
    if _HEADING.fullmatch(line):
        return BlockKind.HEADING, start + 1
    for kind, opening, closing in _SPANS:
        opened = opening.match(line)
        if opened:
            rest = line[opened.end() :]
            if closing.match(rest) and (kind is not BlockKind.CODE or rest.strip()):
                return kind, start + 1
            for end in range(start + 1, len(lines)):
                if closing.match(lines[end]):
                    return kind, end + 1
            return kind, len(lines)
    end = start + 1
    if line.startswith("|"):  # a pipe table: its rows
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        return BlockKind.TABLE, end
    kind = BlockKind.LIST_ITEM if _ITEM.match(line) else BlockKind.PARAGRAPH
    while end < len(lines) and lines[end] and not _starts_block(lines[end]):
        end += 1
    return kind, end


def _starts_block(line: str) -> bool:
    return bool(
        _HEADING.fullmatch(line)
        or _ITEM.match(line)
        or line.startswith("|")
        or any(opening.match(line) for _, opening, _ in _SPANS)
    )
