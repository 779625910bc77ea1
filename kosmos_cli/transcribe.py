"""Turn pages into page results: split tall pages into tiles, run the model, parse its output."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from kosmos_cli.attention import ocr_segments, region
from kosmos_cli.blocks import markdown_blocks
from kosmos_cli.errors import GenerationError
from kosmos_cli.model import Arrivals, Request, Runner
from kosmos_cli.parsing import end_cleanly, markdown_line_tokens, parse_ocr, tidy_markdown
from kosmos_cli.tiling import merge_tile_lines, plan_tiles
from kosmos_cli.values import (
    BBox,
    Finish,
    Generation,
    Heat,
    Line,
    Page,
    PageAttention,
    PageResult,
    Region,
    Status,
    Task,
    TokenAttention,
    failed_result,
)
from kosmos_cli.words import split_words

logger = logging.getLogger(__name__)

PREFETCH_PAGES = 8  # pages rendered ahead of the model
T = TypeVar("T")


@dataclass(frozen=True)
class _Tile:
    """Which page a request belongs to and where its tile sits on that page."""

    page_key: int  # the page's place in the input order
    box: BBox
    tile_count: int


@dataclass
class _PendingPage(Generic[T]):
    page: Page
    item: T
    tiles: dict[BBox, Generation] = field(default_factory=dict)


def transcribe_pages(
    items: Iterable[tuple[Page, T]],
    runner: Runner,
    *,
    task: Task,
    tile: bool = True,
) -> Iterator[tuple[Page, T, PageResult]]:
    """Transcribe pages as the runner finishes them; `T` is any tag the caller wants back.

    `items` may be `model.Arrivals` (pages other processes send): the runner then keeps decoding the
    pages it has while it waits for more.
    """
    requests = _Requests(items, task=task, tile=tile)
    pending = requests.pending
    for request, outcome in runner.generate(requests):
        tile_key = request.key
        assert isinstance(tile_key, _Tile)
        entry = pending.get(tile_key.page_key)
        if entry is None:
            continue  # another tile of this page failed it already
        if isinstance(outcome, GenerationError):
            del pending[tile_key.page_key]
            yield entry.page, entry.item, failed_result(entry.page.info, task, outcome)
            continue
        entry.tiles[tile_key.box] = outcome
        if len(entry.tiles) == tile_key.tile_count:
            del pending[tile_key.page_key]
            yield (
                entry.page,
                entry.item,
                build_result(entry.page, task, entry.tiles, runner.max_new_tokens),
            )


class _Requests(Generic[T]):
    """The runner's requests for a stream of pages: each page whole, or its tiles (OCR of tall pages).

    Pages taken are kept in `pending` until their results are built. `ready` passes on whether the
    next page is already here, for pages that arrive over time (`model.Arrivals`).
    """

    def __init__(self, items: Iterable[tuple[Page, T]], *, task: Task, tile: bool) -> None:
        self._items = iter(items)
        self._arrivals = items if isinstance(items, Arrivals) else None
        self._task = task
        self._tile = tile
        self._queued: deque[Request] = deque()  # the tiles of the last page taken, not yet handed out
        self._count = 0
        self.pending: dict[int, _PendingPage[T]] = {}

    def __iter__(self) -> _Requests[T]:
        return self

    def __next__(self) -> Request:
        if not self._queued:
            page, item = next(self._items)
            number, self._count = self._count, self._count + 1
            self.pending[number] = _PendingPage(page, item)
            self._queued.extend(self._split(number, page))
        return self._queued.popleft()

    def ready(self) -> bool:
        """Whether `next` returns at once: a tile is queued, or the next page is here."""
        return bool(self._queued) or self._arrivals is None or self._arrivals.ready()

    def _split(self, number: int, page: Page) -> list[Request]:
        boxes = plan_tiles(page.info.width, page.info.height) if self._tile and self._task is Task.OCR else []
        if len(boxes) <= 1:
            whole = (0, 0, page.info.width, page.info.height)
            return [Request(_Tile(number, whole, 1), page.image, self._task)]
        return [
            Request(_Tile(number, box, len(boxes)), page.image.crop(_scaled(box, page)), self._task)
            for box in boxes
        ]


def _scaled(box: BBox, page: Page) -> BBox:
    """Map a box in the page's full-size pixels onto its image, which may have been shrunk."""
    scale_x, scale_y = page.scale
    x0, y0, x1, y1 = box
    return (round(x0 * scale_x), round(y0 * scale_y), round(x1 * scale_x), round(y1 * scale_y))


