"""Documents to pages: open by content, count and render pages as RGB images, shrunk for the model.

Rules that live here and nowhere else:

- Formats are told by content (magic bytes), not by name, so a misnamed file still works or fails
  clearly. ZIP containers (XPS, EPUB, CBZ) are the exception: their name says which one they are.
- A page that cannot be read in a multi-page document is a `PageError` yielded in its place by
  `iter_pages`, and the other pages go on; a document that cannot be read at all, or a single-page
  document whose page cannot be read, raises `InputError`.
- PyMuPDF is not thread-safe, so every call into it here holds `PYMUPDF_LOCK`; other code that uses
  PyMuPDF while pages may be read in another thread must hold it too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import TYPE_CHECKING, Protocol, TypeVar

from PIL import Image, ImageOps

from kosmos_cli.errors import InputError
from kosmos_cli.pages import page_number
from kosmos_cli.sandbox import ReaderStopped, ReaderTimedOut, Sandbox
from kosmos_cli.tiling import MODEL_PIXELS, plan_tiles
from kosmos_cli.values import Document, Matrix, Page, PageInfo, TextLayer, is_utf8

if TYPE_CHECKING:
    import pymupdf

logger = logging.getLogger(__name__)

MAX_PAGE_PIXELS = 2 * 89_478_485  # largest page read, in pixels: PIL's decompression-bomb error limit
MAX_SOURCE_BYTES = 2 << 30  # largest document the searchable PDF copies, read whole into memory (2 GiB)
WORK_PIXELS_PER_TILE = 4 * MODEL_PIXELS  # larger pages are shrunk before the model's processor sees them
# Pages of one document in a row that may hit --page-timeout before its other pages are failed unread:
# a document whose every page spins would otherwise hold an unattended run for pages x timeout.
TIMEOUTS_BEFORE_GIVING_UP = 3
SUPPORTED_FORMATS = "PDF, PNG, JPEG, WebP, TIFF, BMP, GIF, XPS, EPUB, CBZ"


PYMUPDF_LOCK = threading.RLock()  # PyMuPDF must not run in two threads at once
_PIL_INIT_LOCK = threading.Lock()  # PIL registers its plugins lazily, and not thread-safely

T = TypeVar("T")
HEADER_BYTES = 1024  # a PDF header may follow up to 1 KiB of junk
_TAIL_BYTES = 1024  # where a complete PDF's %%EOF marker sits
_SCAN_BYTES = 64 << 20  # how much of a damaged PDF's end is read to find its last object
_OBJECT_START = re.compile(rb"\d+\s+\d+\s+obj\b")
_STREAM_START = re.compile(rb"(?<!end)stream\r?\n")
_WHITE = (255, 255, 255)

# File name suffix -> format; also decides which files in a folder are worth opening.
SUFFIX_FORMATS = {
    ".pdf": "PDF",
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
    ".webp": "WebP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".dib": "BMP",
    ".gif": "GIF",
    ".xps": "XPS",
    ".oxps": "XPS",
    ".epub": "EPUB",
    ".cbz": "CBZ",
}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)
_BMP_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})  # known DIB header sizes: "BM" alone is text
_ZIP_FORMATS = frozenset({"XPS", "EPUB", "CBZ"})
_PIL_FORMATS = {  # sniffed format -> the PIL plugins allowed to open it
    "PNG": ("PNG",),
    "JPEG": ("JPEG", "MPO"),  # cameras write MPO: a JPEG with extra pictures after the first
    "WebP": ("WEBP",),
    "TIFF": ("TIFF",),
    "BMP": ("BMP",),
    "GIF": ("GIF",),
}
# What PIL raises on damaged data besides OSError (it uses SyntaxError for bad PNG chunks, for one).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_BOMB_HINT = (
    f"pages above {MAX_PAGE_PIXELS:,} pixels are refused: an image that large may be a decompression bomb"
)


class PageError(InputError):
    """One page of a multi-page document cannot be read; the document's other pages can."""

    def __init__(
        self,
        message: str,
        *,
        document: Document,
        page_index: int,
        page_count: int,
        hint: str | None = None,
        also: tuple[int, ...] = (),
    ) -> None:
        super().__init__(message, hint=hint)
        self.document = document
        self.page_index = page_index
        self.page_count = page_count
        self.also = also  # other pages that fail with it, unread (a document given up on): one line for all

    @property
    def page_indices(self) -> tuple[int, ...]:
        """Every page this error fails."""
        return (self.page_index, *self.also)


