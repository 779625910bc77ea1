"""What `--attention` costs: the same pages decoded with it and without, side by side on one loaded model.

Reports, per variant, the prefill time per page, the decode step time, and the whole run (maps
composed into blocks and regions included), as the median of the repeats; then the overhead ratios.
The variants alternate (off, on, off, on, ...) so that a noisy machine weighs on both alike.

    python benchmarks/attention_maps.py                 # the random full-size model, CPU
    python benchmarks/attention_maps.py --model microsoft/kosmos-2.5 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import random_model, synchronize

from kosmos_cli.config import Settings
from kosmos_cli.model.loading import load_runner
from kosmos_cli.transcribe import transcribe_pages
from kosmos_cli.values import Document, Page, PageInfo, Task


def page_image(index: int) -> Any:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (850, 1100), "white")
    draw = ImageDraw.Draw(image)
    for line in range(30):
        draw.text((60, 60 + 32 * line), f"Line {line} of page {index}: the quick brown fox", fill="black")
    return image


def run(runner: Any, task: Task, pages: int, attention: bool) -> dict[str, float]:
    runner.settings = replace(runner.settings, attention=attention)
    decoder = runner.decoder
    prefill, step = type(decoder).prefill, type(decoder).decode_step
    prefills: list[float] = []
    steps: list[float] = []

    def timed_prefill(cache: Any, rows: Any) -> Any:
        started = time.perf_counter()
        result = prefill(decoder, cache, rows)
        synchronize(runner.device)
        prefills.append((time.perf_counter() - started) / len(rows))
        return result

    def timed_step(batch: Any) -> Any:
        started = time.perf_counter()
        result = step(decoder, batch)
        synchronize(runner.device)
        steps.append(time.perf_counter() - started)
        return result

    decoder.prefill, decoder.decode_step = timed_prefill, timed_step
    document = Document("bench.png", "bench")
    items = []
    for index in range(pages):
        image = page_image(index)
        items.append((Page(PageInfo(document, index, pages, *image.size), image), index))
    started = time.perf_counter()
    results = list(transcribe_pages(items, runner, task=task))
    total = time.perf_counter() - started
    del decoder.prefill, decoder.decode_step
    assert all((result.attention is not None) == attention for _, _, result in results)
    return {"prefill": statistics.median(prefills), "step": statistics.median(steps), "total": total}


def main() -> None:
    described = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=described)
    parser.add_argument("--model", help="checkpoint folder or hub id (default: a random full-size model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--task", default="md", choices=["md", "ocr"])
    parser.add_argument("--pages", type=int, default=2, help="pages per run, all in one batch")
    parser.add_argument("--tokens", type=int, default=24, help="tokens generated per page")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant")
    args = parser.parse_args()
    settings = Settings(
        model=args.model or str(random_model()), device=args.device, dtype=args.dtype,
        max_new_tokens=args.tokens, batch_size=args.pages, ignore_eos=True,
    )  # fmt: skip
    runner = load_runner(settings)
    print(f"# {platform.processor() or platform.machine()}, device {runner.device}, {runner.dtype}")
    print(f"# {args.pages} pages x {args.tokens} tokens, {args.task}, {args.repeats} repeats per variant")
    figures: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(args.repeats):
        for attention in (False, True):
            figures[attention].append(run(runner, Task(args.task), args.pages, attention))
    medians = {
        flag: {key: statistics.median(one[key] for one in runs) for key in runs[0]}
        for flag, runs in figures.items()
    }
    for key, unit in (("prefill", "s/page"), ("step", "s/step"), ("total", "s/run")):
        off, on = medians[False][key], medians[True][key]
        print(f"{key:8} off {off:9.4f} {unit}   on {on:9.4f} {unit}   on/off {on / off:6.3f}")


if __name__ == "__main__":
    main()
