"""Inputs to pages: find the documents named on the command line and stream their pages as RGB images.

Rules that live here and nowhere else:

- Page numbers: users write 1-based `--pages`; `PageSelection.indices` turns them into 0-based indices.
- Formats are told by content (magic bytes), not by name, so a misnamed file still works or fails
  clearly. ZIP containers (XPS, EPUB, CBZ) are the exception: their name says which one they are.
- Output names (`Document.name`) mirror the input tree; see `discover` for how clashes are resolved.
- A page that cannot be read in a multi-page document is a `PageError` yielded in its place by
  `iter_pages`, and the other pages go on; a document that cannot be read at all, or a single-page
  document whose page cannot be read, raises `InputError`.
- PyMuPDF is not thread-safe, so every call into it here holds `PYMUPDF_LOCK`; other code that uses
  PyMuPDF while pages may be read in another thread must hold it too.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import glob
import logging
import math
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
import threading
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, Protocol

from PIL import Image, ImageOps

from kosmos_cli.document import Document, Matrix, Page, PageInfo
from kosmos_cli.errors import InputError, UsageError

if TYPE_CHECKING:
    import pymupdf

logger = logging.getLogger(__name__)

MODEL_PIXELS = 4096 * 16 * 16  # pixels the Kosmos-2.5 processor keeps: 4096 patches of 16x16 (1,048,576)
MAX_PAGE_PIXELS = 2 * 89_478_485  # largest page read, in pixels: PIL's decompression-bomb error limit
SUPPORTED_FORMATS = "PDF, PNG, JPEG, WebP, TIFF, BMP, GIF, XPS, EPUB, CBZ"
STDIN_NAME = "stdin"  # output stem of a document read from stdin
STDIN_LABEL = "<stdin>"  # what messages call it

PYMUPDF_LOCK = threading.RLock()  # PyMuPDF must not run in two threads at once
_PIL_INIT_LOCK = threading.Lock()  # PIL registers its plugins lazily, and not thread-safely

_HEADER_BYTES = 1024  # a PDF header may follow up to 1 KiB of junk
_TAIL_BYTES = 1024  # where a complete PDF's %%EOF marker sits
_WHITE = (255, 255, 255)

# File name suffix -> format; also decides which files in a folder are worth opening.
_SUFFIX_FORMATS = {
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
        self, message: str, *, document: Document, page_index: int, page_count: int, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.document = document
        self.page_index = page_index
        self.page_count = page_count


# --- page selection ---------------------------------------------------------------------------------

_PAGES_HINT = "use 1-based page numbers and ranges, e.g. 1-3,7,10- (10- runs to the last page)"
_RANGE = re.compile(r"(\d*)\s*(-?)\s*(\d*)", re.ASCII)


@dataclass(frozen=True)
class PageSelection:
    """Pages asked for with --pages: 1-based inclusive ranges, `None` as the end of an open range."""

    ranges: tuple[tuple[int, int | None], ...]

    def indices(self, page_count: int, *, source: str = "the document") -> list[int]:
        """Return the 0-based indices selected in a document of `page_count` pages, ascending, once each."""
        chosen: set[int] = set()
        for first, last in self.ranges:
            asked = f"{first}-" if last is None else str(last)
            if first > page_count or (last is not None and last > page_count):
                pages = "page" if page_count == 1 else "pages"
                raise InputError(
                    f"{source} has {page_count} {pages}; --pages asks for {asked}",
                    hint="choose pages inside the document, or leave out --pages",
                )
            chosen.update(range(first - 1, page_count if last is None else last))
        return sorted(chosen)


def parse_pages(spec: str) -> PageSelection:
    """Parse a --pages value such as `1-3,7,10-` (1-based, inclusive, `10-` open-ended, `-3` from 1)."""
    if not spec.strip():
        raise UsageError("--pages is empty", hint=_PAGES_HINT)
    ranges: list[tuple[int, int | None]] = []
    for part in spec.split(","):
        ranges.append(_parse_range(part.strip(), spec))
    return PageSelection(tuple(ranges))


def _parse_range(part: str, spec: str) -> tuple[int, int | None]:
    match = _RANGE.fullmatch(part)
    if not part:
        problem = "an empty range"
    elif match is None or not (match[1] or match[3]) or (match[1] and match[3] and not match[2]):
        problem = f"`{part}` is not a page number or range"
    else:
        first = int(match[1]) if match[1] else 1
        last = first if not match[2] else int(match[3]) if match[3] else None
        if first == 0 or last == 0:
            problem = "pages are numbered from 1"
        elif last is not None and last < first:
            problem = f"the range `{part}` runs backwards"
        else:
            return first, last
    raise UsageError(f"--pages `{spec}`: {problem}", hint=_PAGES_HINT)


# --- discovery --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Discovery:
    """What the inputs named: documents to read, files skipped as unsupported, and inputs in error."""

    documents: list[Document]
    unsupported: list[str]  # files met in folders that are not images or PDFs; skipped, not errors
    errors: list[InputError]  # inputs that do not exist, folders that cannot be listed, ...


def discover(inputs: Sequence[str], *, from_list: str | None = None) -> Discovery:
    """Expand files, folders, quoted globs, `-` (stdin) and a --from-list file into documents.

    Folders are walked recursively in sorted order, skipping hidden files and folders; files in
    them that are neither named nor sniffed as a supported format are listed as unsupported. A file
    reached twice is read once. `from_list` names a file of paths, one a line (`-`: stdin); blank
    lines and lines starting with `#` are ignored, and relative paths are taken from the current
    folder. Stdin and other pipes are spooled to a temporary file removed at exit.

    Output names: a file argument is named by its stem (`x/y.png` -> `y`), a file found in a folder
    by its path below that folder without the suffix (`in/` holding `a/b.pdf` -> `a/b`), stdin
    `stdin`. Names that clash (ignoring case, for case-insensitive file systems) keep their suffix
    (`a.png`, `a.pdf`); if they still clash they gain parent folders one at a time (`x/a.pdf`,
    `y/a.pdf`); failing even that, a number (`a.pdf-2`).
    """
    finder = _Finder()
    for argument in inputs:
        finder.add(argument, stdin_allowed=True)
    if from_list is not None:
        if from_list == "-" and finder.stdin_used:
            raise UsageError("stdin cannot carry both a document (`-`) and --from-list -")
        for entry in _read_list(from_list):
            finder.add(entry, stdin_allowed=False)
    names = _unique_names(finder.found)
    documents = [
        Document(item.path, name, item.label) for item, name in zip(finder.found, names, strict=True)
    ]
    return Discovery(documents, finder.unsupported, finder.errors)


@dataclass(frozen=True)
class _Found:
    """A document found by discovery, before its output name is settled."""

    path: str
    relative: PurePosixPath  # below the folder it was found in (or just its file name), suffix kept
    parents: tuple[str, ...]  # the folders above that, outermost first
    label: str | None = None

    @property
    def top_level(self) -> int:
        """The most specific naming level `name` accepts."""
        return 1 + len(self.parents)

    def name(self, level: int) -> str:
        """Return the output name at a level: 0 stem, 1 with suffix, 2+ with that many folders - 1."""
        if level == 0:
            return self.relative.with_suffix("").as_posix()
        return PurePosixPath(*self.parents[len(self.parents) - level + 1 :], self.relative).as_posix()


class _Finder:
    """Collect documents, unsupported files and errors from arguments, in order."""

    def __init__(self) -> None:
        self.found: list[_Found] = []
        self.unsupported: list[str] = []
        self.errors: list[InputError] = []
        self.stdin_used = False
        self._seen: set[str] = set()

    def add(self, argument: str, *, stdin_allowed: bool) -> None:
        """Add what one argument names: stdin, a folder, a file, a pipe, or a quoted glob pattern."""
        if argument == "-" and stdin_allowed:
            self._add_stdin()
        elif os.path.isdir(argument):
            self._walk(argument)
        elif os.path.exists(argument):
            self._add_file(argument)
        elif os.path.lexists(argument):
            self.errors.append(InputError(f"`{argument}` is a broken symbolic link"))
        elif any(char in argument for char in "*?["):
            self._add_glob(argument)
        else:
            self.errors.append(InputError(f"`{argument}` does not exist"))

    def _add_stdin(self) -> None:
        if self.stdin_used:
            raise UsageError("`-` is given twice, but stdin can be read only once")
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError(
                "`-` reads an image or PDF from stdin, but stdin is a terminal",
                hint="pipe a file in, e.g. `kosmos md - < scan.pdf`",
            )
        self.stdin_used = True
        path = _spool(sys.stdin.buffer)
        self.found.append(_Found(path, PurePosixPath(STDIN_NAME), (), STDIN_LABEL))

    def _add_glob(self, pattern: str) -> None:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            self.errors.append(InputError(f"no files match `{pattern}`"))
        for match in matches:
            if os.path.isdir(match):
                self._walk(match)
            else:
                self._add_file(match)

    def _add_file(self, path: str) -> None:
        location = Path(os.path.abspath(path))
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError as error:
            self.errors.append(_file_error(f"`{path}`", error))
            return
        if regular:
            self._keep(path, PurePosixPath(location.name), location.parent.parts[1:])
            return
        # A pipe such as `<(curl ...)` can be read once, but pages are read more than once.
        try:
            with open(path, "rb") as stream:
                spooled = _spool(stream)
        except OSError as error:
            self.errors.append(_file_error(f"`{path}`", error))
            return
        self.found.append(_Found(spooled, PurePosixPath(location.name), location.parent.parts[1:], path))

    def _keep(self, path: str, relative: PurePosixPath, parents: tuple[str, ...]) -> None:
        real = os.path.normcase(os.path.realpath(path))
        if real in self._seen:
            logger.debug("`%s` was already found; reading it once", path)
            return
        self._seen.add(real)
        self.found.append(_Found(path, relative, parents))

    def _walk(self, root: str) -> None:
        parents = Path(os.path.abspath(root)).parts[1:]
        visited = {os.path.realpath(root)}
        self._visit(root, PurePosixPath(), parents, visited)

    def _visit(
        self, folder: str, relative: PurePosixPath, parents: tuple[str, ...], visited: set[str]
    ) -> None:
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            self.errors.append(_file_error(f"folder `{folder}`", error))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                real = os.path.realpath(entry.path)
                if real in visited:
                    logger.debug("skipping `%s`: a link back to a folder already walked", entry.path)
                    continue
                visited.add(real)
                self._visit(entry.path, relative / entry.name, parents, visited)
            elif entry.is_file() and _looks_supported(entry.path):
                self._keep(entry.path, relative / entry.name, parents)
            else:
                self.unsupported.append(entry.path)


def _looks_supported(path: str) -> bool:
    """Whether a file met in a folder should be read: a supported suffix, or supported content."""
    suffix = PurePath(path).suffix.lower()
    if suffix in _SUFFIX_FORMATS:
        return True
    try:
        with open(path, "rb") as stream:
            return _sniff(stream.read(_HEADER_BYTES), suffix) is not None
    except OSError:
        return False


def _read_list(from_list: str) -> list[str]:
    """Return the paths a --from-list file names: one a line, blank lines and `#` comments skipped."""
    try:
        if from_list == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(from_list, "rb") as stream:
                data = stream.read()
    except OSError as error:
        raise UsageError(f"cannot read --from-list `{from_list}`: {error.strerror or error}") from None
    lines = (os.fsdecode(raw).strip() for raw in data.removeprefix(codecs.BOM_UTF8).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _spool(stream: BinaryIO) -> str:
    """Copy a stream to a temporary file, removed when the process exits, and return its path."""
    descriptor, path = tempfile.mkstemp(prefix="kosmos-input-")
    atexit.register(_remove, path)
    with os.fdopen(descriptor, "wb") as spooled:
        shutil.copyfileobj(stream, spooled)
    return path


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _unique_names(found: list[_Found]) -> list[str]:
    """Settle output names: raise the naming level of clashing documents until no two names clash."""
    levels = [0] * len(found)
    while True:
        names = [item.name(level) for item, level in zip(found, levels, strict=True)]
        groups: defaultdict[str, list[int]] = defaultdict(list)
        for index, name in enumerate(names):
            groups[name.casefold()].append(index)
        raised = False
        for group in groups.values():
            if len(group) == 1:
                continue
            # Documents whose full paths differ only in case cannot be told apart by more folders.
            fullest = Counter(found[index].name(found[index].top_level).casefold() for index in group)
            for index in group:
                item = found[index]
                if levels[index] < item.top_level and fullest[item.name(item.top_level).casefold()] == 1:
                    levels[index] += 1
                    raised = True
        if not raised:
            break
    taken: set[str] = set()
    unique = []
    for name in names:  # clashes left differ only in case: number them
        candidate, number = name, 2
        while candidate.casefold() in taken:
            candidate, number = f"{name}-{number}", number + 1
        taken.add(candidate.casefold())
        unique.append(candidate)
    return unique


# --- reading pages ----------------------------------------------------------------------------------


def count_pages(document: Document, *, password: str | None = None) -> int:
    """Return how many pages a document has, without rendering any."""
    with _open(document, password=password) as source:
        return source.page_count


def iter_pages(
    document: Document,
    *,
    pages: PageSelection | None = None,
    dpi: float | None = None,
    password: str | None = None,
) -> Iterator[Page | PageError]:
    """Stream a document's pages as RGB images, one at a time, with a `PageError` for a page that fails.

    PDF and other PyMuPDF pages render at `dpi`, by default at the DPI (rounded up to 0.01) that gives
    the model its full 4096 patches of 16x16 (1,048,576 pixels), so its resize never upscales.
    Images keep their own pixels; `dpi` does not apply to them. Raises `InputError` when the
    document cannot be read at all, when `pages` asks for pages it lacks, and when its only page
    fails.
    """
    _check_dpi(dpi)
    with _open(document, password=password) as source:
        count = source.page_count
        selected = pages.indices(count, source=f"`{document.display_name}`") if pages else range(count)
        for page_index in selected:
            try:
                rendered = source.render(page_index, dpi=dpi)
            except PageError as error:
                if count == 1:
                    raise
                yield error
                continue
            info = PageInfo(
                document=document,
                page_index=page_index,
                page_count=count,
                width=rendered.image.width,
                height=rendered.image.height,
                dpi=rendered.dpi,
                pixel_to_pdf=rendered.pixel_to_pdf,
            )
            yield Page(info, rendered.image)


def load_page_image(info: PageInfo, *, password: str | None = None) -> Image.Image:
    """Read a page again and return the same RGB pixels `iter_pages` gave for it."""
    with _open(info.document, password=password) as source:
        if info.page_index >= source.page_count:
            raise InputError(f"`{info.document.display_name}` changed since it was read: it has fewer pages")
        image = source.render(info.page_index, dpi=info.dpi).image
    if image.size != (info.width, info.height):
        raise InputError(f"`{info.document.display_name}` changed since it was read: page size differs")
    return image


def load_image(path: str | os.PathLike[str], *, password: str | None = None) -> Image.Image:
    """Read an image file (or the first page of a PDF) as RGB pixels, as `iter_pages` would."""
    with _open(Document(os.fspath(path), PurePath(path).stem), password=password) as source:
        return source.render(0, dpi=None).image


def _check_dpi(dpi: float | None) -> None:
    if dpi is not None and not (math.isfinite(dpi) and dpi > 0):
        raise UsageError(f"--dpi must be a positive number, not {dpi:g}")


@dataclass(frozen=True)
class _Rendered:
    image: Image.Image
    dpi: float | None = None
    pixel_to_pdf: Matrix | None = None


class _Source(Protocol):
    page_count: int

    def render(self, page_index: int, *, dpi: float | None) -> _Rendered:
        """Return one page's RGB pixels, or raise PageError."""
        ...


