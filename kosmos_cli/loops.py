"""Spot a runaway repetition loop in generated token ids, cheaply, one token at a time.

Greedy decoding on a page the model cannot read can repeat the same few tokens until the token
budget runs out (issue 5). A loop shows up as a *periodic tail*: the last S ids repeat with some
period p (`ids[i] == ids[i - p]` for every i in the tail). Legitimately repetitive output is not
periodic over long stretches: every `<ocr>` line carries its own `<bbox><x_a><y_b><x_c><y_d></bbox>`
coordinates, and a markdown table rule or a dot leader is a handful of tokens. So a loop is a tail of
period `p <= max_period` that spans at least `min_span` tokens and at least `min_repeats` periods.

`no_repeat_ngram_size` is no substitute: it forbids the repeated bbox n-grams that `<ocr>` needs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_MAX_PERIOD = 128  # tokens; longer repeated blocks are not looked for
DEFAULT_MIN_SPAN = 200  # tokens of periodic tail before a loop is called
DEFAULT_MIN_REPEATS = 3  # periods in that tail, so long blocks must repeat this often


@dataclass(frozen=True)
class Loop:
    """A detected loop: `ids[:keep]` is the text before the loop plus one occurrence of the block."""

    keep: int  # number of ids to keep
    period: int  # tokens in the repeated block
    start: int  # index of the first id of the periodic tail


@dataclass(frozen=True)
class LoopRule:
    """When a periodic tail counts as a loop."""

    max_period: int = DEFAULT_MAX_PERIOD
    min_span: int = DEFAULT_MIN_SPAN
    min_repeats: int = DEFAULT_MIN_REPEATS

    def __post_init__(self) -> None:
        if self.max_period < 1 or self.min_span < 2 or self.min_repeats < 2:
            raise ValueError("max_period must be >= 1, min_span and min_repeats >= 2")

    def span_needed(self, period: int) -> int:
        """Return how long a tail of this period must be to count as a loop."""
        return max(self.min_span, self.min_repeats * period)


class LoopDetector:
    """Follow one row's generated ids and say when their tail has become a loop.

    For each period p it keeps the current run of positions i where `ids[i] == ids[i - p]`; the
    periodic tail of period p is that run plus p. `push` only visits the periods at which the new id
    occurred before (within `max_period`), so ordinary text costs a few steps per token and only a
    tight loop costs up to `max_period`.
    """

    def __init__(self, rule: LoopRule | None = None) -> None:
        self.rule = rule or LoopRule()
        self.ids: list[int] = []
        self._seen: dict[int, deque[int]] = {}  # id -> its recent positions, oldest first
        self._run_length: dict[int, int] = {}  # period -> length of the run ending at _run_end
        self._run_end: dict[int, int] = {}  # period -> last position of that run

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
            if found is None and run + period >= rule.span_needed(period):
                start = index + 1 - run - period
                found = Loop(keep=start + period, period=period, start=start)
        positions.append(index)
        return found

    def extend(self, tokens: Sequence[int]) -> Loop | None:
        """Push several ids; return the first loop found (later ids are still recorded)."""
        first: Loop | None = None
        for token in tokens:
            loop = self.push(token)
            if first is None:
                first = loop
        return first


def find_loop(ids: Sequence[int], rule: LoopRule | None = None) -> Loop | None:
    """Return the first point at which `ids` became a loop, or None."""
    detector = LoopDetector(rule)
    for token in ids:
        loop = detector.push(token)
        if loop is not None:
            return loop
    return None
