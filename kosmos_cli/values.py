"""Values that flow through kosmos: documents, pages, lines and page results."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import KW_ONLY, asdict, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from kosmos_cli.pages import page_number

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from kosmos_cli.errors import KosmosError
    from kosmos_cli.repetition import Loop

# Affine map (a, b, c, d, e, f): x' = a*x + c*y + e, y' = b*x + d*y + f (PyMuPDF's Matrix order).
Matrix = tuple[float, float, float, float, float, float]
Point = tuple[int, int]
BBox = tuple[int, int, int, int]


class Task(str, Enum):
    """What the model is asked for: markdown or text lines with boxes."""

    MD = "md"
    OCR = "ocr"


class Status(str, Enum):
    """How a page ended."""

    OK = "ok"
    TRUNCATED = "truncated"  # hit --max-new-tokens or a repetition loop was cut
    FAILED = "failed"


class TextSource(str, Enum):
    """Where a page's text came from."""

    MODEL = "model"
    PDF_TEXT = "pdf-text"  # the PDF's own text layer (`--text-layer`)


class LayerKind(str, Enum):
    """What text a PDF page carries of its own (`text_layer.read_text_layer` decides)."""

    DIGITAL = "digital"  # visible text over no page-covering image: the page's real text
    OCR = "ocr"  # invisible text, or text over a page-covering image: another engine's OCR layer
    NONE = "none"  # no text, too little, or text whose glyphs map to no characters


class Finish(str, Enum):
    """Why generation stopped for one page."""

    EOS = "eos"
    LENGTH = "length"
    LOOP = "loop"


@dataclass(frozen=True)
class Document:
    """One input: an image file, a PDF, a multi-page TIFF, or stdin."""

    path: str  # as opened: a filesystem path (stdin is spooled to a temporary file first)
    name: str  # output stem relative to the output folder, e.g. "a/b" for in/a/b.pdf
    label: str | None = None  # what messages call it when `path` is not that, e.g. "<stdin>"

    @property
    def display_name(self) -> str:
        """The name messages and outputs show for this input: its label, else its path, made safe."""
        return safe_text(self.label or self.path)

    def to_dict(self) -> dict[str, Any]:
        """Return the document as JSON-ready values (`from_dict` reads them back)."""
        return {"path": self.path, "name": self.name, "label": self.label}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Document:
        """Read back what `to_dict` returned."""
        return cls(data["path"], data["name"], data["label"])


@dataclass(frozen=True)
class InputIdentity:
    """What an input was when it was read: where, how big, when last changed, and its bytes' hash."""

    path: str  # absolute path, public URI, or `<stdin>`
    size: int
    mtime_ns: int | None  # None for stdin and object stores without one
    sha256: str | None  # None for object-store inputs, which the driver does not fetch

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON object of this identity."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputIdentity:
        """Read an identity back from `to_dict`'s object."""
        return cls(str(data["path"]), int(data["size"]), data.get("mtime_ns"), data.get("sha256"))

    def same_file(self, other: InputIdentity) -> bool:
        """Whether two identities name the same input, changed or not."""
        return self.path == other.path


@dataclass(frozen=True)
class PageInfo:
    """Where a page comes from and its size; everything but the pixels."""

    document: Document
    page_index: int  # 0-based, internal
    page_count: int
    width: int  # original image (or rendered page) size in pixels
    height: int
    dpi: float | None = None  # render resolution for PDF pages, None for images
    pixel_to_pdf: Matrix | None = None  # maps image pixels to PDF points, PDF pages only

    @property
    def page_number(self) -> int:
        """The 1-based page number users see."""
        return page_number(self.page_index)

    def to_dict(self) -> dict[str, Any]:
        """Return everything but the document as JSON-ready values (`from_dict` reads them back)."""
        return {
            "page_index": self.page_index,
            "page_count": self.page_count,
            "width": self.width,
            "height": self.height,
            "dpi": self.dpi,
            "pixel_to_pdf": list(self.pixel_to_pdf) if self.pixel_to_pdf is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], document: Document) -> PageInfo:
        """Read back what `to_dict` returned, for a page of `document`."""
        matrix = data["pixel_to_pdf"]
        return cls(
            document,
            data["page_index"],
            data["page_count"],
            data["width"],
            data["height"],
            data["dpi"],
            tuple(matrix) if matrix is not None else None,
        )


@dataclass(frozen=True)
class Page:
    """A page ready for the model: its info and its RGB pixels.

    The image is the page at `info.width` x `info.height`, or smaller where the page was far
    larger than the model reads (`rasterize.model_image`); boxes are always in the full size.
    """

    info: PageInfo
    image: Image.Image
    text_layer: TextLayer | None = None  # the PDF page's own text, when the job reads it

    @property
    def scale(self) -> tuple[float, float]:
        """How the image's pixels compare with the page's: (1.0, 1.0) unless it was shrunk."""
        return self.image.width / self.info.width, self.image.height / self.info.height


