"""Split an OCR line into words with boxes that sit on the ink: the image's gaps, else glyph widths.

The model gives one box per line. Inside it, the columns without dark pixels are the gaps between
glyphs; the widest gaps, one fewer than the line's words, are the gaps between words. Where the
image does not show enough gaps (touching glyphs, a box that missed the ink), the line's ink is
split in proportion to its words' lengths in characters, spaces included. Each word's box is then
shrunk to its own ink. Everything is in original-image pixels, like the line's box.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kosmos_cli.values import BBox, Line, Word

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

MIN_LINE_PIXELS = 2  # lines thinner or narrower than this many pixels keep one box for all their words


def split_words(
    image: Image.Image, line: Line, *, scale: tuple[float, float] = (1.0, 1.0)
) -> tuple[Word, ...]:
    """Return a line's words with boxes on the ink of `image`; () for a line without a box.

    `scale` maps the line's pixels onto `image`'s, for an image shrunk from the page the line is in.
    """
    import numpy as np

    if line.bbox is None:
        return ()
    texts = line.text.split()
    x0, y0, x1, y1 = line.bbox
    sx, sy = scale
    box = (round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy))
    if box[2] - box[0] < MIN_LINE_PIXELS or box[3] - box[1] < MIN_LINE_PIXELS:
        return tuple(Word(text, line.bbox) for text in texts)
    ink = _ink(np.asarray(image.crop(box).convert("L"), dtype=np.uint8))
    columns: np.ndarray = np.asarray(ink.any(axis=0))
    if not columns.any():
        return tuple(Word(text, line.bbox) for text in texts)
    spans = _word_spans(columns, texts)
    words = []
    for text, (left, right) in zip(texts, spans, strict=True):
        rows = np.flatnonzero(ink[:, left:right].any(axis=1))
        top, bottom = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, ink.shape[0])
        pixels = (box[0] + left, box[1] + top, box[0] + right, box[1] + bottom)
        words.append(Word(text, _unscaled(pixels, scale, line.bbox)))
    return tuple(words)


def _ink(gray: np.ndarray) -> np.ndarray:
    """Return which pixels are ink: darker than Otsu's threshold of the line's own gray levels."""
    import numpy as np

    counts = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    total = counts.sum()
    levels = np.arange(256, dtype=np.float64)
    weight = np.cumsum(counts)
    mass = np.cumsum(counts * levels)
    background = total - weight
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mass[-1] * weight - total * mass) ** 2 / (weight * background)
    between[~np.isfinite(between)] = -1.0
    threshold = int(np.argmax(between))
    if between[threshold] <= 0:  # one gray level only: a blank line box
        return np.zeros(gray.shape, dtype=bool)
    return gray <= threshold


def _word_spans(columns: np.ndarray, texts: Sequence[str]) -> list[tuple[int, int]]:
    """Return each word's [left, right) columns: split at the widest gaps, else by character counts."""
    import numpy as np

    inked = np.flatnonzero(columns)
    first, last = int(inked[0]), int(inked[-1]) + 1
    gaps = _gaps(columns[first:last], offset=first)
    needed = len(texts) - 1
    if needed == 0:
        return [(first, last)]
    if len(gaps) >= needed:
        chosen = sorted(sorted(gaps, key=lambda gap: (gap[1] - gap[0], -gap[0]), reverse=True)[:needed])
        edges = [first, *(edge for gap in chosen for edge in gap), last]
        return [(edges[2 * i], edges[2 * i + 1]) for i in range(len(texts))]
    return _proportional(first, last, texts)


def _gaps(columns: np.ndarray, *, offset: int) -> list[tuple[int, int]]:
    """Return the [start, end) column runs without ink between inked columns."""
    import numpy as np

    edges = np.flatnonzero(np.diff(columns.astype(np.int8)))  # where ink starts or stops
    starts = edges[columns[edges]] + 1  # ink stops after these columns: a gap starts
    ends = edges[~columns[edges]] + 1  # ink starts after these: a gap ends
    return [(offset + int(start), offset + int(end)) for start, end in zip(starts, ends, strict=True)]


def _proportional(first: int, last: int, texts: Sequence[str]) -> list[tuple[int, int]]:
    """Split [first, last) in proportion to the words' characters, one space between each two."""
    total = sum(len(text) for text in texts) + len(texts) - 1
    width = last - first
    spans, position = [], 0
    for text in texts:
        left = first + round(width * position / total)
        position += len(text)
        right = first + round(width * position / total)
        spans.append((left, max(right, left + 1)))
        position += 1
    return spans


def _unscaled(box: BBox, scale: tuple[float, float], line_box: BBox) -> BBox:
    """Map a box from the image's pixels back to the page's, kept inside the line's box."""
    sx, sy = scale
    x0, y0, x1, y1 = (round(box[0] / sx), round(box[1] / sy), round(box[2] / sx), round(box[3] / sy))
    lx0, ly0, lx1, ly1 = line_box
    x0, x1 = min(max(x0, lx0), lx1 - 1), min(max(x1, lx0 + 1), lx1)
    y0, y1 = min(max(y0, ly0), ly1 - 1), min(max(y1, ly0 + 1), ly1)
    return (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))
