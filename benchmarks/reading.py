"""Time opening and rendering pages in the reader process against doing it in-process.

    python benchmarks/reading.py [FILES...]        (default: the files in examples/)

Prints seconds per page for each file both ways, and the reader process's start-up. The default
`--page-timeout` is chosen from these figures (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from kosmos_cli.rasterize import iter_pages
from kosmos_cli.sandbox import Sandbox
from kosmos_cli.values import Document

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROUNDS = 3  # each file is read this many times each way; the fastest round counts


def seconds_per_page(path: Path, sandbox: Sandbox | None) -> float:
    """Return the fastest of ROUNDS full reads of a document, per page."""
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        count = sum(1 for _ in iter_pages(Document(str(path), path.name), sandbox=sandbox))
        best = min(best, (time.perf_counter() - started) / max(count, 1))
    return best


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="*", type=Path)
    files = parser.parse_args().files or sorted(p for p in EXAMPLES.iterdir() if p.suffix in {".pdf", ".png"})
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    with Sandbox() as sandbox:
        started = time.perf_counter()
        list(iter_pages(Document(str(files[0]), files[0].name), sandbox=sandbox))
        print(f"reader start and first document: {time.perf_counter() - started:.3f} s")
        print(f"{'file':<24} {'in-process s/page':>18} {'reader s/page':>14}")
        for path in files:
            local = seconds_per_page(path, None)
            isolated = seconds_per_page(path, sandbox)
            print(f"{path.name:<24} {local:>18.3f} {isolated:>14.3f}")


if __name__ == "__main__":
    main()