@contextlib.contextmanager
def _open(document: Document, *, password: str | None) -> Iterator[_Source]:
    """Open a document by its content and yield a page source; raise InputError if it cannot be read."""
    label = f"`{document.display_name}`"
    try:
        with open(document.path, "rb") as stream:
            header = stream.read(_HEADER_BYTES)
    except OSError as error:
        raise _file_error(label, error) from None
    if not header:
        raise InputError(f"{label} is empty (0 bytes)")
    suffix = PurePath(document.path).suffix.lower()
    kind = _sniff(header, suffix)
    if kind is None:
        claimed = _SUFFIX_FORMATS.get(suffix)
        if claimed is not None:
            raise InputError(
                f"{label} does not contain {claimed} data (damaged, truncated or misnamed)",
                hint=f"supported formats: {SUPPORTED_FORMATS}",
            )
        raise InputError(f"{label} is not an image or PDF", hint=f"supported formats: {SUPPORTED_FORMATS}")
    if kind in _PIL_FORMATS:
        with _open_image(document, kind, label) as source:
            yield source
    else:
        with _open_pymupdf(document, kind, label, password=password) as pymupdf_source:
            yield pymupdf_source


def _sniff(header: bytes, suffix: str) -> str | None:
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
        claimed = _SUFFIX_FORMATS.get(suffix)
        return claimed if claimed in _ZIP_FORMATS else None
    return None


