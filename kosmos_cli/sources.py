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
import posixpath
import re
import select
import stat
import struct
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath, PurePosixPath
from typing import TYPE_CHECKING, Protocol, TypeVar

from PIL import Image, ImageOps

from kosmos_cli.errors import InputError, UsageError
from kosmos_cli.sandbox import ReaderStopped, Sandbox
from kosmos_cli.tiling import plan_tiles
from kosmos_cli.values import Document, Matrix, Page, PageInfo, safe_text

if TYPE_CHECKING:
    import pymupdf

logger = logging.getLogger(__name__)

MODEL_PIXELS = 4096 * 16 * 16  # pixels the Kosmos-2.5 processor keeps: 4096 patches of 16x16 (1,048,576)
MAX_PAGE_PIXELS = 2 * 89_478_485  # largest page read, in pixels: PIL's decompression-bomb error limit
WORK_PIXELS_PER_TILE = 4 * MODEL_PIXELS  # larger pages are shrunk before the model's processor sees them
SUPPORTED_FORMATS = "PDF, PNG, JPEG, WebP, TIFF, BMP, GIF, XPS, EPUB, CBZ"
STDIN_NAME = "stdin"  # output stem of a document read from stdin
STDIN_LABEL = "<stdin>"  # what messages call it
SPOOL_PREFIX = "kosmos-input-"  # temporary copies of stdin and pipes: kosmos-input-PID-XXXX
MAX_SPOOL_BYTES = 4 << 30  # largest stdin or pipe read (4 GiB)
FIFO_WAIT_SECONDS = 10.0  # how long a named pipe may stay silent before it is reported
RECORD_FOLDER = ".kosmos"  # in an output folder: the manifest, progress and temporary files of runs
DRAWING_SUFFIX = ".boxes.png"  # --draw pictures: NAME.boxes.png, NAME-p001.boxes.png

PYMUPDF_LOCK = threading.RLock()  # PyMuPDF must not run in two threads at once
_PIL_INIT_LOCK = threading.Lock()  # PIL registers its plugins lazily, and not thread-safely

T = TypeVar("T")
_HEADER_BYTES = 1024  # a PDF header may follow up to 1 KiB of junk
_TAIL_BYTES = 1024  # where a complete PDF's %%EOF marker sits
_SCAN_BYTES = 64 << 20  # how much of a damaged PDF's end is read to find its last object
_OBJECT_START = re.compile(rb"\d+\s+\d+\s+obj\b")
_STREAM_START = re.compile(rb"(?<!end)stream\r?\n")
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
    empty: list[str] = field(default_factory=list)  # folders, globs or lists that named no document


def discover(
    inputs: Sequence[str], *, from_list: str | None = None, exclude: Sequence[str] = ()
) -> Discovery:
    """Expand files, folders, quoted globs, `-` (stdin) and a --from-list file into documents.

    Folders are walked recursively in sorted order, skipping hidden files and folders, kosmos's
    own outputs (the folders and files in `exclude`, any folder below holding a `.kosmos` run
    record, and `*.boxes.png` drawings), FIFOs, devices and links that loop; files in them that are neither
    named nor sniffed as a supported format are listed as unsupported. A file reached twice is read
    once. `from_list` names a file of paths, one a line (`-`: stdin); blank lines and lines
    starting with `#` are ignored, and relative paths are taken from the current folder. Stdin and
    other pipes are spooled to a temporary file removed at exit.

    Output names are given by `mirror_names`: each document's path below the common root of all
    inputs, suffix kept.
    """
    finder = _Finder(exclude)
    for argument in inputs:
        finder.add(argument, stdin_allowed=True)
    if from_list is not None:
        if from_list == "-" and finder.stdin_used:
            raise UsageError("stdin cannot carry both a document (`-`) and --from-list -")
        for entry in _read_list(from_list):
            finder.add(entry, stdin_allowed=False)
    names = mirror_names(finder.found)
    documents = [
        Document(item.path, name, item.label) for item, name in zip(finder.found, names, strict=True)
    ]
    if not documents and not finder.errors and not finder.empty:
        finder.empty.extend(inputs if from_list is None else [f"--from-list {from_list}"])
    return Discovery(documents, finder.unsupported, finder.errors, finder.empty)


