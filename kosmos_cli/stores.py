"""Where outputs go: a local folder or an object store, written so a killed run never leaves a half file.

`output_store(location)` opens the `-o` of a job: a local path (or `file://` URI) gives a
`LocalStore`, any other URI that `pyarrow.fs.FileSystem.from_uri` knows (`s3://`, `gs://`,
`hdfs://`, ...) an `ObjectStore`. Both name outputs by `/`-separated paths relative to the output
root and give the same guarantees:

- `write` is atomic. On a local disk: a temporary file in the same folder, fsync'd, then renamed
  over the output. On S3 and GCS: one upload of the whole bytes, which the store makes visible
  only once it is complete. On other pyarrow file systems: a temporary object, then a move.
- A *log* (`read_log`, `append_log`, `remove_log`) is the append-only record of finished pages
  that makes long documents resumable. On a local disk it is one file, appended to line by line.
  Object stores cannot append, and rewriting the whole object on every page costs the square of
  its length, so there a log `x.jsonl` is a folder `x/` of one small object per line
  (`x/00000000.json`, ...), read back in name order.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import url2pathname

from kosmos_cli.errors import KosmosError, UsageError

if TYPE_CHECKING:
    import pyarrow.fs

RECORD_FOLDER = ".kosmos"  # in an output folder: the manifest, progress and temporary files of runs
NEW_FILE_MODE = 0o666  # before the umask, as open() would create it
ATOMIC_UPLOADS = frozenset({"s3", "gcs"})  # pyarrow file systems whose objects appear only when complete
LISTING_THRESHOLD = 16  # ask an object store about more outputs than this with one listing, not one call each
LOG_ENTRY_DIGITS = 8  # object-store log entries are named 00000000.json, 00000001.json, ...

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # a scheme, as in s3://bucket/key or file:///path


def is_uri(location: str) -> bool:
    """Whether a location is a URI (`s3://...`, `file://...`) rather than a local path."""
    return _URI.match(location) is not None


def public_location(location: str) -> str:
    """Return a location as messages and outputs may show it: without credentials or query."""
    if not is_uri(location):
        return location
    parts = urlsplit(location)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def location_identity(location: str | os.PathLike[str]) -> str:
    """Return a key that two locations share when they name the same file (links resolved)."""
    text = os.fspath(location)
    if is_uri(text) and not text.lower().startswith("file://"):
        parts = urlsplit(public_location(text))
        path = posixpath.normpath(parts.path) if parts.path else ""
        return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path.rstrip('/')}"
    local = _file_uri_path(text) if is_uri(text) else text
    return "file://" + os.path.normcase(os.path.realpath(local))


def output_location(value: str | os.PathLike[str]) -> Path | str:
    """Return what `Job.output_dir` takes for an `-o` value: a local folder, or an object-store URI."""
    text = os.fspath(value)
    if not is_uri(text):
        return Path(text)
    if text.lower().startswith("file://"):
        return Path(_file_uri_path(text))
    output_store(text)  # a URI that cannot be opened is a usage error now, before the model loads
    return text


def output_store(location: str | os.PathLike[str]) -> OutputStore:
    """Open the output root a job writes to: a local folder, a `file://` URI or an object-store URI."""
    text = os.fspath(location)
    if not is_uri(text):
        return LocalStore(Path(text))
    if text.lower().startswith("file://"):
        return LocalStore(Path(_file_uri_path(text)))
    try:
        from pyarrow import ArrowException
    except ImportError:
        raise UsageError(
            f"-o `{public_location(text)}` needs pyarrow, which is not installed",
            hint="pip install 'kosmos-transcribe[ray]' (or just pyarrow)",
        ) from None
    try:
        filesystem, root = _open_uri(text)
    except (ArrowException, ValueError, OSError) as error:
        raise UsageError(
            f"-o `{public_location(text)}` cannot be opened: {error}",
            hint="pass a local folder or a URI such as s3://bucket/prefix or gs://bucket/prefix",
        ) from None
    return ObjectStore(filesystem, root, public_location(text))


def _open_uri(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """Open a URI's file system; on S3, one that sends small objects in one request, not three."""
    from pyarrow import ArrowInvalid, fs

    if uri.lower().startswith("s3://") and "allow_delayed_open=" not in uri:
        # With delayed open, an object smaller than one part is a single PutObject (atomic too) rather
        # than a multipart upload's create, part and complete. pyarrow before 15 does not know it.
        with contextlib.suppress(ArrowInvalid):
            return fs.FileSystem.from_uri(uri + ("&" if "?" in uri else "?") + "allow_delayed_open=true")
    return fs.FileSystem.from_uri(uri)


