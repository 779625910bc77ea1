"""Run in every worker of the tests' Ray instance (its `worker_process_setup_hook`): a lost worker on demand.

While the file `armed` exists in the folder `KOSMOS_TEST_RAY_CRASH_DIR` names, the first model actor
to finish its second page exits at once, as a killed process or a lost node looks to Ray, and
leaves the file `crashed` so that it happens once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CRASH_DIR_ENV = "KOSMOS_TEST_RAY_CRASH_DIR"
PAGES_BEFORE_CRASH = 2


def install() -> None:
    """Wrap `transcribe_pages` in this worker so that it can die between pages."""
    folder = os.environ.get(CRASH_DIR_ENV)
    if not folder:
        return
    from kosmos_cli import transcribe

    transcribe_pages = transcribe.transcribe_pages
    done = 0

    def crashing(*args: Any, **kwargs: Any) -> Iterator[Any]:
        nonlocal done
        for item in transcribe_pages(*args, **kwargs):
            done += 1
            armed, crashed = Path(folder, "armed"), Path(folder, "crashed")
            if done >= PAGES_BEFORE_CRASH and armed.exists() and not crashed.exists():
                crashed.touch()
                os._exit(1)
            yield item

    transcribe.transcribe_pages = crashing  # type: ignore[assignment]