@dataclass(frozen=True)
class Found:
    """A document found by discovery, before its output name is settled."""

    path: str  # what is opened: a path, a spooled copy, or a URI
    location: PurePosixPath  # where it is, absolute (a URI's path below its scheme), for naming
    root: PurePosixPath | None  # the input it was found through: a folder, else the file's folder
    label: str | None = None  # what messages call it when `path` is not that
    fixed_name: str | None = None  # the output name of stdin and pipes, which have no place


def mirror_names(found: Sequence[Found]) -> list[str]:
    """Name each document's outputs by its path below the common root of every input, suffix kept.

    `kosmos md in/` names `in/a/b.pdf` `a/b.pdf` (outputs `a/b.pdf.md`, ...); `kosmos md x/y.png`
    names it `y.png`; `kosmos md s/2024/a.pdf s/2025/a.pdf` names them `2024/a.pdf` and
    `2025/a.pdf`. The name depends only on the document's path and the run's input roots, never on
    which other files are in the run. Stdin is `stdin`; a pipe is named by its file name.
    """
    roots = [str(item.root) for item in found if item.fixed_name is None and item.root is not None]
    common = PurePosixPath(posixpath.commonpath(roots)) if roots else PurePosixPath("/")
    names = []
    for item in found:
        if item.fixed_name is not None:
            names.append(item.fixed_name)
        else:
            names.append(item.location.relative_to(common).as_posix())
    return names


def name_clashes(documents: Sequence[Document]) -> UsageError | None:
    """Return the usage error for two documents whose outputs would share a name (ignoring case)."""
    seen: dict[str, Document] = {}
    for document in documents:
        key = document.name.casefold()
        other = seen.setdefault(key, document)
        if other is not document:
            return UsageError(
                f"`{other.display_name}` and `{document.display_name}` would both be written as "
                f"`{document.name}`",
                hint="output names ignore case; transcribe them in separate runs with different -o",
            )
    return None


