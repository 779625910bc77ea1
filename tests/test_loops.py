"""The loop detector: scripted loops are caught at the right token, legitimate repetition is left alone."""

from __future__ import annotations

import random
from itertools import chain

import pytest

from kosmos_cli.checkpoint import BBOX_END_ID, BBOX_START_ID, x_token_id, y_token_id
from kosmos_cli.loops import DEFAULT_MIN_SPAN, Loop, LoopDetector, LoopRule, find_loop

RULE = LoopRule()
NEWLINE = 198  # "\n" in cl100k_base
PIPE, DASHES, SPACE_PIPE = 91, 11192, 765  # "|", "---", " |"
DOTS = 1131  # a run of dots in a dot leader


def prefix(length: int, *, seed: int = 0) -> list[int]:
    """Distinct ids that share nothing with the blocks below, so a loop starts exactly after them."""
    return random.Random(seed).sample(range(50_000, 60_000), length)


def bbox(x0: int, y0: int, x1: int, y1: int) -> list[int]:
    return [BBOX_START_ID, x_token_id(x0), y_token_id(y0), x_token_id(x1), y_token_id(y1), BBOX_END_ID]


def ocr_lines(count: int, text: list[int]) -> list[int]:
    """`count` OCR lines one under the other, every one with the same text (a column of zeros)."""
    ids: list[int] = []
    for line in range(count):
        ids += bbox(40, 30 + 12 * line, 90, 40 + 12 * line) + text + [NEWLINE]
    return ids


def first_detection(ids: list[int], rule: LoopRule = RULE) -> tuple[int, Loop] | None:
    """Feed ids one by one; return the index of the id that made the loop, and the loop."""
    detector = LoopDetector(rule)
    for index, token in enumerate(ids):
        loop = detector.push(token)
        if loop is not None:
            return index, loop
    return None


LOOPS = [
    # (name, prefix length, repeated block, repeats)
    ("one token", 30, [7], 400),
    ("two tokens", 5, [7, 8], 200),
    ("markdown sentence", 50, list(range(1000, 1012)), 40),
    ("ocr line with the same box", 80, [*bbox(10, 20, 300, 40), 4000, 4001, 4002, NEWLINE], 30),
    ("long paragraph", 10, list(range(2000, 2090)), 5),
    ("at the very start", 0, [5, 6, 7], 100),
]


@pytest.mark.parametrize(("name", "before", "block", "repeats"), LOOPS, ids=[row[0] for row in LOOPS])
def test_loop_is_caught_where_its_span_is_reached(
    name: str, before: int, block: list[int], repeats: int
) -> None:
    ids = prefix(before) + block * repeats
    found = first_detection(ids)
    assert found is not None
    index, loop = found
    assert loop.period == len(block)
    assert loop.start == before
    assert index == before + RULE.span_needed(len(block)) - 1  # the first token that completes the span
    assert ids[: loop.keep] == prefix(before) + block  # what came before, plus one occurrence


LEGITIMATE = [
    ("300 ocr lines of the same text", ocr_lines(300, [15, 13, 15])),
    ("300 ocr lines of a one-token text", ocr_lines(300, [15])),
    ("a wide table rule", [PIPE] + [DASHES, PIPE] * 60 + [NEWLINE]),
    (
        "a table with a rule and distinct rows",
        [
            PIPE,
            *[DASHES, PIPE] * 8,
            NEWLINE,
            *chain.from_iterable([PIPE, 3000 + r, PIPE, 4000 + r, NEWLINE] for r in range(200)),
        ],
    ),
    ("a table of 15 empty rows", ([PIPE] + [SPACE_PIPE] * 9 + [NEWLINE]) * 15),
    (
        "a table of contents with dot leaders",
        list(
            chain.from_iterable([5000 + n, 220, DOTS, DOTS, DOTS, 220, 6000 + n, NEWLINE] for n in range(80))
        ),
    ),
    ("a dot leader of 100 tokens", [5000] + [DOTS] * 100 + [6000]),
    ("three signature lines", ([9000, 9001, 62] + [DOTS] * 12 + [NEWLINE]) * 3),
]


@pytest.mark.parametrize(("name", "ids"), LEGITIMATE, ids=[row[0] for row in LEGITIMATE])
def test_legitimate_repetition_is_left_alone(name: str, ids: list[int]) -> None:
    assert find_loop(ids) is None


def test_a_long_run_of_one_token_is_a_loop() -> None:
    assert find_loop([5000] + [DOTS] * DEFAULT_MIN_SPAN) is not None


def test_shortest_period_is_reported() -> None:
    loop = find_loop([1, 2] * 300)
    assert loop is not None and loop.period == 2


def test_a_loop_after_ocr_lines_keeps_the_lines() -> None:
    lines = ocr_lines(40, [15, 16])
    stuck = [*bbox(40, 900, 90, 916), 17, 18, NEWLINE]
    ids = lines + stuck * 50
    loop = find_loop(ids)
    assert loop is not None
    # The last good line ends in the newline the stuck line repeats, so the periodic tail starts one
    # token early: the kept occurrence is the stuck line without its final newline.
    assert ids[: loop.keep] == lines + stuck[:-1]


def test_rule_can_be_tightened() -> None:
    rule = LoopRule(max_period=4, min_span=8, min_repeats=2)
    assert find_loop([1, 2, 3] * 3, rule) is not None
    assert find_loop([1, 2, 3, 4, 5] * 10, rule) is None  # period above max_period


def test_extend_returns_the_first_loop() -> None:
    detector = LoopDetector(LoopRule(max_period=2, min_span=4, min_repeats=2))
    loop = detector.extend([9, 1, 1, 1, 1, 1, 1])
    assert loop == Loop(keep=2, period=1, start=1)
    assert detector.ids == [9, 1, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("rule", [dict(max_period=0), dict(min_span=1), dict(min_repeats=1)])
def test_rule_rejects_nonsense(rule: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        LoopRule(**rule)
