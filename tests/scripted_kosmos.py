"""`python tests/scripted_kosmos.py ARGS...`: the real `kosmos` command with the model swapped for ScriptedRunner.

For tests that must run kosmos as a process of its own (kills, signals) without loading a model:
each page takes `KOSMOS_TEST_SECONDS_PER_PAGE` seconds (default 0.1), so there is time to stop it.
"""

from __future__ import annotations

import atexit
import os
import signal
import time
from collections.abc import Iterable, Iterator

from kosmos_cli.cli import main
from kosmos_cli.errors import GenerationError
from kosmos_cli.model import Request, loading
from kosmos_cli.testing import ScriptedRunner
from kosmos_cli.values import Generation

SECONDS_PER_PAGE_ENV = "KOSMOS_TEST_SECONDS_PER_PAGE"
SIGINT_AT_EXIT_ENV = "KOSMOS_TEST_SIGINT_AT_EXIT"


class SlowRunner(ScriptedRunner):
    """ScriptedRunner taking a while over each page, as a model does."""

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        seconds = float(os.environ.get(SECONDS_PER_PAGE_ENV, "0.1"))
        for answer in super().generate(requests):
            time.sleep(seconds)
            yield answer


loading.load_runner = lambda settings: SlowRunner()  # type: ignore[assignment]

if __name__ == "__main__":
    if os.environ.get(SIGINT_AT_EXIT_ENV):  # a Ctrl-C that lands while the run's exit handlers run
        atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))
    main()