class _Finder:
    """Collect documents, unsupported files and errors from arguments, in order."""

    def __init__(self, exclude: Sequence[str]) -> None:
        self.found: list[Found] = []
        self.unsupported: list[str] = []
        self.errors: list[InputError] = []
        self.empty: list[str] = []  # inputs that named nothing to read
        self.stdin_used = False
        self._seen: set[str] = set()
        self._exclude = {os.path.realpath(path) for path in exclude}

    def add(self, argument: str, *, stdin_allowed: bool) -> None:
        """Add what one argument names: stdin, a folder, a file, a pipe, or a quoted glob pattern."""
        if argument == "-" and stdin_allowed:
            self._add_stdin()
        elif os.path.isdir(argument):
            self._walk(argument)
        elif os.path.exists(argument):
            self._add_file(argument)
        elif os.path.lexists(argument):
            self.errors.append(InputError(f"`{safe_text(argument)}` is a broken symbolic link"))
        elif any(char in argument for char in "*?["):
            self._add_glob(argument)
        else:
            self.errors.append(InputError(f"`{safe_text(argument)}` does not exist"))

    def _add_stdin(self) -> None:
        if self.stdin_used:
            raise UsageError("`-` is given twice, but stdin can be read only once")
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError(
                "`-` reads an image or PDF from stdin, but stdin is a terminal",
                hint="pipe a file in, e.g. `kosmos md - < scan.pdf`",
            )
        self.stdin_used = True
        path = _spool(sys.stdin.buffer, STDIN_LABEL)
        self.found.append(Found(path, PurePosixPath("/"), None, STDIN_LABEL, STDIN_NAME))

    def _add_glob(self, pattern: str) -> None:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            self.errors.append(InputError(f"no files match `{safe_text(pattern)}`"))
        for match in matches:
            if os.path.isdir(match):
                self._walk(match)
            else:
                self._add_file(match)

    def _add_file(self, path: str) -> None:
        location = PurePosixPath(os.path.abspath(path))
        label = f"`{safe_text(path)}`"
        try:
            mode = os.stat(path).st_mode
        except OSError as error:
            self.errors.append(_file_error(label, error))
            return
        if stat.S_ISREG(mode):
            self._keep(path, location, location.parent)
            return
        if not stat.S_ISFIFO(mode):
            self.errors.append(InputError(f"{label} is a device, not a file"))
            return
        # A pipe such as `<(curl ...)` can be read once, but pages are read more than once.
        try:
            spooled = _spool_fifo(path, label)
        except InputError as error:
            self.errors.append(error)
            return
        self.found.append(Found(spooled, location, None, path, location.name))

    def _keep(self, path: str, location: PurePosixPath, root: PurePosixPath) -> None:
        real = os.path.normcase(os.path.realpath(path))
        if real in self._seen:
            logger.debug("`%s` was already found; reading it once", safe_text(path))
            return
        self._seen.add(real)
        self.found.append(Found(path, location, root))

    def _walk(self, root: str) -> None:
        # A folder named on the command line is walked even when it is the output folder too.
        real = os.path.realpath(root)
        before = len(self.found)
        self._visit(root, PurePosixPath(os.path.abspath(root)), {real})
        if len(self.found) == before:
            self.empty.append(root)

    def _visit(self, folder: str, root: PurePosixPath, visited: set[str]) -> None:
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            self.errors.append(_file_error(f"folder `{safe_text(folder)}`", error))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                mode = os.stat(entry.path).st_mode  # follows links; a loop raises ELOOP
            except OSError as error:
                logger.debug("skipping `%s`: %s", safe_text(entry.path), error.strerror or error)
                continue
            if stat.S_ISDIR(mode):
                real = os.path.realpath(entry.path)
                if real in visited or real in self._exclude or _is_output_folder(entry.path):
                    logger.debug("skipping `%s`: walked already or kosmos outputs", safe_text(entry.path))
                    continue
                visited.add(real)
                self._visit(entry.path, root, visited)
            elif not stat.S_ISREG(mode):
                logger.debug("skipping `%s`: not a regular file", safe_text(entry.path))
            elif entry.name.endswith(DRAWING_SUFFIX) or os.path.realpath(entry.path) in self._exclude:
                logger.debug("skipping `%s`: a kosmos output", safe_text(entry.path))
            elif _looks_supported(entry.path):
                self._keep(entry.path, PurePosixPath(os.path.abspath(entry.path)), root)
            else:
                self.unsupported.append(safe_text(entry.path))


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


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _spool(stream: _Readable, label: str) -> str:
    """Copy a stream to a temporary file, removed when the process exits, and return its path.

    The file's name carries this process's id, so a later run removes what a killed one left
    (`remove_stale_spools`). More than MAX_SPOOL_BYTES is refused: no page needs that much.
    """
    descriptor, path = tempfile.mkstemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-")
    atexit.register(_remove, path)
    with os.fdopen(descriptor, "wb") as spooled:
        copied = 0
        while chunk := stream.read(1 << 20):
            copied += len(chunk)
            if copied > MAX_SPOOL_BYTES:
                spooled.close()
                _remove(path)
                raise InputError(f"{label} holds more than {MAX_SPOOL_BYTES:,} bytes, too much to read")
            spooled.write(chunk)
    return path


