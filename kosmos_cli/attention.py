"""`--attention`: from where each token looked to where each line and block of a page looked.

Pure functions over the rows `model.attention` keeps: which tokens make an OCR line (a markdown
line's are `parsing.markdown_line_tokens`, beside the tidying whose lines they follow), a line's
agreement with its own box, and a block's region. The maps themselves are `Heat`s (`values.py`):
mass per patch of the grid the model read, mapped to the page's pixels exactly (the processor
resizes without cropping, and tiles are cut in the page's pixels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kosmos_cli.values import BBox, Heat, Region
from kosmos_cli.vocabulary import BOX_TOKEN

if TYPE_CHECKING:
    import numpy as np

SHARE_DIGITS = 4  # decimals a share is kept to, in every output alike
REGION_MASS = 0.5  # a block's region holds at least this share of its attention on the page


def ocr_segments(pieces: Sequence[str]) -> list[list[int]]:
    """The text tokens of each `<bbox>` line, as `Generation.segments` groups their probabilities:
    [0] before the first `<bbox>`, [k] after the k-th; box tokens left out."""
    segments: list[list[int]] = [[]]
    for index, piece in enumerate(pieces):
        if piece == "<bbox>":
            segments.append([])
        elif not BOX_TOKEN.fullmatch(piece):
            segments[-1].append(index)
    return segments


def inside(heat: Heat, box: BBox) -> float | None:
    """The share of `heat`'s mass on the page inside `box` (same pixels as `heat.box`), each patch
    counted by the part of its area inside; None when none of the attention reached the page."""
    import numpy as np

    spatial = heat.spatial
    if spatial <= 0:
        return None
    rows, cols = heat.grid.shape
    x_share = _overlap(heat.box[0], heat.box[2], cols, box[0], box[2])
    y_share = _overlap(heat.box[1], heat.box[3], rows, box[1], box[3])
    share = float(np.outer(y_share, x_share).ravel() @ heat.grid.ravel()) / spatial
    return round(min(share, 1.0), SHARE_DIGITS)


def _overlap(start: int, end: int, count: int, low: int, high: int) -> np.ndarray:
    """For each of `count` equal cells from `start` to `end`, the share of it inside [low, high]."""
    import numpy as np

    edges = start + (end - start) * np.arange(count + 1) / count
    covered = np.clip(np.minimum(edges[1:], high) - np.maximum(edges[:-1], low), 0, None)
    return covered / (edges[1:] - edges[:-1])


def region(heat: Heat) -> Region | None:
    """The box around the fewest patches that hold `REGION_MASS` of the heat on the page, with the share
    that falls inside it; None when none of the attention reached the page."""
    import numpy as np

    spatial = heat.spatial
    if spatial <= 0:
        return None
    rows, cols = heat.grid.shape
    order = np.argsort(heat.grid.ravel(), kind="stable")[::-1]
    cumulative = np.cumsum(heat.grid.ravel()[order])
    kept = order[: int(np.searchsorted(cumulative, REGION_MASS * spatial)) + 1]
    patch_rows, patch_cols = np.divmod(kept, cols)
    x0, y0, x1, y1 = heat.box
    box = (
        x0 + (x1 - x0) * int(patch_cols.min()) // cols,
        y0 + (y1 - y0) * int(patch_rows.min()) // rows,
        x0 + -(-(x1 - x0) * (int(patch_cols.max()) + 1) // cols),
        y0 + -(-(y1 - y0) * (int(patch_rows.max()) + 1) // rows),
    )
    grid = heat.grid[patch_rows.min() : patch_rows.max() + 1, patch_cols.min() : patch_cols.max() + 1]
    share = min(float(grid.sum()) / spatial, 1.0)
    return Region(box, round(share, SHARE_DIGITS), round(spatial, SHARE_DIGITS))