def _file_uri_path(uri: str) -> str:
    """Return the local path of a `file://` URI (`file:///data/out` -> `/data/out`)."""
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"`{uri}` names a file on another host", hint="write file:///path for a local path")
    return url2pathname(parts.path)


def object_info(uri: str) -> tuple[int, int | None]:
    """Return an object's size and modification time (ns, None if the store keeps none)."""
    from pyarrow import ArrowException

    try:
        filesystem, path = _open_uri(uri)
        info = filesystem.get_file_info(path)
    except (ArrowException, ValueError) as error:
        raise OSError(str(error)) from error
    mtime = info.mtime_ns if info.mtime is not None else None
    return int(info.size or 0), mtime


class OutputStore(ABC):
    """The output root of a job; every output is named by a `/`-separated path relative to it."""

    location: str  # the root as messages show it

    def open_for_run(self) -> None:
        """Check the root can be written and claim it for this run (a lock where the store has one)."""
        return

    def close(self) -> None:
        """Give up the claim `open_for_run` made."""
        return

    @abstractmethod
    def describe(self, relative: str) -> str:
        """Return how messages name an output: its path or URI, without credentials."""

    def identity(self, relative: str) -> str:
        """Return the `location_identity` of an output, to compare with the inputs'."""
        return location_identity(self.describe(relative))

    @abstractmethod
    def exists(self, relative: str) -> bool:
        """Whether an output exists."""

    def existing(self, relatives: Iterable[str]) -> set[str]:
        """Return those of the outputs that exist."""
        return {relative for relative in relatives if self.exists(relative)}

    def expect_logs(self, relatives: Collection[str]) -> None:
        """Say which logs `read_log` is about to be asked for, so a store can look them up at once."""
        return  # a local folder answers each as cheaply

    @abstractmethod
    def write(self, relative: str, data: bytes) -> None:
        """Write an output atomically: readers see the old bytes or all the new ones, never a part."""

    @abstractmethod
    def read(self, relative: str) -> bytes | None:
        """Return an output's bytes, or None if it does not exist."""

    @abstractmethod
    def remove(self, relative: str) -> None:
        """Remove an output if it exists."""

    @abstractmethod
    def read_log(self, relative: str) -> list[str]:
        """Return the lines of a log in the order they were appended; a torn last line may be among them."""

    @abstractmethod
    def append_log(self, relative: str, line: str) -> None:
        """Add one line (without its newline) to a log, creating it if needed."""

    @abstractmethod
    def remove_log(self, relative: str) -> None:
        """Remove a log if it exists."""

    @abstractmethod
    def move(self, source: str, target: str) -> bool:
        """Move an output to another name (replacing it); return False if there was none to move."""

    @abstractmethod
    def remove_folder(self, relative: str) -> None:
        """Remove a folder and everything in it, if it exists."""


