"""Split very tall or very wide images into overlapping tiles, and merge the tiles' lines back.

The processor squeezes every image into at most 4096 patches of 16x16 pixels, keeping its aspect
ratio. Two things then go wrong on long receipts and scrolls:

- a tall image is shrunk until its text is too small to read (a 1000x8000 receipt is read at 36%);
- the patch grid gets more than 256 rows (or columns) once the aspect ratio passes about 16:1, and
  the row and column ids travel in the model's dtype, where bf16 holds integers exactly only up to 256.

Tall images that would be shrunk are cut into page-shaped tiles (height 1.5 x width, as the original
inference code's aspect-ratio preprocessing aims for) once they are more than 4 times as tall as wide.
Wide images are cut only when the patch grid would pass 256 columns: cuts across a wide image run
through its text lines, which costs more than the lower resolution. Neighbouring tiles overlap by 10%
so that a line cut by one tile's edge lies whole inside the next. No image is cut into more than 64
tiles; slivers that would need more get longer tiles.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import replace

from kosmos_cli.values import BBox, Line

PATCH_SIZE = 16  # pixels per patch side
MAX_PATCHES = 4096  # patches per image: the Kosmos-2.5 processor's max_patches
MODEL_PIXELS = MAX_PATCHES * PATCH_SIZE * PATCH_SIZE  # pixels the processor keeps (1,048,576)
EXACT_BF16_IDS = 256  # largest row/column id bf16 holds exactly
MAX_TALL_ASPECT = 4.0  # height / width above which a shrunk image is tiled
TALL_TILE_ASPECT = 1.5  # height / width of a tile cut from a tall image
LONG_TILE_ASPECT = 8.0  # long side / short side of a tile cut only to keep ids exact
TILE_OVERLAP = 0.1  # overlap between neighbouring tiles, as a share of the tile's length
MAX_TILES = 64  # most tiles one image is cut into
MIN_TEXT_OVERLAP = 0.5  # share of the smaller box two copies of a line must share to be one line


def patch_grid(width: int, height: int) -> tuple[int, int]:
    """Return the `(rows, cols)` of patches the processor resizes an image to."""
    scale = math.sqrt(MODEL_PIXELS / (width * height))
    rows = max(min(math.floor(scale * height / PATCH_SIZE), MAX_PATCHES), 1)
    cols = max(min(math.floor(scale * width / PATCH_SIZE), MAX_PATCHES), 1)
    return rows, cols


def plan_tiles(width: int, height: int) -> list[BBox]:
    """Return the tiles to read an image in, `(x0, y0, x1, y1)` in its pixels; one tile is the whole image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    rows, cols = patch_grid(width, height)
    shrunk = width * height > MODEL_PIXELS
    if height >= width:
        if shrunk and height > MAX_TALL_ASPECT * width:
            tile_height = round(width * TALL_TILE_ASPECT)
        elif rows > EXACT_BF16_IDS:
            tile_height = round(width * LONG_TILE_ASPECT)
        else:
            return [(0, 0, width, height)]
        return [(0, start, width, end) for start, end in _spans(height, tile_height)]
    if cols <= EXACT_BF16_IDS:
        return [(0, 0, width, height)]
    return [(start, 0, end, height) for start, end in _spans(width, round(height * LONG_TILE_ASPECT))]


def _spans(length: int, tile: int) -> list[tuple[int, int]]:
    """Cover `[0, length)` with evenly spread spans of `tile` pixels overlapping by at least TILE_OVERLAP."""
    # Past MAX_TILES, tiles grow instead: a sliver thousands of times longer than wide is not worth
    # hundreds of model calls, even if its ids are no longer exact.
    tile = max(tile, math.ceil(length / (MAX_TILES * (1 - TILE_OVERLAP))) + 1)
    if tile >= length:
        return [(0, length)]
    overlap = math.ceil(tile * TILE_OVERLAP)
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1)
    return [(round(i * step), round(i * step) + tile) for i in range(count)]


def merge_tile_lines(tiles: Sequence[tuple[BBox, Sequence[Line]]]) -> list[Line]:
    """Merge per-tile lines (in tile pixels) into image pixels, dropping the copies overlaps read twice.

    Tiles are taken in reading order (top to bottom, then left to right) whatever order they come in,
    and each tile's lines keep the model's order. Where two overlapping tiles both read a line (same
    text, or one a cut-off part of the other, over boxes sharing at least half the smaller one), the
    copy farther from its tile's inner edges is kept. Lines without a box are always kept.
    """
    if not tiles:
        return []
    ordered = sorted(tiles, key=lambda tile: (tile[0][1], tile[0][0]))
    boxes = [box for box, _ in ordered]
    image = (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )
    placed = [[_shift(line, box) for line in lines] for box, lines in ordered]
    dropped: set[tuple[int, int]] = set()
    for i, j in itertools.combinations(range(len(boxes)), 2):
        overlap = _intersection(boxes[i], boxes[j])
        if overlap is None:
            continue
        taken: set[int] = set()
        for a, line_a in enumerate(placed[i]):
            box_a = line_a.bbox
            if box_a is None or _intersection(box_a, overlap) is None:
                continue
            match = _best_match(line_a.text, box_a, placed[j], taken)
            if match is None:
                continue
            b, box_b = match
            taken.add(b)
            keep_a = _edge_margin(box_a, boxes[i], image) >= _edge_margin(box_b, boxes[j], image)
            dropped.add((j, b) if keep_a else (i, a))
    return [line for i, lines in enumerate(placed) for k, line in enumerate(lines) if (i, k) not in dropped]


def _shift(line: Line, tile: BBox) -> Line:
    if line.polygon is None:
        return line
    dx, dy = tile[0], tile[1]
    p0, p1, p2, p3 = ((x + dx, y + dy) for x, y in line.polygon)
    return replace(line, polygon=(p0, p1, p2, p3))


def _intersection(a: BBox, b: BBox) -> BBox | None:
    box = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return box if box[0] < box[2] and box[1] < box[3] else None


def _area(box: BBox) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def _best_match(text: str, box: BBox, candidates: Sequence[Line], taken: set[int]) -> tuple[int, BBox] | None:
    """Return the index and box of the candidate that is the same line read again, or None."""
    text = text.casefold()
    best, best_share = None, MIN_TEXT_OVERLAP
    for index, candidate in enumerate(candidates):
        other_box = candidate.bbox
        if index in taken or other_box is None:
            continue
        other = candidate.text.casefold()
        if text not in other and other not in text:
            continue
        shared = _intersection(box, other_box)
        if shared is None:
            continue
        share = _area(shared) / min(_area(box), _area(other_box))
        if share >= best_share:
            best, best_share = (index, other_box), share
    return best


def _edge_margin(box: BBox, tile: BBox, image: BBox) -> float:
    """Return how far a box sits from its tile's edges that cut the image (image borders do not count)."""
    margins = [
        box[0] - tile[0] if tile[0] > image[0] else None,
        box[1] - tile[1] if tile[1] > image[1] else None,
        tile[2] - box[2] if tile[2] < image[2] else None,
        tile[3] - box[3] if tile[3] < image[3] else None,
    ]
    inner = [margin for margin in margins if margin is not None]
    return min(inner) if inner else math.inf
