"""Spot a runaway repetition loop in generated token ids, cheaply, one token at a time.

Greedy decoding on a page the model cannot read can repeat the same few tokens until the token
budget runs out. A loop shows up as a *periodic tail*: the last S ids repeat with some period p
(`ids[i] == ids[i - p]` for every i in the tail). How long a periodic tail may grow before it counts
as a loop depends on what repeats, because real pages repeat themselves too:

- **box**: the repeated block holds a `<bbox>`. Every real `<ocr>` line has its own coordinates, so the
  same line at the same place three times over is a loop at once, however short.
- **layout**: the block is table markup (`|`, `<td>`, `<tr>`, `<th>`) or has no letters at all (rules,
  dot leaders, empty cells, a column of the same number). Empty table rows, form lines and tables of
  identical values are real content, so these may repeat for `layout_min_span` tokens (about 60 empty
  rows of a 4-column HTML table) before they are called a loop.
- **text**: anything else, i.e. words. The same phrase over `min_span` tokens is a loop.

`no_repeat_ngram_size` is no substitute: it forbids the repeated bbox n-grams that `<ocr>` needs.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from kosmos_cli.vocabulary import BBOX_START_ID

DEFAULT_MAX_PERIOD = 128  # tokens; longer repeated blocks are not looked for
DEFAULT_MIN_SPAN = 200  # tokens of repeated words before a loop is called
DEFAULT_MIN_REPEATS = 3  # periods in that tail, so long blocks must repeat this often
DEFAULT_LAYOUT_MIN_SPAN = 1200  # tokens of repeated table rows, rules or numbers before a loop is called
DEFAULT_BOX_MIN_REPEATS = 3  # times the same line at the same place makes a loop

Decode = Callable[[Sequence[int]], str]  # token ids to text, special tokens and tags kept

_TAG = re.compile(r"<[^<>]*>")
_TABLE_MARKUP = re.compile(r"\||<t[dhr][\s>]", re.IGNORECASE)


class LoopKind(Enum):
    """What repeats, which sets how long it may repeat (see the module docstring)."""

    BOX = "box"
    LAYOUT = "layout"
    TEXT = "text"


@dataclass(frozen=True)
class Loop:
    """A detected loop: `ids[:keep]` is the text before the loop plus one occurrence of the block."""

    keep: int  # number of ids to keep
    period: int  # tokens in the repeated block
    start: int  # index of the first id of the periodic tail
    kind: LoopKind  # what repeats

    def describe(self) -> str:
        """One line for the page's truncation note."""
        block = f"a {self.period}-token {self.kind.value} block"
        return f"repetition loop cut: {block} repeating from token {self.start}"


@dataclass(frozen=True)
class LoopRule:
    """When a periodic tail counts as a loop."""

    max_period: int = DEFAULT_MAX_PERIOD
    min_span: int = DEFAULT_MIN_SPAN
    min_repeats: int = DEFAULT_MIN_REPEATS
    layout_min_span: int = DEFAULT_LAYOUT_MIN_SPAN
    box_min_repeats: int = DEFAULT_BOX_MIN_REPEATS

    def __post_init__(self) -> None:
        if self.max_period < 1 or self.min_span < 2 or self.layout_min_span < 2:
            raise ValueError("max_period must be >= 1, min_span and layout_min_span >= 2")
        if self.min_repeats < 2 or self.box_min_repeats < 2:
            raise ValueError("min_repeats and box_min_repeats must be >= 2")

    def span_needed(self, period: int, kind: LoopKind = LoopKind.TEXT) -> int:
        """Return how long a tail of this period and kind must be to count as a loop."""
        if kind is LoopKind.BOX:
            return self.box_min_repeats * period
        span = self.layout_min_span if kind is LoopKind.LAYOUT else self.min_span
        return max(span, self.min_repeats * period)

    def shortest_span(self, period: int) -> int:
        """The span at which a tail of this period could first count, whatever its kind."""
        return min(self.span_needed(period, kind) for kind in LoopKind)


def classify(block: Sequence[int], decode: Decode | None) -> LoopKind:
    """Say what kind of block `block` (one period of a periodic tail, in any rotation) is."""
    if BBOX_START_ID in block:
        return LoopKind.BOX
    if decode is None:
        return LoopKind.TEXT
    # Twice over, so that a tag cut by the rotation is whole in the middle; the cut ends are dropped.
    text = decode([*block, *block])
    if _TABLE_MARKUP.search(text):
        return LoopKind.LAYOUT
    words = _TAG.sub(" ", text)
    words = re.sub(r"^[^<>]*>|<[^<>]*$", " ", words)
    return LoopKind.TEXT if any(char.isalpha() for char in words) else LoopKind.LAYOUT


class LoopDetector:
    """Follow one row's generated ids and say when their tail has become a loop.

    For each period p it keeps the current run of positions i where `ids[i] == ids[i - p]`; the
    periodic tail of period p is that run plus p. `push` only visits the periods at which the new id
    occurred before (within `max_period`), so ordinary text costs a few steps per token and only a
    tight loop costs up to `max_period`. A run is classified (decoded) once, when it first could count.
    """

    def __init__(self, rule: LoopRule | None = None, decode: Decode | None = None) -> None:
        self.rule = rule or LoopRule()
        self.decode = decode
        self.ids: list[int] = []
        self._seen: dict[int, deque[int]] = {}  # id -> its recent positions, oldest first
        self._run_length: dict[int, int] = {}  # period -> length of the run ending at _run_end
        self._run_end: dict[int, int] = {}  # period -> last position of that run
        self._kind: dict[int, tuple[int, LoopKind]] = {}  # period -> (run start, its kind)

    def push(self, token: int) -> Loop | None:
        """Add the next generated id; return the loop when the tail has just become one."""
        index = len(self.ids)
        self.ids.append(token)
        rule = self.rule
        positions = self._seen.setdefault(token, deque())
        while positions and index - positions[0] > rule.max_period:
            positions.popleft()
        found: Loop | None = None
        for position in reversed(positions):  # shortest period first
            period = index - position
            run = self._run_length[period] + 1 if self._run_end.get(period) == index - 1 else 1
            self._run_length[period] = run
            self._run_end[period] = index
            if found is None and run + period >= rule.shortest_span(period):
                start = index + 1 - run - period
                kind = self._kind_of(period, start, index)
                if run + period >= rule.span_needed(period, kind):
                    found = Loop(keep=start + period, period=period, start=start, kind=kind)
        positions.append(index)
        return found

    def _kind_of(self, period: int, start: int, index: int) -> LoopKind:
        known = self._kind.get(period)
        if known is not None and known[0] == start:
            return known[1]
        kind = classify(self.ids[index + 1 - period : index + 1], self.decode)
        self._kind[period] = (start, kind)
        return kind

    def extend(self, tokens: Sequence[int]) -> Loop | None:
        """Push several ids; return the first loop found (later ids are still recorded)."""
        first: Loop | None = None
        for token in tokens:
            loop = self.push(token)
            if first is None:
                first = loop
        return first


def find_loop(ids: Sequence[int], rule: LoopRule | None = None, decode: Decode | None = None) -> Loop | None:
    """Return the first point at which `ids` became a loop, or None."""
    detector = LoopDetector(rule, decode)
    for token in ids:
        loop = detector.push(token)
        if loop is not None:
            return loop
    return None