class LocalStore(OutputStore):
    """An output folder on a local (or mounted) file system.

    Temporary files go to `ROOT/.kosmos/tmp/` and are renamed into place; a run holds an exclusive
    lock on `ROOT/.kosmos/lock`, so it can remove what a killed run left there.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)
        self._lock: int | None = None

    def open_for_run(self) -> None:
        """Refuse a root that is a file or links its record folder away; lock it; clear old temporaries."""
        records = self.root / RECORD_FOLDER
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(
                f"-o `{self.root}` is a file, not a folder", hint="name a folder (it is created)"
            )
        if records.is_symlink() or (records.exists() and not records.is_dir()):
            raise UsageError(
                f"`{records}` is not a folder kosmos made", hint="remove it, or choose another -o"
            )
        try:
            (records / "tmp").mkdir(parents=True, exist_ok=True)
            self._lock = os.open(records / "lock", os.O_RDWR | os.O_CREAT | _NOFOLLOW, NEW_FILE_MODE)
        except OSError as error:
            raise UsageError(f"cannot write to -o `{self.root}`: {error.strerror or error}") from None
        try:
            import fcntl

            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no advisory locks
            pass
        except OSError:
            raise UsageError(
                f"another kosmos run is writing to -o `{self.root}`",
                hint="wait for it to finish, or choose another -o",
            ) from None
        for leftover in (records / "tmp").iterdir():
            leftover.unlink(missing_ok=True)

    def close(self) -> None:
        """Let another run have the folder."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def describe(self, relative: str) -> str:
        """Return the output's path as the user named the folder."""
        return str(self.root / relative)

    def exists(self, relative: str) -> bool:
        """Whether the output's path is a file."""
        return (self.root / relative).is_file()

    def write(self, relative: str, data: bytes) -> None:
        """Write through a temporary file, fsync'd, then renamed over the output."""
        temporary = self.root / RECORD_FOLDER / "tmp"
        path = self._inside(relative)
        atomic_write(path, data, temporary_folder=temporary if temporary.is_dir() else None)

    def _inside(self, relative: str) -> Path:
        """Return an output's path, refusing one whose folders below the output folder include a link:
        a link planted there would send the output outside the folder."""
        folder = self.root
        for part in PurePosixPath(relative).parts[:-1]:
            folder = folder / part
            if folder.is_symlink():
                raise KosmosError(
                    f"`{self.describe(relative)}` would be written through the link `{folder}`",
                    hint="kosmos never writes through links inside -o: remove the link",
                )
        return self.root / relative

    def read(self, relative: str) -> bytes | None:
        """Return the file's bytes, or None if it does not exist."""
        try:
            return (self.root / relative).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise KosmosError(
                f"cannot read `{self.describe(relative)}`: {error.strerror or error}"
            ) from error

    def remove(self, relative: str) -> None:
        """Remove the file if it exists."""
        (self.root / relative).unlink(missing_ok=True)

    def read_log(self, relative: str) -> list[str]:
        """Return the log file's lines; bytes torn mid-character decode as U+FFFD."""
        data = self.read(relative)
        if data is None:
            return []
        return [line for line in data.decode("utf-8", errors="replace").split("\n") if line]

    def append_log(self, relative: str, line: str) -> None:
        """Append a line to the log file, first ending a line a killed run left torn."""
        path = self._inside(relative)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Never through a link: a planted one would send the log outside the output folder.
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | _NOFOLLOW, NEW_FILE_MODE)
            with os.fdopen(descriptor, "a+b") as stream:
                if stream.tell() > 0:  # append mode starts at the end
                    stream.seek(-1, os.SEEK_END)
                    if stream.read(1) != b"\n":
                        stream.write(b"\n")  # the torn line stays unreadable, the new one is whole
                stream.write(line.encode("utf-8") + b"\n")
        except OSError as error:
            raise KosmosError(f"cannot write `{path}`: {error.strerror or error}") from error

    def remove_log(self, relative: str) -> None:
        """Remove the log file if it exists."""
        self.remove(relative)

    def move(self, source: str, target: str) -> bool:
        """Rename a file into place (one atomic step on one file system)."""
        path = self._inside(target)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.root / source, path)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise KosmosError(f"cannot write `{path}`: {error.strerror or error}") from error
        return True

    def remove_folder(self, relative: str) -> None:
        """Remove the folder and its files."""
        shutil.rmtree(self.root / relative, ignore_errors=True)


