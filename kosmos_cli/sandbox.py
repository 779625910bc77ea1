"""Run calls that read untrusted files in a child process, with a time and a memory limit.

MuPDF can spin for ever on a hostile PDF (a page whose forms draw each other a billion times),
PIL can be made to allocate gigabytes, and either can crash outright. Such work runs in a
`Sandbox`: one long-lived child process that takes calls one at a time. A call that outlives its
time limit gets its child killed and raises `ReaderStopped`; so does a child that dies or runs
out of its memory limit. The next call starts a fresh child, so one bad file costs one error line
and the run goes on. The child ignores Ctrl-C: the parent decides when to stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from kosmos_cli.config import DEFAULT_PAGE_TIMEOUT
from kosmos_cli.errors import InputError

logger = logging.getLogger(__name__)

READER_MEMORY_LIMIT = 8 << 30  # bytes of address space a reader process may use (8 GiB)
START_TIMEOUT = 120.0  # seconds a new reader process may take to start (imports on a busy machine)

T = TypeVar("T")
_CHILD = "import sys; from kosmos_cli.sandbox import serve_fd; serve_fd(int(sys.argv[1]), int(sys.argv[2]))"


class ReaderStopped(InputError):
    """A sandboxed call ran out of time or memory, or its process died; the process was replaced."""


class ReaderTimedOut(ReaderStopped):
    """A sandboxed call ran out of time (`--page-timeout`); the process was replaced."""


class Sandbox:
    """A child process that runs one call at a time under a time limit; thread-safe."""

    def __init__(self, *, timeout: float = DEFAULT_PAGE_TIMEOUT, memory_limit: int = READER_MEMORY_LIMIT):
        self.timeout = timeout
        self.memory_limit = memory_limit
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None

    def call(self, function: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Return `function(*args)` run in the child; its KosmosErrors are raised here as they were."""
        limit = self.timeout if timeout is None else timeout
        with self._lock:
            try:
                kind, value = self._exchange(function, args, limit)
            except BaseException:
                # Whatever stopped the exchange (a timeout, a crash, Ctrl-C between sending a call and
                # reading its answer), the child's next message is no answer to the next call: stop it.
                self._stop()
                raise
        if kind == "ok":
            return value
        if kind == "error":
            raise value
        raise RuntimeError(f"a sandboxed {function.__name__} failed:\n{value}")

    def _exchange(
        self, function: Callable[..., object], args: tuple[Any, ...], limit: float
    ) -> tuple[str, Any]:
        connection = self._start()
        connection.send((function, args))
        if not connection.poll(limit):
            raise ReaderTimedOut(f"took longer than {limit:g} s", hint="raise --page-timeout if it is sound")
        try:
            kind, value = connection.recv()
        except (EOFError, OSError):
            code = self._stop()
            raise ReaderStopped(f"crashed the reader ({_describe_exit(code)})") from None
        return kind, value

    def release(self, function: Callable[[], object]) -> None:
        """Run a clean-up call in the child if it is running; never starts one, never raises for a gone one.

        A run that stops closes the sandbox while a reading generator may still be open in another
        thread; when that generator is collected, its clean-up finds the child gone, which is fine.
        """
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                return
        with contextlib.suppress(ReaderStopped):
            self.call(function)

    def close(self) -> None:
        """Stop the child process, at once, even while another thread waits on a call to it."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()  # the waiting call sees the connection close and raises ReaderStopped
        with self._lock:
            self._stop()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _start(self) -> Connection:
        if self._process is not None and self._process.poll() is None and self._connection is not None:
            return self._connection
        self._stop()
        # A fresh interpreter (not fork: it would copy the model and its threads; not multiprocessing's
        # spawn: it re-runs the caller's main script), talking over an inherited socket.
        parent_socket, child_socket = socket.socketpair()
        with child_socket:
            process = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(child_socket.fileno()), str(self.memory_limit)],
                pass_fds=[child_socket.fileno()],
                stdin=subprocess.DEVNULL,
            )
        parent = Connection(parent_socket.detach())
        self._process, self._connection = process, parent
        try:
            if not parent.poll(START_TIMEOUT):
                raise ReaderStopped(f"the reader process did not start within {START_TIMEOUT:g} s")
            parent.recv()  # "ready"
        except (EOFError, OSError):
            code = self._stop()
            raise ReaderStopped(f"the reader process did not start ({_describe_exit(code)})") from None
        return parent

    def _stop(self) -> int | None:
        process, connection = self._process, self._connection
        self._process = self._connection = None
        if connection is not None:
            connection.close()
        if process is None:
            return None
        if process.poll() is None:
            process.kill()
        return process.wait()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def serve_fd(descriptor: int, memory_limit: int) -> None:
    """Serve calls on an inherited socket: the reader process's whole life."""
    _serve(Connection(descriptor), memory_limit)


def _serve(connection: Connection, memory_limit: int) -> None:
    """The child's loop: take (function, args), send back ("ok", value), ("error", e) or ("bug", text)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_memory(memory_limit)
    with contextlib.suppress(OSError):  # the parent is gone already
        connection.send("ready")
    while True:
        try:
            function, args = connection.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            reply: tuple[str, object] = ("ok", function(*args))
        except InputError as error:
            reply = ("error", error)
        except MemoryError:
            limit = f"{memory_limit / (1 << 30):g} GiB"
            reply = ("error", ReaderStopped(f"needs more than the reader's {limit} of memory"))
        except Exception:  # a bug: its traceback goes to the parent, which raises it
            reply = ("bug", traceback.format_exc())
        try:
            connection.send(reply)
        except OSError:  # the parent is gone (killed mid-call): nobody to answer, nothing to print
            return


def _limit_memory(limit: int) -> None:
    try:
        import resource
    except ImportError:  # not on Windows
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    logger.debug("reader %d: address space limited to %d bytes", os.getpid(), limit)