@dataclass(frozen=True)
class Word:
    """One word of an OCR line and its box on the ink, in original-image pixels."""

    text: str
    bbox: BBox

    def to_dict(self) -> dict[str, Any]:
        """Return the word as JSON-ready values (`from_dict` reads them back)."""
        return {"text": self.text, "bbox": list(self.bbox)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Word:
        """Read back what `to_dict` returned."""
        x0, y0, x1, y1 = (int(value) for value in data["bbox"])
        return cls(data["text"], (x0, y0, x1, y1))


@dataclass(frozen=True)
class Line:
    """One OCR text line in original-image pixels; no box when the model's box was unusable."""

    text: str
    polygon: tuple[Point, Point, Point, Point] | None  # clockwise from top-left
    # The model's probabilities of the line's text tokens as it chose them: their mean and their
    # minimum (0-1); None where they are not known (a line the tokens could not be matched to).
    confidence: float | None = None
    min_confidence: float | None = None
    words: tuple[Word, ...] = ()  # the line's words on the ink (`words.split_words`); () without a box
    # --attention: the share of the line's attention on the page that falls inside its own box
    # (`attention.inside`); None without a box or without --attention
    attention_agreement: float | None = None
    heat: Heat | None = field(default=None, compare=False, repr=False)  # --attention: where it looked

    def to_dict(self) -> dict[str, Any]:
        """Return the line as JSON-ready values (`from_dict` reads them back)."""
        return {
            "text": self.text,
            "polygon": [list(point) for point in self.polygon] if self.polygon else None,
            "confidence": self.confidence,
            "min_confidence": self.min_confidence,
            "words": [word.to_dict() for word in self.words],
            "attention_agreement": self.attention_agreement,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Line:
        """Read back what `to_dict` returned."""
        polygon = data["polygon"]
        points = tuple((int(x), int(y)) for x, y in polygon) if polygon is not None else None
        if points is not None and len(points) != 4:
            raise ValueError(f"a line's polygon has 4 points, not {len(points)}")
        words = tuple(Word.from_dict(word) for word in data["words"])
        return cls(
            data["text"], points, data["confidence"], data["min_confidence"], words,
            data.get("attention_agreement"),
        )  # fmt: skip

    @property
    def bbox(self) -> BBox | None:
        """The axis-aligned box `(x0, y0, x1, y1)` around the polygon."""
        if self.polygon is None:
            return None
        xs = [x for x, _ in self.polygon]
        ys = [y for _, y in self.polygon]
        return (min(xs), min(ys), max(xs), max(ys))


@dataclass(frozen=True)
class TextLayer:
    """A PDF page's own text: what kind it is and its lines, in the rendered page's pixels."""

    kind: LayerKind
    lines: tuple[Line, ...] = ()


@dataclass(frozen=True, eq=False)
class Heat:
    """Where some of a page's tokens looked (`--attention`): their attention mass on each patch of the
    grid the model read `box` in, averaged over the tokens.

    Its sum is the share of their attention that reached the page (`spatial`); the rest went to the
    prompt's other tokens, the model's learned image queries and the padding patches.
    """

    grid: np.ndarray  # float32 [rows, cols], row-major as the processor cut the image
    box: BBox  # the page pixels the grid covers: the page, or the tile the tokens were read in

    @property
    def spatial(self) -> float:
        """The share of the attention on the page."""
        return float(self.grid.sum())

    def on_page(self, width: int, height: int) -> np.ndarray:
        """The map in the page's pixels, float32 [height, width]: each patch's mass spread evenly over the
        pixels whose centres fall in it, so the map sums to `spatial` (zeros outside `box`)."""
        import numpy as np

        rows, cols = self.grid.shape
        x0, y0, x1, y1 = self.box
        page = np.zeros((height, width), dtype=np.float32)
        xs = ((np.arange(x0, x1) - x0 + 0.5) * cols / (x1 - x0)).astype(np.int64)
        ys = ((np.arange(y0, y1) - y0 + 0.5) * rows / (y1 - y0)).astype(np.int64)
        per_pixel = self.grid / np.outer(np.bincount(ys, minlength=rows), np.bincount(xs, minlength=cols))
        page[y0:y1, x0:x1] = per_pixel[ys[:, None], xs[None, :]]
        return page


@dataclass(frozen=True)
class Region:
    """Where on the page a markdown block's attention went: the box holding most of its mass."""

    box: BBox  # page pixels
    share: float  # the share of the block's attention on the page that falls inside `box`
    spatial: float  # the share of the block's attention that reached the page at all (`Heat.spatial`)

    def to_dict(self) -> dict[str, Any]:
        """Return the region as JSON-ready values (`from_dict` reads them back)."""
        return {"bbox": list(self.box), "share": self.share, "spatial": self.spatial}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Region:
        """Read back what `to_dict` returned."""
        x0, y0, x1, y1 = (int(value) for value in data["bbox"])
        return cls((x0, y0, x1, y1), data["share"], data["spatial"])


@dataclass(frozen=True, eq=False)
class TokenAttention:
    """Where each generated token of one image looked (`--attention`, `model.attention`)."""

    looks: np.ndarray  # float32 [tokens, image tokens]: each token's attention over the image slots
    projection: np.ndarray  # float32 [image tokens, rows * cols]: each slot's over the real patches
    grid: tuple[int, int]  # (rows, cols) of the patch grid
    pieces: tuple[str, ...] = ()  # each token's own text, as decoded alone

    def heat(self, tokens: Iterable[int], box: BBox) -> Heat:
        """The mean map of `tokens` (indices into the generated ids) over the image read as `box`."""
        import numpy as np

        chosen = list(tokens)
        if not chosen:
            return Heat(np.zeros(self.grid, dtype=np.float32), box)
        mean = self.looks[chosen].mean(axis=0) @ self.projection
        return Heat(mean.reshape(self.grid).astype(np.float32), box)


@dataclass(frozen=True, eq=False)
class PageAttention:
    """A page's maps (`--attention`), for the Python API and the pictures; never written to JSON."""

    items: tuple[Heat | None, ...]  # one per markdown block (`blocks.markdown_blocks`) or OCR line
    tiles: tuple[Heat, ...]  # every token of each tile the page was read in (one: the whole page)


@dataclass(frozen=True)
class Generation:
    """What the model produced for one image."""

    text: str  # decoded output with the prompt removed; <bbox>/<x_N> tokens kept
    resized_size: tuple[int, int]  # (width, height) of the image the model saw
    ids: tuple[int, ...]  # the generated token ids behind `text`, EOS excluded
    probs: tuple[float, ...] = ()  # the model's probability of each of `ids` when it chose it
    # The probabilities of the text tokens of each `<bbox>` line: [0] before the first `<bbox>`, [k]
    # after the k-th (box and coordinate tokens left out); () when not known.
    segments: tuple[tuple[float, ...], ...] = ()
    finish: Finish = Finish.EOS
    loop: Loop | None = None  # what was cut when finish is LOOP
    attention: TokenAttention | None = None  # where each of `ids` looked (`--attention`)

    @property
    def token_count(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PageResult:
    """The transcription of one page."""

    info: PageInfo
    task: Task
    text: str  # the page's text: tidy markdown (md), or its lines' text, one per line (ocr)
    _: KW_ONLY
    lines: tuple[Line, ...] = ()  # ocr: the lines with their boxes, in reading order
    raw: str = ""  # the model's output as decoded, <bbox> tokens kept; tiles joined by newlines
    status: Status = Status.OK
    error: str | None = None  # why the page failed
    hint: str | None = None  # what may help, when the page failed
    token_count: int = 0
    truncation: str | None = None  # why the page is truncated: the budget, or the loop that was cut
    text_source: TextSource = TextSource.MODEL
    # md with --attention: each markdown block's region (`blocks.markdown_blocks(text)`), None where
    # its tokens were not found; () without --attention
    regions: tuple[Region | None, ...] = ()
    attention: PageAttention | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as JSON-ready values, its document left out (`from_dict` reads it back)."""
        return {
            **self.info.to_dict(),
            "task": self.task.value,
            "text": self.text,
            "lines": [line.to_dict() for line in self.lines],
            "raw": self.raw,
            "status": self.status.value,
            "error": self.error,
            "hint": self.hint,
            "token_count": self.token_count,
            "truncation": self.truncation,
            "text_source": self.text_source.value,
            "regions": [None if region is None else region.to_dict() for region in self.regions],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], document: Document) -> PageResult:
        """Read back what `to_dict` returned, for a page of `document`; raises KeyError, ValueError."""
        return cls(
            PageInfo.from_dict(data, document),
            Task(data["task"]),
            data["text"],
            lines=tuple(Line.from_dict(line) for line in data["lines"]),
            raw=data["raw"],
            status=Status(data["status"]),
            error=data["error"],
            hint=data["hint"],
            token_count=data["token_count"],
            truncation=data["truncation"],
            text_source=TextSource(data["text_source"]),
            regions=tuple(None if region is None else Region.from_dict(region) for region in data["regions"]),
        )


def enclosing(boxes: Iterable[BBox]) -> BBox:
    """Return the smallest box around every box given (at least one)."""
    x0s, y0s, x1s, y1s = zip(*boxes, strict=True)
    return (min(x0s), min(y0s), max(x1s), max(y1s))


def failed_result(info: PageInfo, task: Task, error: KosmosError) -> PageResult:
    """Return the result that marks a page as failed in place, with the error's message and hint."""
    return PageResult(info, task, "", status=Status.FAILED, error=error.message, hint=error.hint)


def safe_text(text: str) -> str:
    """Return a path or name as it can be shown and written anywhere as UTF-8 on one line.

    Bytes that are not UTF-8 (kept by Python as surrogates) show as `\\xff`, control characters
    (a newline in a file name, ESC) as `\\n`, `\\x1b`.
    """
    if text.isprintable():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        raw = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode() for char in raw)


def is_utf8(text: str) -> bool:
    """Whether a string is UTF-8 text: a file name with bytes that are not decodes to lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