# --- reading pages ----------------------------------------------------------------------------------


def count_pages(document: Document, *, password: str | None = None, sandbox: Sandbox | None = None) -> int:
    """Return how many pages a document has, without rendering any (in `sandbox` if given)."""
    try:
        return _probe(document, password, sandbox)
    finally:
        _release(sandbox)


def iter_pages(
    document: Document,
    *,
    page_indices: Sequence[int] | None = None,
    dpi: float | None = None,
    password: str | None = None,
    sandbox: Sandbox | None = None,
    text_layer: bool = False,
) -> Iterator[Page | PageError]:
    """Stream a document's pages as RGB images, one at a time, with a `PageError` for a page that fails.

    PDF and other PyMuPDF pages render at `dpi`, by default at the DPI (rounded up to 0.01) that gives
    the model its full 4096 patches of 16x16 (1,048,576 pixels), so its resize never upscales.
    Images keep their own pixels; `dpi` does not apply to them. A page far larger than the model
    reads is handed over shrunk (`model_image`), its `PageInfo` keeping the full size. With a
    `sandbox`, opening and rendering run in its process under its time limit. `page_indices`
    (0-based, from `PageSelection.indices`) picks pages; default: all. Raises `InputError` when the
    document cannot be read at all, when it has fewer pages than asked for (it changed since it was
    counted), and when its only page fails. With `text_layer`, PDF pages carry their own text
    (`Page.text_layer`).
    """
    label = f"`{document.display_name}`"
    count = _probe(document, password, sandbox)
    try:
        selected = list(range(count) if page_indices is None else page_indices)
        if any(index >= count for index in selected):
            raise InputError(f"{label} has {count} pages now; it changed since it was counted")
        timeouts = 0  # pages in a row that hit the page timeout
        for position, page_index in enumerate(selected):
            rendered: _Rendered | PageError
            try:
                rendered = _run(sandbox, render_page, document, page_index, dpi, password, text_layer)
                timeouts = 0
            except ReaderStopped as error:
                timeouts = timeouts + 1 if isinstance(error, ReaderTimedOut) else 0
                where = _where(label, page_index, count)
                rendered = PageError(
                    f"{where} {error.message}", document=document, page_index=page_index,
                    page_count=count, hint=error.hint,
                )  # fmt: skip
            except PageError as error:
                rendered = error
            if isinstance(rendered, PageError):
                if count == 1:
                    raise rendered
                yield rendered
                rest = selected[position + 1 :]
                if timeouts == TIMEOUTS_BEFORE_GIVING_UP and rest and sandbox is not None:
                    pages = "page is" if len(rest) == 1 else "pages are"
                    yield PageError(
                        f"{label}: {timeouts} pages in a row took longer than {sandbox.timeout:g} s;"
                        f" its other {len(rest)} selected {pages} not read",
                        document=document, page_index=rest[0], page_count=count, also=tuple(rest[1:]),
                        hint="raise --page-timeout if the document is sound",
                    )  # fmt: skip
                    return
                continue
            width, height = rendered.size
            info = PageInfo(
                document=document,
                page_index=page_index,
                page_count=count,
                width=width,
                height=height,
                dpi=rendered.dpi,
                pixel_to_pdf=rendered.pixel_to_pdf,
            )
            yield Page(info, rendered.image, rendered.text_layer)
    finally:
        _release(sandbox)


