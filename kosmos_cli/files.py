"""Write output files atomically, so a killed run never leaves a half file that looks finished."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from kosmos_cli.errors import KosmosError

NEW_FILE_MODE = 0o666  # before the umask, as open() would create it


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder, fsync'd, then renamed over it."""
    # Cut long names so the temporary name stays within the usual 255-byte limit.
    temporary = path.with_name(f".{path.name[:200]}.{uuid.uuid4().hex[:12]}.tmp")
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
