"""What `kosmos serve` costs a page, and how many pages a second it gives 1, 4 and 16 clients at once.

Side by side on the same pages and model settings:

  (a) `kosmos ocr` as a library call, one page a call, the model and a reader process kept: the
      baseline per page;
  (b) the server, one client posting one page at a time (`POST /v1/transcribe`, txt back): the
      service's overhead per page is (b) - (a): HTTP, the upload, the job on disk, the JSON, the answer;
  (c) the server with each number of `--clients` at once, the pages dealt among them: pages/s;
  (d) `kosmos ocr` over every page in one call (one batch), for reference.

    python benchmarks/serving.py                        # the tiny random model, CPU
    python benchmarks/serving.py --size full --device cuda --pages 32 --tokens 256
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_maps import page_image
from throughput import random_model

from kosmos_cli.api import transcribe_files
from kosmos_cli.config import Settings
from kosmos_cli.model.loading import load_runner
from kosmos_cli.reporting import Summary
from kosmos_cli.sandbox import Sandbox
from kosmos_cli.testing import ServerProcess, save_random_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a checkpoint folder; default: a random one of --size")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--pages", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64, help="--max-new-tokens of both sides")
    parser.add_argument("--clients", default="1,4,16", help="numbers of clients at once, comma-separated")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


def model_arguments(args: argparse.Namespace) -> list[str]:
    return [
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "--max-new-tokens",
        str(args.tokens),
    ]


def library_side(args: argparse.Namespace, pages: list[Path]) -> tuple[float, float]:
    """(a) and (d): seconds a page, one page a call, and pages/s with every page in one call."""
    settings = Settings(model=args.model, dtype=args.dtype, device=args.device, max_new_tokens=args.tokens)
    runner = load_runner(settings)
    with Sandbox() as reader:  # one reader process for every call, as each of the server's job threads has

        def run(inputs: list[Path]) -> Summary:
            summary = transcribe_files(
                inputs, task="ocr", settings=settings, runner=runner, stdout=io.BytesIO(), reader=reader
            )
            assert summary.pages_done == len(inputs), summary
            return summary

        run(pages[:1])  # warm up
        started = time.perf_counter()
        for page in pages:
            run([page])
        one_by_one = (time.perf_counter() - started) / len(pages)
        started = time.perf_counter()
        run(pages)
        batched = len(pages) / (time.perf_counter() - started)
    return one_by_one, batched


def served_side(
    args: argparse.Namespace, pages: list[Path], clients: list[int], folder: Path
) -> dict[int, float]:
    """(b) and (c): pages/s of the server with each number of clients at once."""
    import httpx

    server = ServerProcess.start(
        [*model_arguments(args), "--jobs-dir", str(folder / "jobs")], folder / "server.log"
    )
    try:

        def post(client: httpx.Client, page: Path) -> None:
            with page.open("rb") as stream:
                answer = client.post(
                    "/v1/transcribe", files={"file": (page.name, stream)}, data={"task": "ocr"}
                )
            answer.raise_for_status()

        def client_run(share: list[Path]) -> None:
            with httpx.Client(base_url=server.url, timeout=600) as client:
                for page in share:
                    post(client, page)

        client_run(pages[:1])  # warm up
        rates = {}
        for count in clients:
            shares = [pages[start::count] for start in range(count)]
            started = time.perf_counter()
            with ThreadPoolExecutor(count) as pool:
                list(pool.map(client_run, shares))
            rates[count] = len(pages) / (time.perf_counter() - started)
            print(f"  {count:>2} clients: {rates[count]:.2f} pages/s", flush=True)
        return rates
    finally:
        server.stop()


def main() -> None:
    args = parse_args()
    logging.getLogger("kosmos_cli").setLevel(logging.ERROR)  # every page is truncated at --tokens
    clients = sorted({int(count) for count in args.clients.split(",")} | {1})
    with tempfile.TemporaryDirectory(prefix="kosmos-serving-") as temporary:
        folder = Path(temporary)
        if args.model is None:
            args.model = str(
                random_model() if args.size == "full" else save_random_checkpoint(folder / "tiny")
            )
        pages = []
        for index in range(args.pages):
            pages.append(folder / f"page{index:03}.png")
            page_image(index).save(pages[-1])
        machine = platform.processor() or platform.machine()
        print(f"{machine}, {args.pages} pages, {args.tokens} tokens at most, {args.model}")
        one_by_one, batched = library_side(args, pages)
        print(f"(a) kosmos ocr, a page a call: {one_by_one:.3f} s a page", flush=True)
        print(f"(d) kosmos ocr, every page in one call: {batched:.2f} pages/s", flush=True)
        rates = served_side(args, pages, clients, folder)
    served = 1 / rates[1]
    print(f"(b) kosmos serve, one client, a page a request: {served:.3f} s a page")
    print(f"overhead per page: {served - one_by_one:+.3f} s ({served / one_by_one:.2f}x the library call)")
    for count in clients:
        ratio = rates[count] / rates[1]
        print(f"(c) {count:>2} clients at once: {rates[count]:.2f} pages/s ({ratio:.2f}x one client)")
    if args.json is not None:
        figures: dict[str, Any] = {
            "library_seconds_a_page": one_by_one,
            "library_batch_pages_a_second": batched,
        }
        figures |= {"served_seconds_a_page": served, "pages_a_second_by_clients": rates}
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
