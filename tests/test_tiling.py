"""Tiling of very tall and very wide images, and merging the tiles' lines back."""

from __future__ import annotations

import itertools
import math

import pytest

from kosmos_cli.parsing import parse_ocr
from kosmos_cli.tiling import (
    EXACT_BF16_IDS,
    MAX_TILES,
    TILE_OVERLAP,
    merge_tile_lines,
    patch_grid,
    plan_tiles,
)
from kosmos_cli.values import BBox, Line, Point


def box(x0: int, y0: int, x1: int, y1: int) -> tuple[Point, Point, Point, Point]:
    return ((x0, y0), (x1, y0), (x1, y1), (x0, y1))


def line(text: str, bbox: BBox | None) -> Line:
    return Line(text, box(*bbox) if bbox else None)


@pytest.mark.parametrize(
    ("size", "grid"),
    [
        # Sizes the processor was run on (notes: PIL backend, resized W,H = cols*16, rows*16).
        ((1700, 2200), (72, 56)),
        ((864, 1150), (73, 55)),
        ((600, 6000), (202, 20)),
        ((4000, 300), (17, 233)),
        ((1, 1), (64, 64)),
    ],
)
def test_patch_grid(size: tuple[int, int], grid: tuple[int, int]) -> None:
    assert patch_grid(*size) == grid


@pytest.mark.parametrize(
    ("size", "tiles"),
    [
        pytest.param((1700, 2200), [(0, 0, 1700, 2200)], id="letter-page"),
        pytest.param((100, 500), [(0, 0, 100, 500)], id="small-tall-not-shrunk"),
        pytest.param((1000, 3900), [(0, 0, 1000, 3900)], id="tall-under-4-to-1"),
        pytest.param((4000, 300), [(0, 0, 4000, 300)], id="wide-ids-still-exact"),
        pytest.param(
            (1000, 8000),
            [(0, y, 1000, y + 1500) for y in (0, 1300, 2600, 3900, 5200, 6500)],
            id="long-receipt",
        ),
        pytest.param(
            (600, 6000),
            [(0, y, 600, y + 900) for y in (0, 729, 1457, 2186, 2914, 3643, 4371, 5100)],
            id="long-narrow-receipt",
        ),
        pytest.param(
            (20, 1000),
            [(0, y, 20, y + 160) for y in (0, 140, 280, 420, 560, 700, 840)],
            id="small-strip-ids-inexact",
        ),
        pytest.param(
            (10000, 400),
            [(x, 0, x + 3200, 400) for x in (0, 2267, 4533, 6800)],
            id="wide-banner-ids-inexact",
        ),
    ],
)
def test_plan_tiles(size: tuple[int, int], tiles: list[BBox]) -> None:
    assert plan_tiles(*size) == tiles


SIZES = [(w, h) for w in (7, 300, 1000, 2500) for h in (40, 900, 5000, 30000)] + [(9000, 30)]


@pytest.mark.parametrize("size", [size for size in SIZES if size != (7, 30000)])  # that one is capped
def test_tiles_cover_overlap_and_keep_ids_exact(size: tuple[int, int]) -> None:
    width, height = size
    tiles = plan_tiles(width, height)
    sizes = {(x1 - x0, y1 - y0) for x0, y0, x1, y1 in tiles}
    assert len(sizes) == 1  # strips of one size along the long side
    (tile_width, tile_height) = sizes.pop()
    assert patch_grid(tile_width, tile_height)[0] <= EXACT_BF16_IDS
    assert patch_grid(tile_width, tile_height)[1] <= EXACT_BF16_IDS
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert (min(t[0] for t in tiles), min(t[1] for t in tiles)) == (0, 0)
    assert (max(t[2] for t in tiles), max(t[3] for t in tiles)) == (width, height)
    for before, after in itertools.pairwise(tiles):
        shared_x = min(before[2], after[2]) - max(before[0], after[0])
        shared_y = min(before[3], after[3]) - max(before[1], after[1])
        shared = shared_y if after[1] > before[1] else shared_x  # along the axis the strips advance
        assert shared >= math.ceil(TILE_OVERLAP * max(tile_width, tile_height))


