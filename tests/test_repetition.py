"""The loop detector: runaway loops stop early, the repetition real pages have is left alone."""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import chain

import pytest

from kosmos_cli.repetition import (
    DEFAULT_MIN_SPAN,
    Loop,
    LoopDetector,
    LoopKind,
    LoopRule,
    classify,
    find_loop,
)
from kosmos_cli.vocabulary import BBOX_END_ID, BBOX_START_ID, FIRST_COORDINATE_ID, x_token_id, y_token_id

RULE = LoopRule()
NEWLINE = 198  # "\n" in cl100k_base
PIPE, DASHES, SPACE_PIPE = 91, 11192, 765  # "|", "---", " |"
DOTS = 1131  # a run of dots in a dot leader

# A stand-in for cl100k_base over the pieces the structures below are made of, so that token counts
# are about the real ones (an empty 4-column HTML row is 20 tokens) and `decode` gives their text.
PIECES = [
    "<table>", "</table>", "<tr", "><", "td", "></", "tr", ">", ">\n", "th", "|", " |", "---", "\n",
    " 0", " Yes", " N/A", "____", "....", ". ", "Name", ":", " the", " same", " phrase", " again",
]  # fmt: skip
PIECE_ID = {piece: 40_000 + index for index, piece in enumerate(PIECES)}
PIECE_ID.update({"|": PIPE, "---": DASHES, " |": SPACE_PIPE, "\n": NEWLINE, "....": DOTS})
TEXT_OF = {token: piece for piece, token in PIECE_ID.items()}


def decode(ids: Sequence[int]) -> str:
    """Text of the ids above; bbox and coordinate tokens as tags, any other id as a word."""
    tags = {BBOX_START_ID: "<bbox>", BBOX_END_ID: "</bbox>"}
    parts = []
    for token in ids:
        if token in TEXT_OF:
            parts.append(TEXT_OF[token])
        elif token in tags:
            parts.append(tags[token])
        else:
            parts.append("<x_1>" if token >= FIRST_COORDINATE_ID else " w")
    return "".join(parts)


def tokens(*pieces: str) -> list[int]:
    return [PIECE_ID[piece] for piece in pieces]


EMPTY_HTML_ROW = tokens("<tr", *["><", "td", "></", "td"] * 4, "></", "tr", ">\n")
EMPTY_WIDE_ROW = tokens("<tr", *["><", "td", "></", "td"] * 12, "></", "tr", ">\n")


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
    detector = LoopDetector(rule, decode)
    for index, token in enumerate(ids):
        loop = detector.push(token)
        if loop is not None:
            return index, loop
    return None


PHRASE = tokens(" the", " same", " phrase", " again")
LOOPS = [
    # (name, prefix length, repeated block, repeats, kind)
    ("one word", 30, [7], 400, LoopKind.TEXT),
    ("two words", 5, [7, 8], 200, LoopKind.TEXT),
    ("the same short phrase", 50, PHRASE, 100, LoopKind.TEXT),
    ("markdown sentence", 50, list(range(1000, 1012)), 40, LoopKind.TEXT),
    ("long paragraph", 10, list(range(2000, 2090)), 5, LoopKind.TEXT),
    ("at the very start", 0, [5, 6, 7], 100, LoopKind.TEXT),
    ("ocr line with the same box", 80, [*bbox(10, 20, 300, 40), 4000, 4001, 4002, NEWLINE], 30, LoopKind.BOX),
    ("a box alone, again and again", 3, bbox(10, 20, 300, 40), 30, LoopKind.BOX),
    ("empty table rows without end", 20, EMPTY_HTML_ROW, 100, LoopKind.LAYOUT),
    ("one dot token without end", 20, [DOTS], 2000, LoopKind.LAYOUT),
]


@pytest.mark.parametrize(("name", "before", "block", "repeats", "kind"), LOOPS, ids=[row[0] for row in LOOPS])
def test_loop_is_caught_where_its_span_is_reached(
    name: str, before: int, block: list[int], repeats: int, kind: LoopKind
) -> None:
    ids = prefix(before) + block * repeats
    found = first_detection(ids)
    assert found is not None
    index, loop = found
    assert (loop.period, loop.kind) == (len(block), kind)
    assert loop.start == before
    assert index == before + RULE.span_needed(len(block), kind) - 1  # the first token that completes the span
    assert ids[: loop.keep] == prefix(before) + block  # what came before, plus one occurrence


def test_loops_stop_early() -> None:
    # A stuck box stops after three lines, a stuck phrase after 200 tokens: most of a 4,000-token budget saved.
    box_line = [*bbox(10, 20, 300, 40), 4000, NEWLINE]
    assert first_detection(box_line * 100) == (
        3 * len(box_line) - 1,
        Loop(len(box_line), len(box_line), 0, LoopKind.BOX),
    )
    found = first_detection(PHRASE * 200)
    assert found is not None and found[0] == DEFAULT_MIN_SPAN - 1