def document_source(document: Document, sandbox: Sandbox | None = None) -> bytes:
    """Return a document's bytes, read in `sandbox` if given; a stopped reader is the document's error."""
    try:
        return _run(sandbox, read_source, document)
    except ReaderStopped as error:
        raise InputError(f"`{document.display_name}` {error.message}", hint=error.hint) from None


def read_source(document: Document) -> bytes:
    """Return a document's bytes, for the formats that copy its pages (run it in the reader process)."""
    hint = "leave out --format pdf for it"
    return read_regular_file(document.path, f"`{document.display_name}`", limit=MAX_SOURCE_BYTES, hint=hint)


def read_regular_file(path: str, label: str, *, limit: int, hint: str | None = None) -> bytes:
    """Return a regular file's bytes, at most `limit` of them; a device, a pipe or a folder is refused
    without waiting on it (a FIFO nobody writes would block a plain open; /dev/zero never ends)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        if isinstance(error, ValueError):
            raise InputError(f"{label} is not a path a file can have") from None
        raise file_error(label, error) from None
    with os.fdopen(descriptor, "rb") as stream:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise InputError(f"{label} is not a regular file")
        if status.st_size > limit:
            size = f"{status.st_size:,} bytes, more than kosmos reads ({limit:,})"
            raise InputError(f"{label} is {size}", hint=hint)
        try:
            return stream.read(limit + 1)[:limit]
        except OSError as error:
            raise file_error(label, error) from None


def page_pixels(info: PageInfo, data: bytes, *, password: str | None = None) -> Image.Image:
    """Return the RGB pixels `iter_pages` read for a page, at full size, from its document's bytes."""
    with _open(info.document, password=password, data=data) as source:
        if info.page_index >= source.page_count:
            raise InputError(f"`{info.document.display_name}` has fewer pages than were read")
        image = source.render(info.page_index, dpi=info.dpi).image
    if image.size != (info.width, info.height):
        raise InputError(f"`{info.document.display_name}` page {info.page_number} differs from the one read")
    return image


