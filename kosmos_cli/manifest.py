"""What a run leaves in its output location so the next run knows what is done: the run manifest.

`DIR/.kosmos/manifest.jsonl` (on object stores too) gets one record per finished document: which
input it came from (path, size, modification time, SHA-256 of its bytes), the task, the outputs
written and a fingerprint of every setting that changes them. The next run skips a document only
when every output it would write exists and was recorded from the same input, unchanged, with the
same fingerprint; it redoes the rest. An output that exists but was not recorded from that input
(another input's, or a file kosmos did not write) is never replaced without `--overwrite`.
Unfinished documents keep their finished pages in `DIR/.kosmos/progress/`, each log headed by the
same fingerprint and input identity, so a log from other settings or another input is discarded,
and their `--draw` pictures in `DIR/.kosmos/staging/`, moved into place when the document is
written, so a resumed document keeps every page's picture.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from kosmos_cli.discovery import STDIN_LABEL
from kosmos_cli.stores import RECORD_FOLDER, OutputStore, is_uri, public_location
from kosmos_cli.values import Document, InputIdentity, Task

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST_NAME = f"{RECORD_FOLDER}/manifest.jsonl"
PROGRESS_FOLDER = f"{RECORD_FOLDER}/progress"
STAGING_FOLDER = f"{RECORD_FOLDER}/staging"  # --draw pictures of unfinished documents, moved out at the end
HASH_CHUNK = 1 << 20  # bytes read at a time while hashing an input


def input_path(document: Document) -> str:
    """Return the key that names an input across runs: its absolute path, public URI or `<stdin>`."""
    if document.label == STDIN_LABEL:
        return STDIN_LABEL
    if is_uri(document.path):
        return public_location(document.path)
    return os.path.abspath(document.path if document.label is None else document.label)


def identify(document: Document, *, hashed: bool = True) -> InputIdentity:
    """Return an input's identity now; `hashed=False` leaves out the hash (a cheap first look)."""
    path = input_path(document)
    if is_uri(document.path):
        from kosmos_cli.stores import object_info

        size, mtime_ns = object_info(document.path)
        return InputIdentity(path, size, mtime_ns, None)
    status = os.stat(document.path)
    mtime = None if document.label is not None else status.st_mtime_ns
    digest = None
    if hashed:
        hasher = hashlib.sha256()
        with open(document.path, "rb") as stream:
            while chunk := stream.read(HASH_CHUNK):
                hasher.update(chunk)
        digest = hasher.hexdigest()
    return InputIdentity(path, status.st_size, mtime, digest)


def unchanged(recorded: InputIdentity, document: Document) -> bool:
    """Whether an input is still what was recorded (hashing it only when size and time agree)."""
    try:
        quick = identify(document, hashed=False)
        if (quick.path, quick.size, quick.mtime_ns) != (recorded.path, recorded.size, recorded.mtime_ns):
            return False
        return recorded.sha256 is None or identify(document).sha256 == recorded.sha256
    except OSError:
        return False


@dataclass(frozen=True)
class Record:
    """One finished document in the manifest."""

    input: InputIdentity
    name: str
    task: str
    fingerprint: str
    outputs: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest line's object."""
        return {
            "kosmos_manifest": MANIFEST_VERSION,
            "input": self.input.to_dict(),
            "name": self.name,
            "task": self.task,
            "fingerprint": self.fingerprint,
            "outputs": list(self.outputs),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        """Read a record back from `to_dict`'s object."""
        return cls(
            InputIdentity.from_dict(data["input"]),
            str(data["name"]),
            str(data["task"]),
            str(data["fingerprint"]),
            tuple(str(output) for output in data["outputs"]),
        )


class Manifest:
    """The records of earlier runs in an output location; the latest record of an output wins."""

    def __init__(self, store: OutputStore) -> None:
        self.store = store
        self.owners: dict[str, Record] = {}
        for line in store.read_log(MANIFEST_NAME):
            try:
                data = json.loads(line)
                if data.get("kosmos_manifest") != MANIFEST_VERSION:
                    continue
                record = Record.from_dict(data)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                continue  # a torn last line from a killed run: that document is redone
            for output in record.outputs:
                self.owners[output] = record

    def owner(self, output: str) -> Record | None:
        """Return the latest record that wrote an output, or None if no run of kosmos did."""
        return self.owners.get(output)

    def add(self, record: Record) -> None:
        """Append a finished document's record (ASCII JSON: any path survives the round trip)."""
        self.store.append_log(MANIFEST_NAME, json.dumps(record.to_dict(), ensure_ascii=True))
        for output in record.outputs:
            self.owners[output] = record


def fingerprint(settings: dict[str, Any]) -> str:
    """Return the hash of every setting that changes outputs (a JSON object of them)."""
    text = json.dumps(settings, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def progress_name(document: Document, task: Task) -> str:
    """Return the progress log's name of a document in a task: one file per output name, hashed."""
    return f"{PROGRESS_FOLDER}/{_key(document, task)}.jsonl"


def staging_folder(document: Document, task: Task) -> str:
    """Return where an unfinished document's drawings wait: they become outputs when it is written."""
    return f"{STAGING_FOLDER}/{_key(document, task)}"


def _key(document: Document, task: Task) -> str:
    # md and ocr runs into one folder keep their half-done documents apart (ocr's key is as it was).
    name = document.name if task is Task.OCR else f"{document.name}\0{task.value}"
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:32]