def build_result(page: Page, task: Task, tiles: dict[BBox, Generation], max_new_tokens: int) -> PageResult:
    """Parse the generation(s) of one page into its result, merging tiles back together.

    OCR lines get their words (`words.split_words`), found on the page's own pixels.
    """
    generations = [tiles[box] for box in sorted(tiles, key=lambda box: (box[1], box[0]))]
    truncation = None
    if any(g.finish is not Finish.EOS for g in generations):
        loops = [g.loop.describe() for g in generations if g.loop is not None]
        truncation = loops[0] if loops else f"hit --max-new-tokens {max_new_tokens}"
    lines: tuple[Line, ...] = ()
    regions: tuple[Region | None, ...] = ()
    attention = None
    if task is Task.MD:
        text = tidy_markdown(generations[0].text)
        if truncation is not None:
            text = end_cleanly(text)
        if (looked := generations[0].attention) is not None:
            box = next(iter(tiles))
            heats = _block_heats(text, looked, box)
            regions = tuple(None if heat is None else region(heat) for heat in heats)
            attention = PageAttention(heats, (looked.heat(range(len(looked.looks)), box),))
    else:
        lines = tuple(
            replace(line, words=split_words(page.image, line, scale=page.scale)) for line in _ocr_lines(tiles)
        )
        text = "\n".join(line.text for line in lines)
        wholes = [
            g.attention.heat(range(len(g.attention.looks)), box)
            for box, g in sorted(tiles.items(), key=lambda tile: (tile[0][1], tile[0][0]))
            if g.attention is not None
        ]
        if wholes:
            attention = PageAttention(tuple(line.heat for line in lines), tuple(wholes))
    return PageResult(
        page.info,
        task,
        text,
        lines=lines,
        raw="\n".join(g.text for g in generations),
        status=Status.OK if truncation is None else Status.TRUNCATED,
        token_count=sum(g.token_count for g in generations),
        truncation=truncation,
        regions=regions,
        attention=attention,
    )


def _block_heats(text: str, looked: TokenAttention, box: BBox) -> tuple[Heat | None, ...]:
    """Where each markdown block's tokens looked; None for a block whose lines were not found."""
    lines = markdown_line_tokens(looked.pieces)
    heats: list[Heat | None] = []
    for block in markdown_blocks(text):
        if block.lines.stop > len(lines):
            heats.append(None)
            continue
        heats.append(looked.heat(sorted({token for k in block.lines for token in lines[k]}), box))
    return tuple(heats)


def _ocr_lines(tiles: dict[BBox, Generation]) -> list[Line]:
    per_tile = []
    for box, generation in tiles.items():
        tile_size = (box[2] - box[0], box[3] - box[1])
        heats: tuple[Heat, ...] = ()
        if (looked := generation.attention) is not None:  # in the tile's pixels, as its lines are
            heats = tuple(looked.heat(tokens, (0, 0, *tile_size)) for tokens in ocr_segments(looked.pieces))
        lines = parse_ocr(
            generation.text,
            resized_size=generation.resized_size,
            original_size=tile_size,
            segments=generation.segments,
            heats=heats,
        )
        # each line's map moves with the line into the page's pixels
        placed = [line if not line.heat else replace(line, heat=Heat(line.heat.grid, box)) for line in lines]
        per_tile.append((box, placed))
    if len(per_tile) == 1:
        return per_tile[0][1]
    return merge_tile_lines(per_tile)


def prefetch(items: Iterable[T], *, depth: int = PREFETCH_PAGES) -> Iterator[T]:
    """Iterate `items` in a background thread, `depth` ahead, so rendering overlaps generation."""
    buffer: queue.Queue[tuple[bool, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((False, None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            buffer.put((False, error))

    thread = threading.Thread(target=produce, name="kosmos-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, value = buffer.get()
            if not ok:
                if isinstance(value, BaseException):
                    raise value
                return
            yield value  # type: ignore[misc]
    finally:
        stop.set()