def _file_error(label: str, error: OSError) -> InputError:
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
    return f"{label} page {page_index + 1}" if page_count > 1 else label


def _decode_problem(error: Exception) -> str:
    if isinstance(error, Image.UnidentifiedImageError):  # its text names a temp object, not the problem
        return "its header is damaged"
    return str(error) or type(error).__name__


# --- images -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_image(document: Document, kind: str, label: str) -> Iterator[_ImageSource]:
    with _PIL_INIT_LOCK:
        Image.init()  # a no-op once done; racing threads otherwise see a half-filled plugin registry
    # Pillow 13 no longer registers an opener of its own for MPO.
    formats = [name for name in _PIL_FORMATS[kind] if name in Image.OPEN]
    try:
        image = Image.open(document.path, formats=formats)
    except Image.DecompressionBombError:
        raise InputError(
            f"{label} is larger than {MAX_PAGE_PIXELS:,} pixels, too large to read safely",
            hint=_BOMB_HINT,
        ) from None
    except _PIL_ERRORS as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise _file_error(label, error) from None
        raise InputError(f"{label} cannot be decoded as {kind}: {_decode_problem(error)}") from None
    with image:
        try:
            # Every TIFF frame is a page; animated GIF, WebP and PNG and MPO extras give their first frame.
            page_count = int(getattr(image, "n_frames", 1)) if kind == "TIFF" else 1
        except _PIL_ERRORS as error:
            raise InputError(f"{label} cannot be decoded as {kind}: {_decode_problem(error)}") from None
        yield _ImageSource(document, image, kind, label, page_count)