def _spool_fifo(path: str, label: str) -> str:
    """Spool a named pipe, failing at once (not hanging) when nothing writes to it."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise _file_error(label, error) from None
    with os.fdopen(descriptor, "rb", buffering=0) as stream:
        ready, _, _ = select.select([descriptor], [], [], FIFO_WAIT_SECONDS)
        first = stream.read(1 << 16) if ready else None
        if not first:  # None: a writer that sends nothing; b"": no writer at all
            raise InputError(f"{label} is a pipe with nothing written to it")
        os.set_blocking(descriptor, True)
        return _spool(_Prefixed(first, stream), label)


class _Prefixed:
    """A stream that yields some bytes already read before the rest of another stream."""

    def __init__(self, head: bytes, rest: _Readable) -> None:
        self.head = head
        self.rest = rest

    def read(self, size: int) -> bytes:
        if self.head:
            chunk, self.head = self.head, b""
            return chunk
        return self.rest.read(size)


def remove_stale_spools() -> None:
    """Remove spooled stdin copies left in the temporary folder by runs that were killed."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{SPOOL_PREFIX}*")):
        pid = PurePath(path).name[len(SPOOL_PREFIX) :].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _is_output_folder(folder: str) -> bool:
    """Whether a folder holds kosmos outputs: it has the run record kosmos keeps in `.kosmos/`."""
    return os.path.lexists(os.path.join(folder, RECORD_FOLDER))


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
    pages: PageSelection | None = None,
    dpi: float | None = None,
    password: str | None = None,
    sandbox: Sandbox | None = None,
) -> Iterator[Page | PageError]:
    """Stream a document's pages as RGB images, one at a time, with a `PageError` for a page that fails.

    PDF and other PyMuPDF pages render at `dpi`, by default at the DPI (rounded up to 0.01) that gives
    the model its full 4096 patches of 16x16 (1,048,576 pixels), so its resize never upscales.
    Images keep their own pixels; `dpi` does not apply to them. A page far larger than the model
    reads is handed over shrunk (`model_image`), its `PageInfo` keeping the full size. With a
    `sandbox`, opening and rendering run in its process under its time limit. Raises
    `InputError` when the document cannot be read at all, when `pages` asks for pages it lacks,
    and when its only page fails.
    """
    _check_dpi(dpi)
    label = f"`{document.display_name}`"
    count = _probe(document, password, sandbox)
    try:
        selected = pages.indices(count, source=label) if pages else range(count)
        for page_index in selected:
            rendered: _Rendered | PageError
            try:
                rendered = _run(sandbox, render_page, document, page_index, dpi, password)
            except ReaderStopped as error:
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
            yield Page(info, rendered.image)
    finally:
        _release(sandbox)


def load_page_image(info: PageInfo, *, password: str | None = None) -> Image.Image:
    """Read a page again and return the same RGB pixels `iter_pages` read for it, at full size."""
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

_opened: tuple[tuple[str, str | None], contextlib.ExitStack, _Source] | None = None  # the open document


def probe_document(document: Document, password: str | None) -> int:
    """Open a document (kept open for the pages that follow) and return its page count."""
    return _source(document, password).page_count


def render_page(document: Document, page_index: int, dpi: float | None, password: str | None) -> _Rendered:
    """Render one page of the open document, shrunk for the model; `size` keeps its full size."""
    rendered = _source(document, password).render(page_index, dpi=dpi)
    image = model_image(rendered.image)
    return _Rendered(image, rendered.dpi, rendered.pixel_to_pdf, rendered.image.size)


def close_document() -> None:
    """Close the document `probe_document` opened, if any."""
    global _opened
    if _opened is not None:
        stack, _opened = _opened[1], None
        stack.close()


def _source(document: Document, password: str | None) -> _Source:
    global _opened
    key = (document.path, password)
    if _opened is not None and _opened[0] == key:
        return _opened[2]
    close_document()
    stack = contextlib.ExitStack()
    source = stack.enter_context(_open(document, password=password))
    _opened = (key, stack, source)
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


def _check_dpi(dpi: float | None) -> None:
    if dpi is not None and not (math.isfinite(dpi) and dpi > 0):
        raise UsageError(f"--dpi must be a positive number, not {dpi:g}")


@dataclass(frozen=True)
class _Rendered:
    image: Image.Image
    dpi: float | None = None
    pixel_to_pdf: Matrix | None = None
    size: tuple[int, int] = (0, 0)  # the page's full size, when `image` was shrunk for the model


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
    if kind == "PDF" and opened.is_repaired and _cut_short(document.path):
        raise InputError(
            f"{label} is truncated: it ends before its %%EOF marker",
            hint="the file was cut short (an interrupted download or copy?); get a complete copy",
        )
    if opened.page_count == 0:
        raise InputError(f"{label} has no pages")


def _cut_short(path: str) -> bool:
    """Whether a PDF MuPDF had to repair was cut off: no %%EOF at its end and its last object unfinished.

    A file whose cross-reference table or `startxref` is merely damaged still has every object
    whole, renders perfectly once repaired, and is read.
    """
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
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