class ObjectStore(OutputStore):
    """An output prefix on a pyarrow file system: S3, GCS, HDFS, ..."""

    def __init__(self, filesystem: pyarrow.fs.FileSystem, root: str, location: str) -> None:
        self.filesystem = filesystem
        self.root = root.rstrip("/")
        self.location = location.rstrip("/")
        self._log_next: dict[str, int] = {}  # log -> the number of its next entry
        self._listed_logs: dict[str, list[str]] = {}  # log -> its entries, from one listing (`expect_logs`)

    def describe(self, relative: str) -> str:
        """Return the output's URI, without credentials or query."""
        return f"{self.location}/{relative}"

    def exists(self, relative: str) -> bool:
        """Whether an object exists at the output's key."""
        from pyarrow import fs

        with self._errors("read", relative):
            return bool(self.filesystem.get_file_info(self._path(relative)).type == fs.FileType.File)

    def existing(self, relatives: Iterable[str]) -> set[str]:
        """Return those of the outputs that exist: one call each for a few, else one listing of the root."""
        from pyarrow import fs

        wanted = set(relatives)
        if len(wanted) <= LISTING_THRESHOLD:
            return {relative for relative in wanted if self.exists(relative)}
        with self._errors("list", ""):
            entries = self.filesystem.get_file_info(
                fs.FileSelector(self.root, recursive=True, allow_not_found=True)
            )
        prefix = self.root + "/"
        present = {e.path[len(prefix) :] for e in entries if e.type == fs.FileType.File}
        return wanted & present

    def write(self, relative: str, data: bytes) -> None:
        """Upload the whole bytes at once (S3, GCS), or to a temporary object moved into place."""
        path = self._path(relative)
        with self._errors("write", relative):
            if self.filesystem.type_name in ATOMIC_UPLOADS:
                self._upload(path, data)
                return
            directory, _, name = path.rpartition("/")
            temporary = f"{directory}/.{name[:200]}.{uuid.uuid4().hex[:12]}.tmp"
            try:
                self._upload(temporary, data)
                self.filesystem.move(temporary, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    self.filesystem.delete_file(temporary)
                raise

    def _upload(self, path: str, data: bytes) -> None:
        try:
            stream = self.filesystem.open_output_stream(path)
        except FileNotFoundError:  # file systems with real folders (HDFS) want the parent first
            self.filesystem.create_dir(path.rpartition("/")[0], recursive=True)
            stream = self.filesystem.open_output_stream(path)
        # One write of everything, then close: closing is what completes (and publishes) an upload.
        with stream:
            stream.write(data)

    def read(self, relative: str) -> bytes | None:
        """Return the object's bytes, or None if there is none."""
        try:
            with (
                self._errors("read", relative, missing=True),
                self.filesystem.open_input_stream(self._path(relative)) as stream,
            ):
                return bytes(stream.read())
        except _Missing:
            return None

    def remove(self, relative: str) -> None:
        """Delete the object if it exists."""
        with contextlib.suppress(_Missing), self._errors("remove", relative, missing=True):
            self.filesystem.delete_file(self._path(relative))

    def expect_logs(self, relatives: Collection[str]) -> None:
        """Look many logs up with one listing of the root, not one listing each (a log is read once)."""
        from pyarrow import fs

        if len(relatives) <= LISTING_THRESHOLD:
            return
        with self._errors("list", ""):
            entries = self.filesystem.get_file_info(
                fs.FileSelector(self.root, recursive=True, allow_not_found=True)
            )
        folders: dict[str, list[str]] = {_log_folder(relative): [] for relative in relatives}
        prefix = self.root + "/" if self.root else ""
        for entry in entries:
            folder, _, name = entry.path[len(prefix) :].rpartition("/")
            if entry.type == fs.FileType.File and folder in folders and _is_log_entry(name):
                folders[folder].append(name)
        for relative in relatives:
            self._listed_logs[relative] = sorted(folders[_log_folder(relative)])

    def read_log(self, relative: str) -> list[str]:
        """Return the lines of a log's entries, in the order they were added."""
        names = self._listed_logs.pop(relative, None)
        if names is None:
            names = self._log_entries(relative)
        else:
            self._log_next[relative] = _next_entry(names)
        lines = []
        for name in names:
            data = self.read(f"{_log_folder(relative)}/{name}")
            if data is not None:
                lines.append(data.decode("utf-8", errors="replace").rstrip("\n"))
        return lines

    def append_log(self, relative: str, line: str) -> None:
        """Add a line as the log's next entry: one small object."""
        number = self._log_next.get(relative)
        if number is None:
            self._log_entries(relative)
            number = self._log_next[relative]
        self.write(
            f"{_log_folder(relative)}/{number:0{LOG_ENTRY_DIGITS}d}.json", line.encode("utf-8") + b"\n"
        )
        self._log_next[relative] = number + 1

    def remove_log(self, relative: str) -> None:
        """Delete a log's entries (and its folder)."""
        self._log_next.pop(relative, None)
        self.remove_folder(_log_folder(relative))

    def move(self, source: str, target: str) -> bool:
        """Move an object (on S3 and GCS a copy, then a delete: the target appears whole)."""
        if not self.exists(source):  # S3 reports a missing source as a generic error
            return False
        path = self._path(target)
        with self._errors("write", target):
            if self.filesystem.type_name not in ATOMIC_UPLOADS:  # file systems with real folders
                self.filesystem.create_dir(path.rpartition("/")[0], recursive=True)
            self.filesystem.move(self._path(source), path)
        return True

    def remove_folder(self, relative: str) -> None:
        """Delete everything below a prefix."""
        with contextlib.suppress(_Missing), self._errors("remove", relative, missing=True):
            self.filesystem.delete_dir(self._path(relative))

    def _log_entries(self, relative: str) -> list[str]:
        """Return a log's entry names in order, and note the number its next entry takes."""
        from pyarrow import fs

        folder = self._path(_log_folder(relative))
        with self._errors("list", _log_folder(relative)):
            infos = self.filesystem.get_file_info(fs.FileSelector(folder, allow_not_found=True))
        names = sorted(info.base_name for info in infos if info.type == fs.FileType.File)
        names = [name for name in names if _is_log_entry(name)]
        self._log_next[relative] = _next_entry(names)
        return names

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if self.root else relative

    @contextlib.contextmanager
    def _errors(self, verb: str, relative: str, *, missing: bool = False) -> Iterator[None]:
        """Turn pyarrow errors into KosmosErrors naming the object (missing ones into `_Missing` if asked)."""
        from pyarrow import ArrowException

        try:
            yield
        except FileNotFoundError as error:
            if missing:
                raise _Missing from error
            where = self.describe(relative) if relative else self.location
            raise KosmosError(f"cannot {verb} `{where}`: it does not exist") from error
        except (OSError, ArrowException) as error:
            where = self.describe(relative) if relative else self.location
            raise KosmosError(f"cannot {verb} `{where}`: {error}") from error


class _Missing(Exception):
    """An object that was not there (internal to ObjectStore)."""


def _log_folder(relative: str) -> str:
    """Return the folder holding an object-store log's entries: `a/b.x.jsonl` -> `a/b.x`."""
    return relative.removesuffix(".jsonl")


def _is_log_entry(name: str) -> bool:
    return re.fullmatch(rf"\d{{{LOG_ENTRY_DIGITS}}}\.json", name) is not None


def _next_entry(names: list[str]) -> int:
    """Return the number of the entry after the last of a log's sorted entry names."""
    return int(names[-1].partition(".")[0]) + 1 if names else 0


def atomic_write(path: Path, data: bytes, *, temporary_folder: Path | None = None) -> None:
    """Write `data` to `path` through a temporary file, fsync'd, then renamed over it.

    The temporary file sits in `temporary_folder` (on the same file system) or beside `path`.
    """
    # Cut long names so the temporary name stays within the usual 255-byte limit.
    temporary = (temporary_folder or path.parent) / f".{path.name[:200]}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with O_EXCL (not tempfile) so the file gets the usual umask permissions, not 0600.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        descriptor = os.open(temporary, flags, NEW_FILE_MODE)
        try:
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise
    except OSError as error:
        raise KosmosError(f"cannot write `{path}`: {error.strerror or error}") from error
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Flush the folder entry of a renamed file to disk where the platform allows it."""
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        # Some file systems (e.g. network mounts) refuse fsync on folders; the file itself is synced.
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