def model_image(image: Image.Image) -> Image.Image:
    """Shrink an image far larger than the model reads to WORK_PIXELS_PER_TILE per tile it is read in.

    The processor squeezes every tile into MODEL_PIXELS; handing it a 170-megapixel image costs
    gigabytes of float copies for nothing. Tiles are planned on the full size, so the shrunk image
    keeps enough pixels for each.
    """
    width, height = image.size
    budget = WORK_PIXELS_PER_TILE * len(plan_tiles(width, height))
    if width * height <= budget:
        return image
    scale = math.sqrt(budget / (width * height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


# --- what runs in the reader process (or here, without a sandbox) ----------------------------------

_reading = threading.local()  # `opened`: the document this thread has open, (key, its ExitStack, its source)


def probe_document(document: Document, password: str | None) -> int:
    """Open a document (kept open for the pages that follow) and return its page count."""
    return _source(document, password).page_count


def render_page(
    document: Document, page_index: int, dpi: float | None, password: str | None, text_layer: bool = False
) -> _Rendered:
    """Render one page of the open document, shrunk for the model; `size` keeps its full size.

    With `text_layer`, a PDF page's own text is read too (`text_layer.read_text_layer`).
    """
    rendered = _source(document, password).render(page_index, dpi=dpi, text_layer=text_layer)
    image = model_image(rendered.image)
    return replace(rendered, image=image, size=rendered.image.size)


def close_document() -> None:
    """Close the document `probe_document` opened in this thread, if any."""
    opened = getattr(_reading, "opened", None)
    if opened is not None:
        _reading.opened = None
        opened[1].close()


def _source(document: Document, password: str | None) -> _Source:
    """Return this thread's open document, opening it (and closing the one before) if it is another."""
    key = (document.path, password)
    opened = getattr(_reading, "opened", None)
    if opened is not None and opened[0] == key:
        return opened[2]
    close_document()
    stack = contextlib.ExitStack()
    source = stack.enter_context(_open(document, password=password))
    _reading.opened = (key, stack, source)
    return source


def _probe(document: Document, password: str | None, sandbox: Sandbox | None) -> int:
    """Open a document and return its page count; a stopped reader is the document's error."""
    try:
        return _run(sandbox, probe_document, document, password)
    except ReaderStopped as error:
        raise InputError(f"`{document.display_name}` {error.message}", hint=error.hint) from None


def _run(sandbox: Sandbox | None, function: Callable[..., T], *args: object) -> T:
    return function(*args) if sandbox is None else sandbox.call(function, *args)


def _release(sandbox: Sandbox | None) -> None:
    if sandbox is None:
        close_document()
    else:
        sandbox.release(close_document)


@dataclass(frozen=True)
class _Rendered:
    image: Image.Image
    dpi: float | None = None
    pixel_to_pdf: Matrix | None = None
    size: tuple[int, int] = (0, 0)  # the page's full size, when `image` was shrunk for the model
    text_layer: TextLayer | None = None  # a PDF page's own text, when asked for


class _Source(Protocol):
    page_count: int

    def render(self, page_index: int, *, dpi: float | None, text_layer: bool = False) -> _Rendered:
        """Return one page's RGB pixels, or raise PageError."""
        ...


@contextlib.contextmanager
def _open(document: Document, *, password: str | None, data: bytes | None = None) -> Iterator[_Source]:
    """Open a document by its content (its file, or `data` read from it) and yield a page source.

    Raises InputError if it cannot be read.
    """
    label = f"`{document.display_name}`"
    try:
        if data is not None:
            header = data[:HEADER_BYTES]
        else:
            with open(document.path, "rb") as stream:
                header = stream.read(HEADER_BYTES)
    except OSError as error:
        raise file_error(label, error) from None
    if not header:
        raise InputError(f"{label} is empty (0 bytes)")
    suffix = PurePath(document.path).suffix.lower()
    kind = sniff(header, suffix)
    if kind is None:
        claimed = SUFFIX_FORMATS.get(suffix)
        if claimed is not None:
            raise InputError(
                f"{label} does not contain {claimed} data (damaged, truncated or misnamed)",
                hint=f"supported formats: {SUPPORTED_FORMATS}",
            )
        raise InputError(f"{label} is not an image or PDF", hint=f"supported formats: {SUPPORTED_FORMATS}")
    if kind in _PIL_FORMATS:
        with _open_image(document, kind, label, data=data) as source:
            yield source
    else:
        with _open_pymupdf(document, kind, label, password=password, data=data) as pymupdf_source:
            yield pymupdf_source


def sniff(header: bytes, suffix: str) -> str | None:
    """Name a file's format from its first bytes; ZIP containers are told apart by `suffix`."""
    for magic, kind in _MAGIC:
        if header.startswith(magic):
            return kind
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "WebP"
    if header[:2] == b"BM" and int.from_bytes(header[14:18], "little") in _BMP_HEADER_SIZES:
        return "BMP"
    if b"%PDF-" in header:
        return "PDF"
    if header.startswith(b"PK\x03\x04"):
        claimed = SUFFIX_FORMATS.get(suffix)
        return claimed if claimed in _ZIP_FORMATS else None
    return None


def looks_supported(path: str) -> bool:
    """Whether a file met in a folder should be read: a supported suffix, or supported content."""
    suffix = PurePath(path).suffix.lower()
    if suffix in SUFFIX_FORMATS:
        return True
    try:
        with open(path, "rb") as stream:
            return sniff(stream.read(HEADER_BYTES), suffix) is not None
    except OSError:
        return False


def file_error(label: str, error: OSError) -> InputError:
    """Turn a file-system error into one clear line."""
    if isinstance(error, FileNotFoundError):
        return InputError(f"{label} does not exist (was it moved or deleted?)")
    if isinstance(error, PermissionError):
        return InputError(f"cannot read {label}: permission denied", hint="check the file's permissions")
    if isinstance(error, IsADirectoryError):
        return InputError(f"{label} is a folder, not a file")
    return InputError(f"cannot read {label}: {error.strerror or error}")


def _where(label: str, page_index: int, page_count: int) -> str:
    """Name a page in messages: the file, and the 1-based page when there is more than one."""
    return f"{label} page {page_number(page_index)}" if page_count > 1 else label


def _decode_problem(error: Exception) -> str:
    if isinstance(error, Image.UnidentifiedImageError):  # its text names a temp object, not the problem
        return "its header is damaged"
    return str(error) or type(error).__name__


# --- images -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_image(document: Document, kind: str, label: str, *, data: bytes | None) -> Iterator[_ImageSource]:
    with _PIL_INIT_LOCK:
        Image.init()  # a no-op once done; racing threads otherwise see a half-filled plugin registry
    # Pillow 13 no longer registers an opener of its own for MPO.
    formats = [name for name in _PIL_FORMATS[kind] if name in Image.OPEN]
    try:
        image = Image.open(io.BytesIO(data) if data is not None else document.path, formats=formats)
    except Image.DecompressionBombError:
        raise InputError(
            f"{label} is larger than {MAX_PAGE_PIXELS:,} pixels, too large to read safely",
            hint=_BOMB_HINT,
        ) from None
    except _PIL_ERRORS as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise file_error(label, error) from None
        raise InputError(f"{label} cannot be decoded as {kind}: {_decode_problem(error)}") from None
    with image:
        try:
            # Every TIFF frame is a page; animated GIF, WebP and PNG and MPO extras give their first frame.
            page_count = int(getattr(image, "n_frames", 1)) if kind == "TIFF" else 1
        except _PIL_ERRORS as error:
            raise InputError(f"{label} cannot be decoded as {kind}: {_decode_problem(error)}") from None
        yield _ImageSource(document, image, kind, label, page_count)


class _PagedSource:
    """What every open document knows: itself, its format, its name in messages, its page count."""

    def __init__(self, document: Document, kind: str, label: str, page_count: int) -> None:
        self._document = document
        self._kind = kind
        self._label = label
        self.page_count = page_count

    def _error(self, message: str, page_index: int, *, hint: str | None = None) -> PageError:
        return PageError(
            message, document=self._document, page_index=page_index, page_count=self.page_count, hint=hint
        )


class _ImageSource(_PagedSource):
    """Pages of an open image file: its frames, EXIF-rotated and flattened to RGB."""

    def __init__(
        self, document: Document, image: Image.Image, kind: str, label: str, page_count: int
    ) -> None:
        super().__init__(document, kind, label, page_count)
        self._image = image

    def render(self, page_index: int, *, dpi: float | None, text_layer: bool = False) -> _Rendered:
        """Return one frame's RGB pixels; `dpi` and `text_layer` do not apply to images."""
        where = _where(self._label, page_index, self.page_count)
        try:
            if self.page_count > 1:
                self._image.seek(page_index)
            width, height = self._image.size
            if width * height > MAX_PAGE_PIXELS:
                raise self._error(
                    f"{where} is {width}x{height} pixels, too large to read safely",
                    page_index,
                    hint=_BOMB_HINT,
                )
            return _Rendered(_to_rgb(ImageOps.exif_transpose(self._image)))
        except _PIL_ERRORS as error:
            if isinstance(error, OSError) and error.errno is not None:
                raise self._error(file_error(where, error).message, page_index) from None
            raise self._error(
                f"{where} cannot be decoded as {self._kind}: {_decode_problem(error)}", page_index
            ) from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any PIL mode to 8-bit RGB: deep pixels scaled, transparency composited over white."""
    if image.mode in _DEEP_MODES:
        image = _to_8bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit and float gray to 8 bits by their nominal range, so nothing clips to white.

    16-bit modes span 0-65535. Modes `I` and `F` carry no depth, so the smallest of 0-255, 0-65535
    and 0-2**32-1 that holds the brightest pixel is taken (0-1 for floats up to 1).
    """
    if image.mode.startswith("I;16"):
        image, top = image.convert("I"), 65535.0
    else:
        brightest = float(image.getextrema()[1])  # type: ignore[arg-type]
        tops = ((1.0,) if image.mode == "F" else ()) + (255.0, 65535.0, 4294967295.0)
        top = next((limit for limit in tops if brightest <= limit), brightest)
    scale = 255.0 / top
    return image.point(lambda value: value * scale).convert("L")


# --- PDF and other PyMuPDF documents ---------------------------------------------------------------


@contextlib.contextmanager
def _open_pymupdf(
    document: Document, kind: str, label: str, *, password: str | None, data: bytes | None
) -> Iterator[_PyMuPDFSource]:
    import pymupdf

    if data is None and not is_utf8(document.path):  # MuPDF takes file names as UTF-8 text only
        data = read_regular_file(document.path, label, limit=MAX_SOURCE_BYTES)
    with PYMUPDF_LOCK:
        try:
            if data is not None:
                opened = pymupdf.open(stream=data, filetype=kind.lower())
            else:
                opened = pymupdf.open(document.path, filetype=kind.lower())
        except pymupdf.FileNotFoundError:
            raise InputError(f"{label} does not exist (was it moved or deleted?)") from None
        except (RuntimeError, ValueError, pymupdf.mupdf.FzErrorBase):
            raise InputError(f"{label} cannot be opened as {kind}: it is damaged beyond repair") from None
    try:
        with PYMUPDF_LOCK:
            _check_opened(opened, document, kind, label, password=password, data=data)
            page_count = opened.page_count
            _log_mupdf_warnings(label)
        yield _PyMuPDFSource(document, opened, kind, label, page_count)
    finally:
        with PYMUPDF_LOCK:
            opened.close()


def _check_opened(
    opened: pymupdf.Document,
    document: Document,
    kind: str,
    label: str,
    *,
    password: str | None,
    data: bytes | None,
) -> None:
    if opened.needs_pass:
        if password is None:
            raise InputError(f"{label} is encrypted", hint="pass --password")
        if not opened.authenticate(password):
            raise InputError(
                f"{label} is encrypted and --password does not open it", hint="check the password"
            )
    # MuPDF rebuilds a cut-off PDF from what is left and would render its lost pages blank.
    if kind == "PDF" and opened.is_repaired and _cut_short(document.path, data):
        raise InputError(
            f"{label} is truncated: it ends before its %%EOF marker",
            hint="the file was cut short (an interrupted download or copy?); get a complete copy",
        )
    if opened.page_count == 0:
        raise InputError(f"{label} has no pages")


def _cut_short(path: str, data: bytes | None) -> bool:
    """Whether a PDF MuPDF had to repair was cut off: no %%EOF at its end and its last object unfinished.

    A file whose cross-reference table or `startxref` is merely damaged still has every object
    whole, renders perfectly once repaired, and is read. `data` is the file's bytes, if read already.
    """
    with open(path, "rb") if data is None else io.BytesIO(data) as stream:
        size = stream.seek(0, os.SEEK_END)
        stream.seek(max(0, size - _TAIL_BYTES))
        if b"%%EOF" in stream.read():
            return False
        stream.seek(max(0, size - _SCAN_BYTES))
        data = stream.read()  # the tail only: a damaged file can be gigabytes
    last_object = max((match.start() for match in _OBJECT_START.finditer(data)), default=-1)
    last_stream = max((match.start() for match in _STREAM_START.finditer(data)), default=-1)
    return data.rfind(b"endobj") < last_object or data.rfind(b"endstream") < last_stream


def _log_mupdf_warnings(label: str) -> None:
    """Move MuPDF's collected warnings to the debug log; they would pile up over thousands of files."""
    import pymupdf

    warnings = pymupdf.TOOLS.mupdf_warnings(reset=True)
    if warnings:
        logger.debug("MuPDF on %s: %s", label, warnings.replace("\n", "; "))


class _PyMuPDFSource(_PagedSource):
    """Pages of an open PyMuPDF document, rendered on white as a viewer shows them."""

    def __init__(
        self, document: Document, opened: pymupdf.Document, kind: str, label: str, page_count: int
    ) -> None:
        super().__init__(document, kind, label, page_count)
        self._opened = opened

    def render(self, page_index: int, *, dpi: float | None, text_layer: bool = False) -> _Rendered:
        """Render one page at `dpi` (default: the model's size); PDF pages also get their pixel-to-PDF map.

        With `text_layer`, a PDF page's own text comes too, in the rendered pixels.
        """
        import pymupdf

        from kosmos_cli.text_layer import read_text_layer

        where = _where(self._label, page_index, self.page_count)
        with PYMUPDF_LOCK:
            try:
                page = self._opened.load_page(page_index)
                area = page.rect
                if area.is_empty:
                    raise self._error(f"{where} is empty: its page box has no area", page_index)
                dpi = _default_dpi(area.width, area.height) if dpi is None else dpi
                zoom = pymupdf.Matrix(dpi / 72, dpi / 72)
                box = (area * zoom).irect  # the pixmap's size: MuPDF rounds the same way
                if box.width * box.height > MAX_PAGE_PIXELS:
                    raise self._error(
                        f"{where} would render at {box.width}x{box.height} pixels at {dpi:g} dpi, too large",
                        page_index,
                        hint=f"lower --dpi; pages above {MAX_PAGE_PIXELS:,} pixels are refused",
                    )
                pixmap = page.get_pixmap(matrix=zoom, alpha=False)
                to_pdf = _pixel_to_pdf(page, zoom) if self._kind == "PDF" else None
                layer = None
                if text_layer and self._kind == "PDF":
                    size = (pixmap.width, pixmap.height)
                    layer = read_text_layer(page, page.rotation_matrix * zoom, size)
            except (RuntimeError, ValueError, pymupdf.mupdf.FzErrorBase) as error:
                raise self._error(f"{where} cannot be rendered: {error}", page_index) from None
            finally:
                _log_mupdf_warnings(where)
            image = Image.frombytes(
                "RGB", (pixmap.width, pixmap.height), pixmap.samples, "raw", "RGB", pixmap.stride
            )
        return _Rendered(image, dpi, to_pdf, text_layer=layer)


def _default_dpi(width_pt: float, height_pt: float) -> float:
    """Return the DPI (rounded up to 0.01) at which a page covers MODEL_PIXELS: the model never upscales."""
    exact = 72 * math.sqrt(MODEL_PIXELS / (width_pt * height_pt))
    return math.ceil(exact * 100 - 1e-6) / 100  # the tolerance keeps float noise from adding a step


def _pixel_to_pdf(page: pymupdf.Page, zoom: pymupdf.Matrix) -> Matrix:
    """Return the map from rendered pixels to PDF user space (points, y up), rotation and crop included."""
    import pymupdf

    # MuPDF's own page transform (user space -> rotated, cropped page space) is what rendering uses.
    # `Page.transformation_matrix` is not it: for rotated pages PyMuPDF drops the crop box offset.
    ctm = pymupdf.mupdf.FzMatrix()
    pymupdf.mupdf.pdf_page_transform(
        pymupdf.mupdf.pdf_page_from_fz_page(page.this), pymupdf.mupdf.FzRect(), ctm
    )
    inverse = ~(pymupdf.Matrix(ctm.a, ctm.b, ctm.c, ctm.d, ctm.e, ctm.f) * zoom)
    return (inverse.a, inverse.b, inverse.c, inverse.d, inverse.e, inverse.f)
