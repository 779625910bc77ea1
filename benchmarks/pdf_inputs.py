"""PDFs as they come: the text layer against the model, the OCRmyPDF plugin against `kosmos ocr -f pdf`.

    python benchmarks/pdf_inputs.py [--model PATH] [--tokens N] [--skip-ocrmypdf]

Every run is a real command in a process of its own, side by side in one run, its whole process tree's
memory sampled (`ps`-style RSS, summed over the tree, every 0.2 s):

1. `kosmos ocr --text-layer only` on a born-digital PDF: seconds per page from its own text, no model;
2. a mixed folder (that PDF and a one-page scan), end to end: `--text-layer auto` (the model reads the
   scan only) against `--text-layer ignore` (the model reads every page);
3. a two-page scan: `ocrmypdf --plugin kosmos_cli.ocrmypdf -j 2 --output-type pdf` against
   `kosmos ocr -f pdf`, the same model settings on both sides.

Without `--model` it uses the random full-size Kosmos-2.5 (`throughput.random_model`). Generation
stops at `--tokens` new tokens (or earlier at EOS or a cut loop): prefill dominates a page's time on
a CPU at small budgets, so the model's cost is a lower bound of a real page's.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pymupdf
from throughput import machine, make_pdf, random_model

from kosmos_cli.rasterize import iter_pages
from kosmos_cli.values import Document, Page


@dataclass
class Run:
    label: str
    seconds: float
    peak_tree_rss: int  # the most the whole process tree held at once
    peak_process_rss: int  # the most any one process of it held
    returncode: int


def measure(label: str, command: list[str]) -> Run:
    """Run a command, sampling its process tree's memory; fail loudly if it fails."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = [0, 0]
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(process.pid)
        while not done.wait(0.2):
            try:
                tree = [root, *root.children(recursive=True)]
                sizes = [member.memory_info().rss for member in tree]
            except psutil.Error:
                continue
            peaks[0] = max(peaks[0], sum(sizes))
            peaks[1] = max(peaks[1], max(sizes))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, stderr = process.communicate()
    done.set()
    thread.join()
    run = Run(label, time.perf_counter() - started, peaks[0], peaks[1], process.returncode)
    if process.returncode not in (0,):
        print(stderr, file=sys.stderr)
        raise SystemExit(f"{label}: exit code {process.returncode}")
    return run


def scan_pdf(source: Path, path: Path, pages: int, dpi: int = 150) -> Path:
    """Rasterize the first `pages` pages of `source` into an image-only PDF: a scan of them."""
    original = pymupdf.open(source)
    scan = pymupdf.open()
    for number in range(pages):
        pixmap = original[number].get_pixmap(dpi=dpi)
        page = scan.new_page(width=original[number].rect.width, height=original[number].rect.height)
        page.insert_image(page.rect, pixmap=pixmap)
    scan.save(path)
    return path


def kosmos(*args: str) -> list[str]:
    return [sys.executable, "-m", "kosmos_cli", "ocr", "--quiet", *args]


def gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def text_layer_runs(work: Path, digital: Path, pages: int, common: list[str]) -> None:
    """Parts 1 and 2: a born-digital PDF without the model; a mixed folder with and without its text."""
    started = time.perf_counter()
    read = [page for page in iter_pages(Document(str(digital), digital.name), text_layer=True)]
    per_page = (time.perf_counter() - started) / len(read)
    words = sum(
        len(line.words)
        for page in read
        if isinstance(page, Page) and page.text_layer is not None
        for line in page.text_layer.lines
    )
    only = measure(
        "only", kosmos(str(digital), "-f", "json", "-o", str(work / "o1"), "--text-layer", "only", *common)
    )
    print(f"\n1. born-digital PDF, {pages} pages ({words} words), --text-layer only (no model):")
    print(f"   rendering and reading the text layer in-process: {per_page * 1000:.0f} ms a page")
    print(
        f"   the command: {only.seconds:.1f} s in all, process start included "
        f"({only.seconds / pages:.2f} s a page), peak {gib(only.peak_tree_rss)}"
    )
    folder = str(work / "mixed")
    auto = measure("auto", kosmos(folder, "-o", str(work / "o2"), "--text-layer", "auto", *common))
    ignore = measure("ignore", kosmos(folder, "-o", str(work / "o3"), "--text-layer", "ignore", *common))
    print(f"\n2. mixed folder ({pages} born-digital pages + 1 scanned page), end to end:")
    for run in (auto, ignore):
        each = run.seconds / (pages + 1)
        peak = gib(run.peak_tree_rss)
        print(f"   --text-layer {run.label:<6} {run.seconds:7.1f} s ({each:.1f} s a page), peak {peak}")
    print(
        f"   auto takes {auto.seconds / ignore.seconds:.2f}x the time of ignore; each born-digital page "
        f"the model reads costs about {(ignore.seconds - auto.seconds) / pages:.1f} s more"
    )


def ocrmypdf_runs(work: Path, scan: Path, model: str, tokens: int, common: list[str]) -> None:
    """Part 3: the same two-page scan to a searchable PDF, through OCRmyPDF and through kosmos."""
    plugin = measure(
        "ocrmypdf plugin",
        [sys.executable, "-m", "ocrmypdf", "--plugin", "kosmos_cli.ocrmypdf", "-j", "2", "--force-ocr",
         "--output-type", "pdf", "--kosmos-model", model, "--kosmos-max-new-tokens", str(tokens),
         str(scan), str(work / "plugin.pdf")],
    )  # fmt: skip
    direct = measure("kosmos ocr -f pdf", kosmos(str(scan), "-f", "pdf", "-o", str(work / "o4"), *common))
    print("\n3. two-page scan to a searchable PDF:")
    for run in (direct, plugin):
        print(
            f"   {run.label:<18} {run.seconds:7.1f} s ({run.seconds / 2:6.1f} s a page), "
            f"peak {gib(run.peak_tree_rss)} in all, {gib(run.peak_process_rss)} in its largest process"
        )
    print(f"   plugin/direct time: {plugin.seconds / direct.seconds:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the random full-size one)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per page at most (default 32)")
    parser.add_argument("--digital-pages", type=int, default=4, help="pages of the born-digital PDF")
    parser.add_argument("--skip-ocrmypdf", action="store_true", help="leave out part 3")
    args = parser.parse_args()
    model = args.model or str(random_model())
    common = ["--model", model, "--max-new-tokens", str(args.tokens)]
    print(f"machine: {machine('cpu')}")
    with tempfile.TemporaryDirectory(prefix="kosmos-bench-") as folder:
        work = Path(folder)
        (work / "mixed").mkdir()
        digital = make_pdf(work / "mixed/digital.pdf", args.digital_pages)
        scan_pdf(digital, work / "mixed/scan.pdf", 1)
        text_layer_runs(work, digital, args.digital_pages, common)
        if not args.skip_ocrmypdf:
            ocrmypdf_runs(work, scan_pdf(digital, work / "two-page-scan.pdf", 2), model, args.tokens, common)


if __name__ == "__main__":
    main()
