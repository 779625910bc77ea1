"""One loaded model serving page images to other processes: the OCRmyPDF plugin's workers.

OCRmyPDF OCRs pages in parallel worker processes; a 1.37B model in each would exhaust memory. So the
plugin's main process starts one `ModelService`, a child process running this module, and the
workers send it page images over a Unix socket:

    worker --(image path)--> Listener thread --> Inbox --> transcribe_pages (continuous batching)
    worker <--(PageResult)-- connection thread <------------------------------ result

Each connection carries one page and its answer. Pages from all workers join one running batch as
they arrive (the Inbox is `model.Arrivals`), so `ocrmypdf -j N` decodes up to N pages together.
The socket sits in a private folder and every connection must prove the service's random key
(`multiprocessing.connection`'s HMAC handshake). The service loads the model as soon as it starts,
while OCRmyPDF is still rasterizing, and ends when its stdin closes: when its parent stops it or
exits, however it exits.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import pickle
import queue
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

import psutil

from kosmos_cli.config import Settings
from kosmos_cli.errors import InputError, KosmosError, ModelLoadError
from kosmos_cli.values import Document, Page, PageResult, Task

READY = b"listening\n"  # what the service prints once its socket takes connections
CRASH_HINT = "please report it with the traceback the service printed"
STOP_SECONDS = 30.0  # how long a service may take to end once told to, before it is killed
CLIENT_SECONDS = 10.0  # how long a client may take over each read or write of its handshake, request, answer
FOLDER_PREFIX = "kosmos-serve-"  # the private folder of a service's socket, in the temporary folder
OWNER_FILE = "owner"  # in that folder: the pids of the process that started the service and of the service


class Inbox:
    """Pages waiting for the model, with where each answer goes (`model.Arrivals`)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    def put(self, page: Page, answer: queue.Queue[PageResult | KosmosError]) -> None:
        self._queue.put((page, answer))

    def ready(self) -> bool:
        return not self._queue.empty()

    def __iter__(self) -> Inbox:
        return self

    def __next__(self) -> tuple[Page, queue.Queue[PageResult | KosmosError]]:
        return self._queue.get()


