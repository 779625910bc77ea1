"""The reader process: an interrupted call never leaves an answer for the next one (issue 23).

Ctrl-C can land between sending a call to the reader and reading its answer, or between starting a
reader and reading its greeting; the unread message must not reach a later call. Once it did: a run
interrupted while a render was stuck exited 70 with `ValueError: too many values to unpack` (the
greeting read as an answer). The interrupt is injected where the parent waits, so it lands there
every time.
"""

from __future__ import annotations

import operator
import os
from multiprocessing.connection import Connection

import pytest

from kosmos_cli.sandbox import Sandbox


def interrupt_wait(monkeypatch: pytest.MonkeyPatch, *, at: int) -> None:
    """Make the `at`-th wait on a reader's connection (0: the first) raise KeyboardInterrupt."""
    poll = Connection.poll
    waits = []

    def interrupted(self: Connection, timeout: float | None = 0.0) -> bool:
        waits.append(timeout)
        if len(waits) - 1 == at:
            raise KeyboardInterrupt
        return poll(self, timeout)

    monkeypatch.setattr(Connection, "poll", interrupted)


def test_ctrl_c_while_a_reader_starts_leaves_no_greeting_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_wait(monkeypatch, at=0)  # the wait for a new reader's "ready"
    with Sandbox(timeout=30) as sandbox:
        with pytest.raises(KeyboardInterrupt):
            sandbox.call(os.getpid)
        sandbox.release(os.getpid)  # a reading generator's clean-up, as the run unwinds: no ValueError
        assert sandbox.call(operator.add, 2, 3) == 5


def test_ctrl_c_while_a_call_runs_leaves_no_answer_for_the_next_call(monkeypatch: pytest.MonkeyPatch) -> None:
    with Sandbox(timeout=30) as sandbox:
        first = sandbox.call(os.getpid)
        interrupt_wait(monkeypatch, at=0)  # the wait for this call's answer
        with pytest.raises(KeyboardInterrupt):
            sandbox.call(str.upper, "stale")
        assert sandbox.call(operator.add, 2, 3) == 5, "not the interrupted call's answer"
        assert sandbox.call(os.getpid) != first, "the interrupted reader was replaced"