class _ImageSource:
    """Pages of an open image file: its frames, EXIF-rotated and flattened to RGB."""

    def __init__(
        self, document: Document, image: Image.Image, kind: str, label: str, page_count: int
    ) -> None:
        self._document = document
        self._image = image
        self._kind = kind
        self._label = label
        self.page_count = page_count

    def render(self, page_index: int, *, dpi: float | None) -> _Rendered:
        """Return one frame's RGB pixels; `dpi` does not apply to images."""
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
                raise self._error(_file_error(where, error).message, page_index) from None
            raise self._error(
                f"{where} cannot be decoded as {self._kind}: {_decode_problem(error)}", page_index
            ) from None

    def _error(self, message: str, page_index: int, *, hint: str | None = None) -> PageError:
        return PageError(
            message, document=self._document, page_index=page_index, page_count=self.page_count, hint=hint
        )


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
    document: Document, kind: str, label: str, *, password: str | None
) -> Iterator[_PyMuPDFSource]:
    import pymupdf

    with PYMUPDF_LOCK:
        try:
            opened = pymupdf.open(document.path, filetype=kind.lower())
        except pymupdf.FileNotFoundError:
            raise InputError(f"{label} does not exist (was it moved or deleted?)") from None
        except (RuntimeError, ValueError, pymupdf.mupdf.FzErrorBase):
            raise InputError(f"{label} cannot be opened as {kind}: it is damaged beyond repair") from None
    try:
        with PYMUPDF_LOCK:
            _check_opened(opened, document, kind, label, password=password)
            page_count = opened.page_count
            _log_mupdf_warnings(label)
        yield _PyMuPDFSource(document, opened, kind, label, page_count)
    finally:
        with PYMUPDF_LOCK:
            opened.close()