@dataclass
class ModelService:
    """A running service (`start`): where it listens, its key, and its process."""

    address: str
    authkey: bytes
    process: subprocess.Popen[bytes]
    folder: str

    @classmethod
    def start(cls, settings: Settings) -> ModelService:
        """Start a service for `settings` and return once it listens; the model loads in the background.

        Raises ModelLoadError if the service ends before it listens.
        """
        remove_stale_folders()
        folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX)  # private: mode 0700
        address = os.path.join(folder, "socket")
        authkey = secrets.token_bytes(32)
        process = subprocess.Popen(
            [sys.executable, "-m", "kosmos_cli.serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        Path(folder, OWNER_FILE).write_text(f"{os.getpid()} {process.pid}\n")
        assert process.stdin is not None and process.stdout is not None
        order = {"address": address, "authkey": authkey.hex(), "settings": dataclasses.asdict(settings)}
        process.stdin.write(json.dumps(order).encode() + b"\n")
        process.stdin.flush()
        if process.stdout.readline() != READY:
            process.wait()
            shutil.rmtree(folder, ignore_errors=True)
            raise ModelLoadError(
                f"the kosmos model service ended before it started (exit code {process.returncode})"
            )
        process.stdout.close()
        service = cls(address, authkey, process, folder)
        atexit.register(service.stop)
        return service

    def stop(self) -> None:
        """End the service (closing its stdin) and remove its socket's folder."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def remove_stale_folders() -> None:
    """Remove the socket folders of services whose starter and service processes are both gone.

    A service removes its own folder when its starter ends, however it ends; a service killed outright
    (SIGKILL) cannot, and its folder is removed here, when the next service starts.
    """
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        try:
            pids = [int(pid) for pid in (folder / OWNER_FILE).read_text().split()]
        except (OSError, ValueError):
            continue  # not one of ours, being made right now, or not ours to read
        if pids and not any(psutil.pid_exists(pid) for pid in pids):
            shutil.rmtree(folder, ignore_errors=True)


def transcribe_image(address: str, authkey: bytes, image: str) -> PageResult:
    """Ask the service at `address` to transcribe an image file (OCR); raises KosmosError if it cannot."""
    try:
        with Client(address, family="AF_UNIX", authkey=authkey) as connection:
            connection.send({"image": image})
            reply = connection.recv()
    except AuthenticationError:
        raise ModelLoadError("the kosmos model service refused this process: wrong key") from None
    except (OSError, EOFError) as error:
        raise ModelLoadError(f"the kosmos model service is gone: {error}") from None
    if "error" in reply:
        raise reply["error"]  # the KosmosError itself, of its own kind
    return PageResult.from_dict(reply["result"], _document(image))


def serve(address: str, authkey: bytes, settings: Settings) -> None:
    """Listen at `address`, load the model, and answer pages until stdin closes."""
    from kosmos_cli.model.loading import load_runner
    from kosmos_cli.transcribe import transcribe_pages

    inbox = Inbox()
    # No handshake in accept: the accepting thread never reads from a client, so a client that is slow,
    # silent or hostile costs only its own thread, which gives up after CLIENT_SECONDS a read.
    listener = Listener(address, family="AF_UNIX")
    threading.Thread(
        target=_accept, args=(listener, authkey, inbox), name="kosmos-accept", daemon=True
    ).start()
    folder = os.path.dirname(address)
    threading.Thread(target=_until_stdin_closes, args=(folder,), name="kosmos-stdin", daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: _end(folder, 128 + signal.SIGTERM))
    sys.stdout.buffer.write(READY)
    sys.stdout.buffer.flush()
    try:
        runner = load_runner(settings)
    except KosmosError as error:  # every page is answered with why
        for _, answer in inbox:
            answer.put(error)
        return
    for _, answer, result in transcribe_pages(inbox, runner, task=Task.OCR):
        answer.put(result)


def _accept(listener: Listener, authkey: bytes, inbox: Inbox) -> None:
    while True:
        try:
            connection = listener.accept()
        except OSError:  # the client went away while being accepted
            continue
        threading.Thread(target=_answer, args=(connection, authkey, inbox), daemon=True).start()


def _answer(connection: Connection, authkey: bytes, inbox: Inbox) -> None:
    """Check a client's key, read one page request, queue the page, and send back its result or why
    it has none. Every read and write has CLIENT_SECONDS: a client that stalls is dropped."""
    with connection:
        try:
            _limit_each_read_and_write(connection, CLIENT_SECONDS)
            deliver_challenge(connection, authkey)
            answer_challenge(connection, authkey)
            request = connection.recv()
        except (OSError, EOFError, AuthenticationError, pickle.UnpicklingError, ValueError):
            return  # gone, silent, slow, wrong key or garbage: this client only
        outcome: PageResult | KosmosError
        try:
            if not isinstance(request, dict) or not isinstance(request.get("image"), str):
                raise InputError("a malformed request: it names no image", hint="send {'image': PATH}")
            answer: queue.Queue[PageResult | KosmosError] = queue.Queue(maxsize=1)
            inbox.put(_read_image(request["image"]), answer)
            outcome = answer.get()
        except KosmosError as error:
            outcome = error
        except Exception as error:  # a bug: the worker hears of it, the traceback goes to stderr
            traceback.print_exc()
            outcome = KosmosError(f"kosmos crashed: {error!r}", hint=CRASH_HINT)
        try:
            if isinstance(outcome, KosmosError):
                connection.send({"error": outcome})
            else:
                connection.send({"result": outcome.to_dict()})
        except OSError:
            return


def _read_image(path: str) -> Page:
    """Read a page image OCRmyPDF wrote (in this connection's thread)."""
    from kosmos_cli.rasterize import iter_pages

    (first,) = list(iter_pages(_document(path)))
    if not isinstance(first, Page):
        raise first
    return first


def _limit_each_read_and_write(connection: Connection, seconds: float) -> None:
    """Make each read and write of `connection` fail (OSError) after `seconds` without progress."""
    timeout = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    with socket.socket(fileno=os.dup(connection.fileno())) as view:  # the same socket, through its own fd
        view.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        view.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)


def _until_stdin_closes(folder: str) -> None:
    sys.stdin.buffer.read()
    _end(folder, 0)  # the parent is done or gone: no page can still be wanted


def _end(folder: str, code: int) -> None:
    """End the service at once, removing its socket's folder (SIGTERM, or the parent gone)."""
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(code)


def _document(image: str) -> Document:
    return Document(image, os.path.basename(image))


def main() -> None:
    """Run a service as `ModelService.start` ordered it on stdin's first line."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its progress bars and load reports would mix into OCRmyPDF's
    hf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()
    order = json.loads(sys.stdin.buffer.readline())
    serve(order["address"], bytes.fromhex(order["authkey"]), Settings(**order["settings"]))


if __name__ == "__main__":
    main()
