"""Inputs named on the command line to documents: walk folders, spool stdin and pipes, name outputs.

Output names (`Document.name`) are fixed by each input's path and how it was given; see `discover`.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import glob
import logging
import os
import select
import stat
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePath, PurePosixPath
from typing import TYPE_CHECKING, Protocol

import psutil

from kosmos_cli.errors import InputError, UsageError
from kosmos_cli.rasterize import file_error, looks_supported
from kosmos_cli.stores import RECORD_FOLDER, is_uri, public_location
from kosmos_cli.values import Document, safe_text
from kosmos_cli.writers.data import result_stem
from kosmos_cli.writers.drawing import DRAWING_SUFFIX
from kosmos_cli.writers.looking import HEAT_SUFFIX, OVERVIEW_SUFFIX

PICTURE_SUFFIXES = (DRAWING_SUFFIX, OVERVIEW_SUFFIX, HEAT_SUFFIX)  # kosmos's page pictures, never inputs

if TYPE_CHECKING:
    import pyarrow.fs

logger = logging.getLogger(__name__)

STDIN_NAME = "stdin"  # output stem of a document read from stdin
STDIN_LABEL = "<stdin>"  # what messages call it
SPOOL_PREFIX = "kosmos-input-"  # temporary copies of stdin and pipes: kosmos-input-PID-XXXX
MAX_SPOOL_BYTES = 4 << 30  # largest stdin or pipe read (4 GiB)
FIFO_WAIT_SECONDS = 10.0  # how long a named pipe may stay silent before it is reported

# --- discovery --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Discovery:
    """What the inputs named: documents to read, files skipped as unsupported, and inputs in error."""

    documents: list[Document]
    unsupported: list[str]  # files met in folders that are not images or PDFs; skipped, not errors
    errors: list[InputError]  # inputs that do not exist, folders that cannot be listed, ...
    empty: list[str] = field(default_factory=list)  # folders, globs or lists that named no document


def discover(
    inputs: Sequence[str],
    *,
    from_list: str | None = None,
    exclude: Sequence[str] = (),
    uris: bool = False,
    root: str | None = None,
) -> Discovery:
    """Expand files, folders, quoted globs, `-` (stdin) and a --from-list file into documents.

    Folders are walked recursively in sorted order, skipping hidden files and folders, kosmos's
    own outputs (the folders and files in `exclude`, any folder below holding a `.kosmos` run
    record, `*.boxes.png` drawings and `*.attention.png`, `*.heat.png` pictures), FIFOs, devices
    and links that loop; files in them that are neither
    named nor sniffed as a supported format are listed as unsupported. A file reached twice is read
    once. `from_list` names a file of paths, one a line (`-`: stdin); blank lines and lines
    starting with `#` are ignored, and relative paths are taken from the current folder. Stdin and
    other pipes are spooled to a temporary file removed at exit.

    Output names are fixed by each document's path and how it was given (`_Finder.name_of`), never
    by the run's other inputs: below a folder given, the path below it; a file inside the current
    folder, its path from there; a file elsewhere, its file name; with `root`, every path below
    `root` (a document outside it is an error). With `uris`, inputs may instead all be object-store
    URIs (`discover_uris`).
    """
    named = [location for location in inputs if is_uri(location)]
    if named:
        if not uris:
            raise UsageError(
                f"`{public_location(named[0])}` is an object-store URI, which only --ray reads",
                hint="add --ray, or copy the files here and pass their paths",
            )
        if len(named) < len(inputs) or from_list is not None:
            raise UsageError(
                "inputs must be all local paths or all URIs, and URIs cannot come from --from-list",
                hint="run local and object-store inputs as two commands",
            )
        if root is not None:
            raise UsageError(
                "--root names local inputs; object-store inputs are named below the prefix given",
                hint="drop --root",
            )
        return discover_uris(named)
    if root is not None and not os.path.isdir(root):
        raise UsageError(
            f"--root `{safe_text(root)}` is not a folder", hint="name the folder the inputs are below"
        )
    finder = _Finder(exclude, root=root)
    for argument in inputs:
        finder.add(argument, stdin_allowed=True)
    if from_list is not None:
        if from_list == "-" and finder.stdin_used:
            raise UsageError("stdin cannot carry both a document (`-`) and --from-list -")
        for entry in _read_list(from_list):
            finder.add(entry, stdin_allowed=False)
    documents = finder.found
    if not documents and not finder.errors and not finder.empty:
        finder.empty.extend(inputs if from_list is None else [f"--from-list {from_list}"])
    return Discovery(documents, finder.unsupported, finder.errors, finder.empty)


def find_results(inputs: Sequence[str]) -> Discovery:
    """Expand the files, folders and quoted globs `kosmos convert` is given into kosmos's results.

    Folders are walked for `.json` and `.jsonl` files (output folders included); each result is a
    `Document` named as `discover` names inputs, less its suffix (`result_stem`): the outputs'
    stem in the folder converted into.
    """
    finder = _Finder((), results=True)
    for argument in inputs:
        finder.add(argument, stdin_allowed=False)
    return Discovery(finder.found, [], finder.errors, finder.empty)


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
                hint="output names ignore case; pass --root DIR to name every input by its path below DIR,"
                " or transcribe them in separate runs with different -o",
            )
    return None


class _Finder:
    """Collect documents, unsupported files and errors from arguments, in order."""

    def __init__(self, exclude: Sequence[str], *, root: str | None = None, results: bool = False) -> None:
        self.found: list[Document] = []
        self.unsupported: list[str] = []
        self.errors: list[InputError] = []
        self.empty: list[str] = []  # inputs that named nothing to read
        self.stdin_used = False
        self._seen: set[str] = set()
        self._exclude = {os.path.realpath(path) for path in exclude}
        self._here = PurePosixPath(os.path.abspath(os.curdir))
        self._root = (root, PurePosixPath(os.path.abspath(root))) if root is not None else None
        self._results = results  # kosmos's JSON and JSON lines (`find_results`), not images and PDFs

    def name_of(self, location: PurePosixPath, folder: PurePosixPath | None) -> str | None:
        """Name a document at `location` (absolute), found in the `folder` given, or named itself (None).

        With --root, its path below the root (None, and an error, outside it); else below the folder
        it was found in; a file named itself: its path from the current folder if it is inside it,
        else its file name.
        """
        if self._root is not None:
            shown, root = self._root
            if not location.is_relative_to(root):
                where = safe_text(
                    os.path.relpath(location) if location.is_relative_to(self._here) else str(location)
                )
                self.errors.append(InputError(f"`{where}` is not below --root `{safe_text(shown)}`"))
                return None
            return location.relative_to(root).as_posix()
        if folder is not None:
            return location.relative_to(folder).as_posix()
        if location.is_relative_to(self._here):
            return location.relative_to(self._here).as_posix()
        return location.name

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
        self.found.append(Document(path, STDIN_NAME, STDIN_LABEL))

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
            self.errors.append(file_error(label, error))
            return
        if stat.S_ISREG(mode):
            self._keep(path, location, None)
            return
        if self._results:  # kosmos's results are files it wrote: anything else is refused at once
            self.errors.append(InputError(f"{label} is not a regular file"))
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
        self.found.append(Document(spooled, location.name, path))

    def _keep(self, path: str, location: PurePosixPath, folder: PurePosixPath | None) -> None:
        real = os.path.normcase(os.path.realpath(path))
        if real in self._seen:
            logger.debug("`%s` was already found; reading it once", safe_text(path))
            return
        name = self.name_of(location, folder)
        if name is None:
            return
        if self._results:
            name = result_stem(name)
        self._seen.add(real)
        self.found.append(Document(path, name))

    def _walk(self, root: str) -> None:
        # A folder named on the command line is walked even when it is the output folder too.
        if self._root is not None and not PurePosixPath(os.path.abspath(root)).is_relative_to(self._root[1]):
            shown = self._root[0]
            self.errors.append(InputError(f"`{safe_text(root)}` is not below --root `{safe_text(shown)}`"))
            return
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
            self.errors.append(file_error(f"folder `{safe_text(folder)}`", error))
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
                outputs = not self._results and _is_output_folder(entry.path)
                if real in visited or real in self._exclude or outputs:
                    logger.debug("skipping `%s`: walked already or kosmos outputs", safe_text(entry.path))
                    continue
                visited.add(real)
                self._visit(entry.path, root, visited)
            elif not stat.S_ISREG(mode):
                logger.debug("skipping `%s`: not a regular file", safe_text(entry.path))
            elif self._results:
                if result_stem(entry.name) != entry.name:
                    self._keep(entry.path, PurePosixPath(os.path.abspath(entry.path)), root)
            elif entry.name.endswith(PICTURE_SUFFIXES) or os.path.realpath(entry.path) in self._exclude:
                logger.debug("skipping `%s`: a kosmos output", safe_text(entry.path))
            elif looks_supported(entry.path):
                self._keep(entry.path, PurePosixPath(os.path.abspath(entry.path)), root)
            else:
                self.unsupported.append(safe_text(entry.path))


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
        raise file_error(label, error) from None
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
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            _remove(path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _is_output_folder(folder: str) -> bool:
    """Whether a folder holds kosmos outputs: it has the run record kosmos keeps in `.kosmos/`."""
    return os.path.lexists(os.path.join(folder, RECORD_FOLDER))


def discover_uris(uris: Sequence[str]) -> Discovery:
    """List the documents that object-store URIs name: files, or every file below a prefix, recursively.

    Output names follow `discover`'s rule: a file's path below the prefix given, or the file name of
    an object named itself, suffix kept. Only the suffix
    tells whether a file is worth reading (content sniffing would fetch every object); hidden files
    and folders are skipped.
    """
    from pyarrow import fs

    from kosmos_cli.rasterize import SUFFIX_FORMATS

    found: list[Document] = []
    unsupported: list[str] = []
    errors: list[InputError] = []
    seen: set[str] = set()
    for uri in uris:
        try:
            filesystem, path = input_filesystem(uri)
            info = filesystem.get_file_info(path)
            if info.type == fs.FileType.Directory:
                entries = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
            else:
                entries = [info]
        except (InputError, OSError) as error:
            errors.append(
                error
                if isinstance(error, InputError)
                else InputError(f"cannot list `{public_location(uri)}`: {error}")
            )
            continue
        if info.type == fs.FileType.NotFound:
            errors.append(InputError(f"`{public_location(uri)}` does not exist"))
            continue
        base = PurePosixPath(path if info.type == fs.FileType.Directory else path.rpartition("/")[0])
        # Each file's URI is the one given with the path below it added, so a host, port or query
        # (hdfs://host:port/..., s3://bucket/prefix?region=...) carries over.
        root, _, query = uri.partition("?")
        root, path = root.rstrip("/"), path.rstrip("/")
        for entry in sorted((e for e in entries if e.type == fs.FileType.File), key=lambda e: e.path):
            relative = PurePosixPath(entry.path).relative_to(base)
            if any(part.startswith(".") for part in relative.parts):
                continue
            location = root + entry.path[len(path) :] + ("?" + query if query else "")
            if relative.suffix.lower() not in SUFFIX_FORMATS:
                unsupported.append(location)
            elif location not in seen:
                seen.add(location)
                # Messages and outputs name a document without the credentials or query its URI may carry.
                public = public_location(location)
                found.append(Document(location, relative.as_posix(), public if public != location else None))
    return Discovery(found, [public_location(location) for location in unsupported], errors)


def input_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    from pyarrow import ArrowException, fs

    try:
        return fs.FileSystem.from_uri(uri)
    except ArrowException as error:
        raise InputError(f"`{public_location(uri)}` cannot be opened: {error}") from None
