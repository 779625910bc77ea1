"""Turn the model's raw output into lines with boxes, tidy markdown and the `txt` line format.

`parse_ocr` is the one place where coordinates leave the model's resized image: every box is
rescaled to original-image pixels here and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

from kosmos_cli.attention import inside
from kosmos_cli.values import Heat, Line, Point
from kosmos_cli.vocabulary import BOX_TOKEN

CONFIDENCE_DIGITS = 4  # decimals a line's confidence is kept to, in every output alike
# One line starts at `<bbox>`, or at a complete coordinate quad whose `<bbox>` went missing.
_LINE_START = re.compile(
    r"<bbox>(?:<x_(\d+)><y_(\d+)><x_(\d+)><y_(\d+)>(?:</bbox>)?)?"
    r"|<x_(\d+)><y_(\d+)><x_(\d+)><y_(\d+)></bbox>"
)
# A special token cut in half at the very end of the output (e.g. `<y_3`).
_CUT_TOKEN = re.compile(r"<(?:/?b(?:b(?:o(?:x)?)?)?|/|[xy](?:_\d*)?)$")
_BLANK_RUNS = re.compile(r"\n{2,}")
_BREAK = re.compile(r"\n|<br>")  # what ends a markdown line: `tidy_markdown` splits at both
# Control characters other than tab and newline: ESC, NUL, BEL from the model must not reach a terminal.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MARKER = re.compile(r"<!--\s*kosmos\s*:", re.IGNORECASE)  # what starts kosmos's page and document markers
_HALF_TAG = re.compile(r"<(?:/?[A-Za-z][^<>]*|/)?$")  # a tag cut off at the very end: `</tr`, `<td cl`, `<`
_TAG = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)\b[^<>]*?(/?)>")
# Elements the model's markdown uses that must be closed when the page is cut off (others are left alone:
# `<foo@bar.org>` is a link, not an element).
_CLOSABLE = frozenset(
    [
        "table",
        "thead",
        "tbody",
        "tfoot",
        "tr",
        "td",
        "th",
        "caption",
        "ul",
        "ol",
        "li",
        "p",
        "div",
        "span",
        "b",
        "i",
        "u",
        "s",
        "sub",
        "sup",
        "strong",
        "em",
        "code",
        "pre",
    ]
)


def parse_ocr(
    raw: str,
    *,
    resized_size: tuple[int, int],
    original_size: tuple[int, int],
    segments: Sequence[Sequence[float]] = (),
    heats: Sequence[Heat] = (),
) -> list[Line]:
    """Parse `<bbox><x_N><y_N><x_N><y_N></bbox>text` output into lines in original-image pixels.

    `segments` are the probabilities of each line's text tokens (`Generation.segments`); a line
    gets their mean and minimum as its confidence. They are used only when they split the output
    as its `<bbox>` markers do (one per line start, and one before the first). `heats` (`--attention`),
    where each of those groups looked in the image's pixels, give each line its `heat` and the share
    of it inside its own box (`attention_agreement`), on the same condition.
    """
    resized_w, resized_h = resized_size
    original_w, original_h = original_size
    if min(resized_w, resized_h, original_w, original_h) <= 0:
        raise ValueError(
            f"image sizes must be positive, got resized {resized_size} and original {original_size}"
        )

    def rescale(value: str, original: int, resized: int) -> int:
        # The reference's rule, microsoft/unilm kosmos-2.5/inference.py get_ocr_res:
        # int(clip(x / resized, 0, 1) * original). It is what the published scores were measured
        # with, so kosmos's boxes are the reference's to the pixel. Boxes may run past the resized
        # image (the receipt example emits x_836 at width 832): the clip keeps them on the page.
        return int(min(max(int(value) / resized, 0.0), 1.0) * original)

    raw = _CUT_TOKEN.sub("", raw)
    lines: list[Line] = []
    starts = list(_LINE_START.finditer(raw))
    matched = len(segments) == len(starts) + 1 and all(start[0].startswith("<bbox>") for start in starts)
    probabilities = list(segments) if matched else [()] * (len(starts) + 1)
    looked: list[Heat | None] = [None] * len(probabilities)
    if matched and len(heats) == len(segments):
        looked = list(heats)
    lead_end = starts[0].start() if starts else len(raw)
    _append(lines, raw[:lead_end], None, probabilities[0], looked[0])
    for index, start in enumerate(starts):
        text_end = starts[index + 1].start() if index + 1 < len(starts) else len(raw)
        text = raw[start.end() : text_end]
        numbers = [n for n in start.groups() if n is not None]
        polygon = None
        if numbers:
            x0, x1 = (rescale(numbers[i], original_w, resized_w) for i in (0, 2))
            y0, y1 = (rescale(numbers[i], original_h, resized_h) for i in (1, 3))
            # The model card drops degenerate boxes with their text; the text is kept here, without a box.
            # A box that collapses after clipping or rounding is just as unusable.
            if x0 < x1 and y0 < y1:
                polygon = ((x0, y0), (x1, y0), (x1, y1), (x0, y1))
        _append(lines, text, polygon, probabilities[index + 1], looked[index + 1])
    return lines


def _append(
    lines: list[Line],
    text: str,
    polygon: tuple[Point, Point, Point, Point] | None,
    probs: Sequence[float],
    heat: Heat | None = None,
) -> None:
    """Add a line unless it has no text; whitespace runs, newlines included, become one space."""
    # Box tokens left over in a line's text (a partial box) are never part of the text.
    words = _CONTROL.sub("", BOX_TOKEN.sub(" ", text)).split()
    if words:
        confidence = (
            (round(sum(probs) / len(probs), CONFIDENCE_DIGITS), round(min(probs), CONFIDENCE_DIGITS))
            if probs
            else (None, None)
        )
        mean, lowest = confidence
        line = Line(" ".join(words), polygon, mean, lowest, heat=heat)
        if heat is not None and line.bbox is not None:
            line = replace(line, attention_agreement=inside(heat, line.bbox))
        lines.append(line)


def tidy_markdown(raw: str) -> str:
    """Tidy markdown as the original inference code does: `<br>` to newline, strip, collapse blanks."""
    # microsoft/unilm kosmos-2.5/inference.py, get_markdown_res.md_post_process
    text = _CONTROL.sub("", raw.replace("<br>", "\n"))
    text = "\n".join(line.strip() for line in text.split("\n"))
    # kosmos's own page markers cannot come from the model: `&lt;` shows as `<` all the same.
    text = _MARKER.sub(lambda match: "&lt;" + match[0][1:], text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def markdown_line_tokens(pieces: Sequence[str]) -> list[list[int]]:
    """The tokens of each non-blank line of the markdown the pieces decode to, in order: the lines of
    `parsing.tidy_markdown`'s text, which splits at newlines and `<br>` and drops blank lines.

    Pieces are tokens decoded alone, so a character split over tokens may show as U+FFFD; newlines and
    `<br>` are ASCII and never split that way.
    """
    text, owner = "", []
    for index, piece in enumerate(pieces):
        text += piece
        owner += [index] * len(piece)
    lines, start = [], 0
    for match in [*_BREAK.finditer(text), None]:
        end = len(text) if match is None else match.start()
        if _CONTROL.sub("", text[start:end]).strip():
            lines.append(sorted(set(owner[start:end])))
        if match is not None:
            start = match.end()
    return lines


def end_cleanly(markdown: str) -> str:
    """End markdown that was cut off: drop a tag cut in half, then close the elements left open."""
    text = _HALF_TAG.sub("", markdown).rstrip()
    open_elements: list[str] = []
    for match in _TAG.finditer(text):
        closing, name, self_closing = match[1], match[2].lower(), match[3]
        if name not in _CLOSABLE or self_closing:
            continue
        if not closing:
            open_elements.append(name)
        elif name in open_elements:
            del open_elements[len(open_elements) - 1 - open_elements[::-1].index(name) :]
    return text + "".join(f"</{name}>" for name in reversed(open_elements))