def table(rows: list[list[str]]) -> list[int]:
    """A markdown table: a header, its rule, then the rows (cells are pieces)."""
    width = len(rows[0])
    ids = tokens("|", *[" Yes", " |"] * width, "\n", "|", *["---", "|"] * width, "\n")
    for row in rows:
        ids += tokens("|", *chain.from_iterable([cell, " |"] for cell in row), "\n")
    return ids


LEGITIMATE = [
    ("300 ocr lines of the same text", ocr_lines(300, [15, 13, 15])),
    ("300 ocr lines of a one-token text (a column of zeros)", ocr_lines(300, [PIECE_ID[" 0"]])),
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
    ("a markdown table of 15 empty rows", ([PIPE] + [SPACE_PIPE] * 9 + [NEWLINE]) * 15),
    ("ten empty rows of a 4-column HTML table", tokens("<table>") + EMPTY_HTML_ROW * 10 + tokens("</table>")),
    (
        "forty empty rows of a 4-column HTML table",
        tokens("<table>") + EMPTY_HTML_ROW * 40 + tokens("</table>"),
    ),
    (
        "twenty empty rows of a 12-column HTML table",
        tokens("<table>") + EMPTY_WIDE_ROW * 20 + tokens("</table>"),
    ),
    ("a table of 60 rows of zeros", table([[" 0"] * 4] * 60)),
    ("a table of 40 rows of Yes", table([[" Yes"] * 3] * 40)),
    ("a table of 50 rows of N/A", table([[" N/A"] * 6] * 50)),
    (
        "a form of 30 blank lines",
        tokens(*["Name", ":", "____", "____", "____", "\n"] * 2) + tokens("____", "____", "\n") * 30,
    ),
    (
        "a table of contents with dot leaders",
        list(
            chain.from_iterable([5000 + n, 220, DOTS, DOTS, DOTS, 220, 6000 + n, NEWLINE] for n in range(80))
        ),
    ),
    ("a dot leader of 300 tokens", [5000] + [DOTS] * 300 + [6000]),
    ("a spaced leader of 400 tokens", [5000] + tokens(". ") * 400 + [6000]),
    ("three signature lines", ([9000, 9001, 62] + [DOTS] * 12 + [NEWLINE]) * 3),
]


@pytest.mark.parametrize(("name", "ids"), LEGITIMATE, ids=[row[0] for row in LEGITIMATE])
def test_legitimate_repetition_is_left_alone(name: str, ids: list[int]) -> None:
    assert find_loop(ids, decode=decode) is None


@pytest.mark.parametrize(
    ("block", "kind"),
    [
        ([*bbox(1, 2, 3, 4), 7], LoopKind.BOX),
        ([7, 4000, BBOX_START_ID, x_token_id(1)], LoopKind.BOX),  # a rotation that splits the box
        (EMPTY_HTML_ROW, LoopKind.LAYOUT),
        (EMPTY_HTML_ROW[7:] + EMPTY_HTML_ROW[:7], LoopKind.LAYOUT),  # starts inside a tag
        (tokens("|", " Yes", " |"), LoopKind.LAYOUT),  # table markup, words or not
        (tokens(" 0", "\n"), LoopKind.LAYOUT),
        (tokens("....", ". ", "____"), LoopKind.LAYOUT),
        (PHRASE, LoopKind.TEXT),
        ([7, 8], LoopKind.TEXT),
    ],
)
def test_blocks_are_classified_by_what_they_hold(block: list[int], kind: LoopKind) -> None:
    assert classify(block, decode) is kind


def test_without_a_decoder_only_boxes_and_text_are_told_apart() -> None:
    assert classify(EMPTY_HTML_ROW, None) is LoopKind.TEXT
    assert classify(bbox(1, 2, 3, 4), None) is LoopKind.BOX


def test_shortest_period_is_reported() -> None:
    loop = find_loop([1, 2] * 300)
    assert loop is not None and loop.period == 2


def test_a_loop_after_ocr_lines_keeps_the_lines() -> None:
    lines = ocr_lines(40, [15, 16])
    stuck = [*bbox(40, 900, 90, 916), 17, 18, NEWLINE]
    ids = lines + stuck * 50
    loop = find_loop(ids, decode=decode)
    assert loop is not None and loop.kind is LoopKind.BOX
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
    assert loop == Loop(keep=2, period=1, start=1, kind=LoopKind.TEXT)
    assert detector.ids == [9, 1, 1, 1, 1, 1, 1]


def test_describe_names_the_block() -> None:
    loop = Loop(keep=30, period=20, start=10, kind=LoopKind.LAYOUT)
    assert loop.describe() == "repetition loop cut: a 20-token layout block repeating from token 10"


@pytest.mark.parametrize(
    "rule",
    [
        dict(max_period=0),
        dict(min_span=1),
        dict(min_repeats=1),
        dict(layout_min_span=1),
        dict(box_min_repeats=1),
    ],
)
def test_rule_rejects_nonsense(rule: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        LoopRule(**rule)