def test_plan_tiles_caps_the_tile_count() -> None:
    tiles = plan_tiles(7, 30000)  # would take 600 tiles of 7x56 pixels
    assert len(tiles) == MAX_TILES
    assert tiles[0] == (0, 0, 7, 522)
    assert tiles[-1][3] == 30000
    assert all(after[1] < before[3] for before, after in itertools.pairwise(tiles))


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-5, 10)])
def test_plan_tiles_rejects_empty_images(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        plan_tiles(*size)


def test_merge_nothing() -> None:
    assert merge_tile_lines([]) == []


def test_merge_shifts_lines_into_image_pixels() -> None:
    merged = merge_tile_lines([((0, 100, 50, 200), [line("a", (1, 2, 3, 4)), line("no box", None)])])
    assert merged == [line("a", (1, 102, 3, 104)), line("no box", None)]


# Two tiles of a 100x285 image: A = rows 0-150, B = rows 135-285, overlapping in rows 135-150.
TILE_A: BBox = (0, 0, 100, 150)
TILE_B: BBox = (0, 135, 100, 285)


def local(bbox: BBox, tile: BBox) -> BBox:
    """Express an image box in a tile's pixels."""
    return (bbox[0] - tile[0], bbox[1] - tile[1], bbox[2] - tile[0], bbox[3] - tile[1])


@pytest.mark.parametrize(
    ("lines_a", "lines_b", "expected"),
    [
        pytest.param(
            [("top", (5, 10, 60, 20)), ("dup", (10, 138, 50, 148))],
            [("dup", (10, 138, 50, 148)), ("bottom", (5, 200, 60, 210))],
            # 2 px from A's cut edge (150), 3 px from B's (135): B's copy is kept, in B's place.
            [("top", (5, 10, 60, 20)), ("dup", (10, 138, 50, 148)), ("bottom", (5, 200, 60, 210))],
            id="same-line-twice",
        ),
        pytest.param(
            [("top", (5, 10, 60, 20)), ("Total 50,0", (10, 140, 90, 150))],
            [("Total 50,000", (10, 140, 95, 152)), ("bottom", (5, 200, 60, 210))],
            [("top", (5, 10, 60, 20)), ("Total 50,000", (10, 140, 95, 152)), ("bottom", (5, 200, 60, 210))],
            id="cut-line-gives-way-to-whole-one",
        ),
        pytest.param(
            [("Sub Total", (10, 136, 60, 146))],
            [("sub total", (10, 136, 60, 146))],
            [("Sub Total", (10, 136, 60, 146))],
            id="case-insensitive-tie-keeps-first",
        ),
        pytest.param(
            [("0", (10, 138, 20, 148)), ("0", (80, 138, 90, 148))],
            [("0", (80, 138, 90, 148)), ("0", (10, 138, 20, 148))],
            [("0", (80, 138, 90, 148)), ("0", (10, 138, 20, 148))],  # B's copies, each matched by place
            id="same-text-matched-by-place",
        ),
        pytest.param(
            [("1", (10, 20, 20, 30))],
            [("1", (10, 200, 20, 210))],
            [("1", (10, 20, 20, 30)), ("1", (10, 200, 20, 210))],
            id="same-text-outside-overlap",
        ),
        pytest.param(
            [("only in A", (10, 138, 50, 148))],
            [("bottom", (5, 200, 60, 210))],
            [("only in A", (10, 138, 50, 148)), ("bottom", (5, 200, 60, 210))],
            id="read-by-one-tile-only",
        ),
        pytest.param(
            [("Tota1", (10, 138, 50, 148))],
            [("Total", (10, 138, 50, 148))],
            [("Tota1", (10, 138, 50, 148)), ("Total", (10, 138, 50, 148))],
            id="different-readings-both-kept",
        ),
        pytest.param(
            [("box-less", None), ("x", (10, 138, 50, 148))],
            [("box-less", None), ("x", (10, 138, 50, 148))],
            [("box-less", None), ("box-less", None), ("x", (10, 138, 50, 148))],
            id="box-less-lines-kept",
        ),
    ],
)
def test_merge_overlap(
    lines_a: list[tuple[str, BBox | None]],
    lines_b: list[tuple[str, BBox | None]],
    expected: list[tuple[str, BBox | None]],
) -> None:
    tile_a = [line(text, local(bbox, TILE_A) if bbox else None) for text, bbox in lines_a]
    tile_b = [line(text, local(bbox, TILE_B) if bbox else None) for text, bbox in lines_b]
    merged = merge_tile_lines([(TILE_A, tile_a), (TILE_B, tile_b)])
    assert merged == [line(text, bbox) for text, bbox in expected]


def test_merge_orders_tiles_by_position() -> None:
    tile_a = [line("first", (5, 10, 60, 20))]
    tile_b = [line("second", (5, 60, 60, 70))]
    # Tiles come back in the order the model finished them.
    assert merge_tile_lines([(TILE_B, tile_b), (TILE_A, tile_a)]) == [
        line("first", (5, 10, 60, 20)),
        line("second", (5, 195, 60, 205)),
    ]


def fake_model_output(lines: list[tuple[str, BBox]], tile: BBox) -> tuple[str, tuple[int, int]]:
    """Write what the model would say about a tile: the lines it shows, in the processor's resized pixels.

    A line cut by the tile's edge is read with its box clipped to the tile, as a model would see it.
    """
    width, height = tile[2] - tile[0], tile[3] - tile[1]
    rows, cols = patch_grid(width, height)
    resized = (cols * 16, rows * 16)
    out = []
    for text, (x0, y0, x1, y1) in lines:
        top, bottom = max(y0, tile[1]) - tile[1], min(y1, tile[3]) - tile[1]
        left, right = max(x0, tile[0]) - tile[0], min(x1, tile[2]) - tile[0]
        if bottom - top < (y1 - y0) / 2 or right <= left:
            continue  # less than half the line is in the tile: not read
        coordinates = [
            round(left * resized[0] / width),
            round(top * resized[1] / height),
            round(right * resized[0] / width),
            round(bottom * resized[1] / height),
        ]
        out.append("<bbox><x_{}><y_{}><x_{}><y_{}></bbox>{}\n".format(*coordinates, text))
    return "".join(out), resized


def test_tall_receipt_round_trip() -> None:
    width, height = 600, 6000
    truth = [(f"item {n} ....... {n * 7},00", (30, 40 + n * 55, 570, 40 + n * 55 + 30)) for n in range(107)]
    tiles = plan_tiles(width, height)
    assert len(tiles) > 1
    per_tile = []
    for tile in tiles:
        raw, resized = fake_model_output(truth, tile)
        tile_size = (tile[2] - tile[0], tile[3] - tile[1])
        per_tile.append((tile, parse_ocr(raw, resized_size=resized, original_size=tile_size)))
    merged = merge_tile_lines(per_tile)
    assert [m.text for m in merged] == [text for text, _ in truth]
    for merged_line, (_, expected) in zip(merged, truth, strict=True):
        assert merged_line.bbox is not None
        # Whole copies were kept: each box is the true one, give or take the model grid's rounding.
        assert all(abs(a - b) <= 2 for a, b in zip(merged_line.bbox, expected, strict=True))