def _check_opened(
    opened: pymupdf.Document, document: Document, kind: str, label: str, *, password: str | None
) -> None:
    if opened.needs_pass:
        if password is None:
            raise InputError(f"{label} is encrypted", hint="pass --password")
        if not opened.authenticate(password):
            raise InputError(
                f"{label} is encrypted and --password does not open it", hint="check the password"
            )
    # MuPDF rebuilds a cut-off PDF from what is left and would render its lost pages blank.
    if kind == "PDF" and opened.is_repaired and not _ends_with_eof(document.path):
        raise InputError(
            f"{label} is truncated: it ends before its %%EOF marker",
            hint="the file was cut short (an interrupted download or copy?); get a complete copy",
        )
    if opened.page_count == 0:
        raise InputError(f"{label} has no pages")


def _ends_with_eof(path: str) -> bool:
    with open(path, "rb") as stream:
        stream.seek(max(0, os.fstat(stream.fileno()).st_size - _TAIL_BYTES))
        return b"%%EOF" in stream.read()


def _log_mupdf_warnings(label: str) -> None:
    """Move MuPDF's collected warnings to the debug log; they would pile up over thousands of files."""
    import pymupdf

    warnings = pymupdf.TOOLS.mupdf_warnings(reset=True)
    if warnings:
        logger.debug("MuPDF on %s: %s", label, warnings.replace("\n", "; "))


class _PyMuPDFSource:
    """Pages of an open PyMuPDF document, rendered on white as a viewer shows them."""

    def __init__(
        self, document: Document, opened: pymupdf.Document, kind: str, label: str, page_count: int
    ) -> None:
        self._document = document
        self._opened = opened
        self._kind = kind
        self._label = label
        self.page_count = page_count

    def render(self, page_index: int, *, dpi: float | None) -> _Rendered:
        """Render one page at `dpi` (default: the model's size); PDF pages also get their pixel-to-PDF map."""
        import pymupdf

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
            except (RuntimeError, ValueError, pymupdf.mupdf.FzErrorBase) as error:
                raise self._error(f"{where} cannot be rendered: {error}", page_index) from None
            finally:
                _log_mupdf_warnings(where)
            image = Image.frombytes(
                "RGB", (pixmap.width, pixmap.height), pixmap.samples, "raw", "RGB", pixmap.stride
            )
        return _Rendered(image, dpi, to_pdf)

    def _error(self, message: str, page_index: int, *, hint: str | None = None) -> PageError:
        return PageError(
            message, document=self._document, page_index=page_index, page_count=self.page_count, hint=hint
        )


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
