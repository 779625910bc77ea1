"""Kosmos-2.5 throughput: the model card's one-image loop against kosmos's own pipeline, side by side.

    python benchmarks/throughput.py [--quick] [--pages N] [--tokens N] [--batch-size N] ...

In one process, on the same pages of one PDF and the same checkpoint, it runs

  (a) baseline: the loop of the Hugging Face model card (`microsoft/kosmos-2.5`, md.py / ocr.py): for
      each page, render it, `processor(text=prompt, images=image)`, `model.generate`, `batch_decode`,
      post-process (the card's bbox regex for ocr, its `<br>`/blank-line cleanup for md);
  (b) kosmos: `kosmos md|ocr PDF -o DIR` as `kosmos_cli.cli` runs it (sources -> jobs -> pipeline ->
      runner -> writers), PDF rasterization and output files included;

and prints pages/s, generated tokens/s, time to first page, peak RAM and peak GPU memory for each,
ending with `ratio: N.NNx` (kosmos pages/s over baseline pages/s). Model loading is timed apart.

Without `--model` it uses a random-weights model of the real architecture and size (1.37B
parameters), written once to a cache folder. Random weights never stop on their own and may loop,
so both sides generate exactly `--tokens` new tokens per page: EOS is suppressed (`min_new_tokens`
in the baseline, `Settings.ignore_eos` in kosmos) and kosmos's loop detector is off. With a real
`--model` the same rule applies unless `--natural` lets both stop at EOS (then output lengths differ
and are reported).

When kosmos runs in bf16 (its CPU default where the CPU has native bf16), the run also reports
how far its next-token logits drift from the fp32 model's, teacher-forced on the baseline's outputs
of the first pages. `--also-int8` also runs kosmos in float32 and with `--quantize int8` (CPU),
reports int8's drift the same way, and how many pages bf16 and int8 transcribed token for token as
float32 did. `--baseline-dtype` runs the baseline in another dtype (its faster
one, say) than kosmos's `--dtype`.
`--decode-sweep 1,2,4` times decode steps alone at those batch sizes (one shared prefill).
Results and how they were produced are recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kosmos_cli.errors import KosmosError  # noqa: E402
from kosmos_cli.tiling import MODEL_PIXELS  # noqa: E402
from kosmos_cli.values import PageResult, Task  # noqa: E402
from kosmos_cli.vocabulary import PROMPT_LENGTH  # noqa: E402

RANDOM_MODEL_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kosmos" / "benchmarks"
QUICK = {"pages": 4, "tokens": 16}
DRIFT_PAGES = 2  # pages the logit drift is measured on (a teacher-forced forward per page and model)
DEFAULTS = {"pages": 8, "tokens": 300}
CARD_BBOX = re.compile(r"<bbox><x_\d+><y_\d+><x_\d+><y_\d+></bbox>")  # model card ocr.py
_TEXT = (
    "kosmos reads scanned pages and photos and writes markdown or text lines with their boxes "
    "the quick brown fox jumps over the lazy dog while invoices receipts and forms pile up"
)
WORDS = tuple(_TEXT.split())


@dataclass
class Side:
    """What one side of the comparison did."""

    name: str
    pages: int = 0
    tokens: list[int] = field(default_factory=list)
    load_s: float = 0.0
    run_s: float = 0.0
    first_page_s: float | None = None
    peak_rss: int = 0  # while transcribing, after the model is loaded
    load_peak_rss: int = 0  # while loading (and converting) the model
    peak_gpu: int | None = None
    texts: dict[int, str] = field(default_factory=dict)  # kosmos: each page's raw model output

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.run_s if self.run_s else 0.0

    def report(self) -> str:
        tokens = sum(self.tokens)
        lengths = f"{min(self.tokens)}-{max(self.tokens)}" if self.tokens else "-"
        first = f"{self.first_page_s:.1f} s" if self.first_page_s is not None else "-"
        gpu = f"{self.peak_gpu / 2**30:.2f} GiB" if self.peak_gpu is not None else "n/a"
        tokens_per_s = tokens / self.run_s if self.run_s else 0.0
        return (
            f"{self.name}: {self.pages} pages in {self.run_s:.1f} s (model load {self.load_s:.1f} s): "
            f"{self.pages_per_s:.4f} pages/s, {tokens_per_s:.2f} generated tokens/s, "
            f"first page after {first}, peak RAM {self.peak_rss / 2**30:.2f} GiB "
            f"(loading: {self.load_peak_rss / 2**30:.2f} GiB), peak GPU {gpu}, "
            f"tokens per page {lengths} ({tokens} in all)"
        )


class PeakMemory:
    """Sample this process's RSS in a thread (and read torch's GPU peak) between start() and stop()."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        import torch

        self.peak = self.process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def loaded(self, side: Side) -> None:
        """Note the peak while loading, and measure the transcription's own peak from here."""
        side.load_peak_rss = max(self.peak, self.process.memory_info().rss)
        self.peak = self.process.memory_info().rss

    def stop(self, side: Side) -> None:
        import torch

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        side.peak_rss = max(self.peak, self.process.memory_info().rss)
        if self.device.startswith("cuda"):
            side.peak_gpu = torch.cuda.max_memory_allocated()


# --- inputs -----------------------------------------------------------------------------------------


def make_pdf(path: Path, pages: int) -> Path:
    """Write a Letter-size PDF of text pages (headings, paragraphs, a table), different on every page."""
    import random

    import pymupdf

    rng = random.Random(0)
    document = pymupdf.open()
    for number in range(pages):
        page = document.new_page(width=612, height=792)
        y = 72.0
        page.insert_text((72, y), f"Report {number + 1}: {' '.join(rng.sample(WORDS, 4))}", fontsize=18)
        y += 36
        for _ in range(5):
            for _ in range(6):
                page.insert_text((72, y), " ".join(rng.choices(WORDS, k=11)), fontsize=10.5)
                y += 14
            y += 10
        for _ in range(8):
            cells = [
                f"{rng.choice(WORDS)}",
                f"{rng.randrange(1000)}.{rng.randrange(100):02d}",
                rng.choice(WORDS),
            ]
            for column, cell in enumerate(cells):
                page.insert_text((72 + 160 * column, y), cell, fontsize=10)
            y += 14
    document.save(path)
    return path


def render(page: Any) -> Any:
    """Render a PDF page as kosmos does by default: at the DPI that fills the model's 4096 patches."""
    import pymupdf
    from PIL import Image

    dpi = math.ceil(72 * math.sqrt(MODEL_PIXELS / (page.rect.width * page.rect.height)) * 100 - 1e-6) / 100
    pixmap = page.get_pixmap(matrix=pymupdf.Matrix(dpi / 72, dpi / 72), alpha=False)
    return Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)


def random_model() -> Path:
    """Return the random full-size checkpoint, writing it once (5.5 GB, about a minute)."""
    from kosmos_cli.testing import save_random_checkpoint

    folder = RANDOM_MODEL_DIR / "random-full-seed0"
    if not (folder / "config.json").is_file():
        print(f"writing a random full-size Kosmos-2.5 to {folder} (once)", file=sys.stderr)
        save_random_checkpoint(folder, size="full", seed=0)
    return folder


# --- (a) the model card's loop ----------------------------------------------------------------------


def run_baseline(args: argparse.Namespace, pdf: Path, memory: PeakMemory) -> tuple[Side, list[list[int]]]:
    """The model card's loop, one page at a time; returns the side and each page's generated ids."""
    import pymupdf
    import torch
    from transformers import AutoProcessor, Kosmos2_5ForConditionalGeneration

    dtype = torch_dtype(args, args.baseline_dtype)
    side = Side(f"baseline (model card loop, {str(dtype).removeprefix('torch.')})")
    memory.start()
    started = time.perf_counter()
    model = Kosmos2_5ForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    side.load_s = time.perf_counter() - started
    memory.loaded(side)
    prompt = "<md>" if args.task == "md" else "<ocr>"
    outputs: list[list[int]] = []
    started = time.perf_counter()
    with pymupdf.open(pdf) as document:
        for page in list(document)[: args.baseline_pages or None]:
            image = render(page)
            inputs = processor(text=prompt, images=image, return_tensors="pt")
            height, width = inputs.pop("height"), inputs.pop("width")
            raw_width, raw_height = image.size
            scale_height, scale_width = raw_height / height, raw_width / width
            inputs = {k: v.to(args.device) if v is not None else None for k, v in inputs.items()}
            inputs["flattened_patches"] = inputs["flattened_patches"].to(dtype)
            limits = {"max_new_tokens": args.tokens}
            if not args.natural:
                limits["min_new_tokens"] = args.tokens  # random weights: EOS suppressed, exact length
            with torch.inference_mode():
                generated_ids = model.generate(**inputs, **limits)
            new_ids = generated_ids[0, inputs["input_ids"].shape[1] :].tolist()
            outputs.append(new_ids)
            generated_text = processor.batch_decode(generated_ids, skip_special_tokens=True)[0]
            card_post_process(generated_text, prompt, scale_width, scale_height)
            side.pages += 1
            side.tokens.append(len([t for t in new_ids if t != model.generation_config.eos_token_id]))
            if side.first_page_s is None:
                side.first_page_s = time.perf_counter() - started
    side.run_s = time.perf_counter() - started
    memory.stop(side)
    del model
    release_memory()
    return side, outputs


def card_post_process(text: str, prompt: str, scale_width: Any, scale_height: Any) -> str:
    """The model card's post-processing (md.py / ocr.py), kept so the baseline does all its work."""
    y = text.replace(prompt, "")
    if prompt == "<md>":
        return "\n".join(line.strip() for line in y.replace("<br>", "\n").splitlines()).strip()
    lines = []
    bboxs_raw = CARD_BBOX.findall(y)
    texts = CARD_BBOX.split(y)[1:]
    bboxs = [re.findall(r"\d+", i) for i in bboxs_raw]
    bboxs = [[int(j) for j in i] for i in bboxs]
    for box, line in zip(bboxs, texts, strict=False):
        x0, y0, x1, y1 = box
        if not (x0 >= x1 or y0 >= y1):
            x0, y0 = int(x0 * scale_width), int(y0 * scale_height)
            x1, y1 = int(x1 * scale_width), int(y1 * scale_height)
            lines.append(f"{x0},{y0},{x1},{y0},{x1},{y1},{x0},{y1},{line}")
    return "\n".join(lines)


# --- (b) kosmos, as the CLI runs it -----------------------------------------------------------------


class _Reporter:
    """The CLI's reporter without a screen: counts pages and their tokens, notes the first page."""

    def __init__(self, side: Side, started: float) -> None:
        self.side = side
        self.started = started

    def loading(self, message: str) -> None:
        pass

    def add_total(self, pages: int) -> None:
        pass

    def page_done(self, result: PageResult) -> None:
        self.side.pages += 1
        self.side.tokens.append(result.token_count)
        self.side.texts[result.info.page_index] = result.raw
        if self.side.first_page_s is None:
            self.side.first_page_s = time.perf_counter() - self.started

    def error(self, error: KosmosError) -> None:
        print(f"error: {error.message}", file=sys.stderr)

    def warning(self, message: str) -> None:
        if "truncated" not in message and "max-new-tokens" not in message:  # every page is, by design
            print(f"warning: {message}", file=sys.stderr)


def run_kosmos(
    args: argparse.Namespace,
    pdf: Path,
    memory: PeakMemory,
    *,
    quantize: str | None = None,
    dtype: str | None = None,
) -> tuple[Side, Any]:
    """`kosmos md|ocr PDF -o DIR` through the call cli.py makes (the model loaded first, to time it apart)."""
    from kosmos_cli.api import transcribe_files
    from kosmos_cli.config import Settings
    from kosmos_cli.model.loading import load_runner

    side = Side("kosmos" + (f" --quantize {quantize}" if quantize else ""))
    memory.start()
    started = time.perf_counter()
    settings = Settings(
        model=str(args.model),
        device=args.device,
        dtype=dtype or args.dtype,
        batch_size=args.batch_size,
        max_new_tokens=args.tokens,
        compile=args.compile,
        cuda_graph=args.cuda_graph,
        kv_dtype=args.kv_dtype,
        quantize=quantize,
        ignore_eos=not args.natural,
        detect_loops=args.natural,
    )
    runner = load_runner(settings)
    side.load_s = time.perf_counter() - started
    memory.loaded(side)
    task = Task(args.task)
    with tempfile.TemporaryDirectory(prefix="kosmos-bench-out-") as out:
        started = time.perf_counter()
        summary = transcribe_files(
            [str(pdf)],
            task=task,
            output=out,
            settings=settings,
            runner=runner,
            reporter=_Reporter(side, started),
        )
        side.run_s = time.perf_counter() - started
        written = sorted(p.name for p in Path(out).iterdir())
    if summary.failed or not written:
        raise SystemExit(f"kosmos run failed: {summary}")
    side.name += f" ({str(runner.dtype).removeprefix('torch.')}, batch {runner.batch_size})"
    memory.stop(side)
    return side, runner


# --- int8 drift and the decode sweep ----------------------------------------------------------------


def logit_drift(
    reference: Any, other: Any, pdf: Path, outputs: list[list[int]], task: str, label: str
) -> str:
    """Compare next-token logits of two runners, teacher-forced on the baseline's generated ids."""
    import pymupdf
    import torch

    from kosmos_cli.model import Request

    worst, mean_abs, spread, agree, total = 0.0, 0.0, 0.0, 0, 0
    with pymupdf.open(pdf) as document:
        for page, ids in zip(document, outputs[:DRIFT_PAGES], strict=False):
            image = render(page)
            logits = []
            for runner in (reference, other):
                inputs = dict(runner.encode(Request(0, image, Task(task))).inputs)
                prompt = inputs["input_ids"].shape[1]
                inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids[:-1]])], dim=1)
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                mask = inputs["image_embeds_position_mask"]
                inputs["image_embeds_position_mask"] = torch.cat(
                    [mask, mask.new_zeros(1, inputs["input_ids"].shape[1] - prompt)], dim=1
                )
                with torch.inference_mode():
                    logits.append(runner.model(**inputs, logits_to_keep=len(ids)).logits[0].float())
            difference = (logits[0] - logits[1]).abs()
            worst = max(worst, float(difference.max()))
            mean_abs += float(difference.mean()) * len(ids)
            spread += float(logits[0].std(dim=-1).mean()) * len(ids)
            agree += int((logits[0].argmax(-1) == logits[1].argmax(-1)).sum())
            total += len(ids)
    return (
        f"{label} vs float32 next-token logits over {total} positions: max |diff| {worst:.3f}, "
        f"mean |diff| {mean_abs / total:.4f} (logit std {spread / total:.3f}), "
        f"same argmax at {100 * agree / total:.1f}% of positions"
    )


def fp32_runner(args: argparse.Namespace) -> Any:
    """Load kosmos's fp32 runner, the reference for the bf16 and int8 drift."""
    from kosmos_cli.config import Settings
    from kosmos_cli.model.loading import load_runner

    return load_runner(Settings(model=str(args.model), device=args.device, dtype="float32"))


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so each side's peak RAM is its own."""
    import contextlib
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed memory may stay in RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def decode_sweep(args: argparse.Namespace, batch_sizes: list[int], steps: int = 8) -> None:
    """Time decode steps alone at several batch sizes, against the memory-bandwidth bound.

    Every row holds the same prefilled page (2052 prompt tokens) in its own slot. A decode step must
    read the text model's weights once and each row's KV cache; the bound is those bytes over the
    copy bandwidth measured here (or `--bandwidth`). `max` is the batch kosmos picks for a run at the
    default budget (4,000 new tokens a page), though the sweep's slots hold only its few steps. After
    `--dtype`'s own loop: with `--cuda-graph`, the same with the step captured as a CUDA graph; with
    `--kv-dtype float8` (or another), with that cache; with `--also-int8`, with `--quantize int8` (CPU).
    """
    import pymupdf

    from kosmos_cli.config import Settings
    from kosmos_cli.model import Request
    from kosmos_cli.model.loading import load_runner

    with pymupdf.open(make_pdf(Path(tempfile.mkdtemp()) / "one.pdf", 1)) as document:
        image = render(document[0])
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else copy_bandwidth(args.device)
    print(f"memory bandwidth: {bandwidth / 1e9:.0f} GB/s ({'given' if args.bandwidth else 'measured copy'})")
    eager = {"dtype": args.dtype}
    variants = [eager]
    if args.cuda_graph:
        variants.append({**eager, "cuda_graph": True})
    if args.kv_dtype != "auto":
        variants.append({**eager, "kv_dtype": args.kv_dtype})
    if args.also_int8:
        variants.append({"dtype": "float32", "quantize": "int8"})
    for variant in variants:
        settings = Settings(model=str(args.model), device=args.device, max_new_tokens=steps + 2, **variant)
        print("-- " + ", ".join(f"{name} {value}" for name, value in variant.items()), flush=True)
        runner = load_runner(settings)
        sweep(args, runner, Request(0, image, Task(args.task)), batch_sizes, bandwidth, steps)
        del runner
        gc.collect()
        release_device_memory(args.device)


def sweep(
    args: argparse.Namespace, runner: Any, request: Any, batch_sizes: list[int], bandwidth: float, steps: int
) -> None:
    """Time one runner's decode steps at each batch size, every row holding `request`'s page."""
    from kosmos_cli.config import DEFAULT_MAX_NEW_TOKENS
    from kosmos_cli.model.continuous import Batch
    from kosmos_cli.model.sizing import default_batch_size, kv_bytes_per_token

    encoded = runner.encode(request)
    weight_bytes = decode_weight_bytes(runner.model.text_model)
    token_bytes = kv_bytes_per_token(runner.model, runner.kv_dtype)
    picked = default_batch_size(args.device, token_bytes * (runner.prompt_length + DEFAULT_MAX_NEW_TOKENS))
    decoder = runner.decoder
    for batch_size in (size or picked for size in batch_sizes):  # 0: what kosmos picks at its default budget
        cache, batch_size = decoder.new_cache(batch_size)
        step = decoder.capture_step(cache)  # --cuda-graph: made while every slot is free
        rows = [decoder.new_row(request, encoded, cache.take()) for _ in range(batch_size)]
        started = time.perf_counter()
        first, _, _ = decoder.prefill(cache, rows[:1])
        synchronize(args.device)
        prefill = time.perf_counter() - started
        fill_slots_like_the_first(cache, batch_size, rows[0].cached)
        for row in rows:  # as if each had chosen its first token (the captured step feeds the last one)
            row.ids.append(int(first[0]))
        batch = Batch(rows, cache, first.repeat(batch_size), step)
        decoder.decode_step(batch)  # warm-up
        synchronize(args.device)
        started = time.perf_counter()
        for _ in range(steps):
            decoder.decode_step(batch)
        synchronize(args.device)
        step = (time.perf_counter() - started) / steps
        context = rows[0].cached - steps // 2  # the mean context over the timed steps
        bound = (weight_bytes + batch_size * context * token_bytes) / bandwidth
        print(
            f"decode batch {batch_size}: {step:.4f} s/step, {batch_size / step:.2f} tokens/s; "
            f"bandwidth bound {bound:.4f} s/step ({step / bound:.2f}x the bound); "
            f"prefill of a joining page {prefill:.3f} s (a join copies nothing else)"
        )
        del batch, cache, rows, step
        gc.collect()
        release_device_memory(args.device)


def kv_waste(args: argparse.Namespace, shortest: int, longest: int) -> None:
    """Count the KV-cache columns kosmos's decode attention reads against the minimum, over a length mix.

    Six times the batch size of pages get budgets drawn from `shortest`..`longest` tokens and run to
    them (EOS suppressed), through the real loop: pages join and leave the running batch as on a real
    run. The columns read are counted where the decode attention's kernels are called (what each
    multiplies); the minimum is each row's own tokens, counted from the rows. All pages share
    one prompt length P, so the excess does not depend on P: the ratio is given for this model's
    prompt and for the full-size model's 2,052-token prompt. The run's timing is reported too: the
    time to the first finished page and each decode step's time, with pages joining (their prefills
    are stalls of the running rows).
    """
    import random
    import statistics

    import pymupdf

    from kosmos_cli.config import Settings
    from kosmos_cli.model import Request, slots
    from kosmos_cli.model.loading import load_runner

    runner = load_runner(
        Settings(
            model=str(args.model), device=args.device, dtype=args.dtype, batch_size=args.batch_size,
            max_new_tokens=longest, ignore_eos=True, detect_loops=False,
        )
    )  # fmt: skip
    pages = 6 * runner.batch_size  # enough for pages to keep joining a full batch, as on a long run
    rng = random.Random(0)
    budgets = [rng.randint(shortest, longest) for _ in range(pages)]
    decoder = runner.decoder
    new_row, decode_step, prefill = decoder.new_row, decoder.decode_step, decoder.prefill
    layers = runner.model.config.text_config.layers
    prompt = 0
    counts = {"rows": 0, "generated": 0, "minimum": 0, "read": 0}
    step_times: list[float] = []
    prefill_times: list[float] = []
    row_kernel, triton_kernel = slots._row_attention, slots._triton_attention

    def row_with_its_budget(request: Any, encoded: Any, slot: int) -> Any:
        nonlocal prompt
        row = new_row(request, encoded, slot)
        row.budget, prompt = budgets[request.key], row.cached
        return row

    def counting_row_kernel(query: Any, keys: Any, values: Any, lengths: Any, *rest: Any) -> Any:
        counts["read"] += sum(buffer.shape[1] for buffer in keys)  # it multiplies whole buffers
        return row_kernel(query, keys, values, lengths, *rest)

    def counting_triton_kernel(
        query: Any, keys: Any, values: Any, slots: Any, lengths: Any, scaling: Any
    ) -> Any:
        counts["read"] += int(lengths.sum())  # it reads each row up to its length (tests/test_slots.py)
        return triton_kernel(query, keys, values, slots, lengths, scaling)

    def counting_step(batch: Any) -> Any:
        for row in batch.rows:
            counts["rows"] += 1
            counts["generated"] += row.cached - prompt
            counts["minimum"] += layers * (row.cached + 1)  # its own tokens and the one it writes
        started = time.perf_counter()
        result = decode_step(batch)
        synchronize(args.device)
        step_times.append(time.perf_counter() - started)
        return result

    def timed_prefill(cache: Any, rows: Any) -> Any:
        started = time.perf_counter()
        result = prefill(cache, rows)
        synchronize(args.device)
        prefill_times.append(time.perf_counter() - started)
        return result

    decoder.new_row, decoder.decode_step, decoder.prefill = row_with_its_budget, counting_step, timed_prefill  # type: ignore[method-assign]
    slots._row_attention, slots._triton_attention = counting_row_kernel, counting_triton_kernel
    with pymupdf.open(make_pdf(Path(tempfile.mkdtemp()) / "mix.pdf", pages)) as document:
        requests = [Request(number, render(page), Task(args.task)) for number, page in enumerate(document)]
    started = time.perf_counter()
    first_page = None
    try:
        for _ in runner.generate(requests):
            first_page = first_page or time.perf_counter() - started
    finally:
        slots._row_attention, slots._triton_attention = row_kernel, triton_kernel
    print(
        f"kv waste: {pages} pages of {shortest}-{longest} tokens ({sum(budgets)} in all), batch "
        f"{runner.batch_size}, {time.perf_counter() - started:.1f} s"
    )
    excess = (counts["read"] - counts["minimum"]) / layers  # columns read past a row's own, per layer
    for label, length in (("this model's prompt", prompt), ("the full-size prompt", PROMPT_LENGTH)):
        minimum = counts["rows"] * (length + 1) + counts["generated"]
        print(
            f"kv waste with {label} ({length} tokens): read {(minimum + excess) / minimum:.3f}x "
            f"the minimum ({excess / counts['rows']:.0f} extra columns per row and step)"
        )
    ordered = sorted(step_times)
    p99 = ordered[int(0.99 * (len(ordered) - 1))]
    print(
        f"timing: first page done after {first_page:.2f} s; {len(step_times)} decode steps, median "
        f"{statistics.median(ordered) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms; "
        f"{len(prefill_times)} prefills of joining pages (stalls), median "
        f"{statistics.median(prefill_times) * 1e3:.1f} ms, longest {max(prefill_times) * 1e3:.1f} ms"
    )


def decode_weight_bytes(text_model: Any) -> int:
    """Bytes of weights one decode step reads: every linear layer of the text model, LM head included."""
    import torch

    total = 0
    for module in text_model.modules():
        packed = getattr(module, "packed_weight", None)  # kosmos's oneDNN linear on CPU
        if packed is not None:
            total += packed.numel() * packed.element_size()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def copy_bandwidth(device: str, size: int = 2**29) -> float:
    """Bytes per second moved by a large tensor copy (read + write) on `device`."""
    import torch

    source = torch.empty(size, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(5):
        target.copy_(source)
    synchronize(device)
    return 2 * size * 5 / (time.perf_counter() - started)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fill_slots_like_the_first(cache: Any, slots: int, length: int) -> None:
    """Copy slot 0's page into slots 1..slots-1 of a freshly prefilled cache."""
    from kosmos_cli.model.slots import GrowingSlots

    if isinstance(cache, GrowingSlots):
        for layer in (*cache.keys, *cache.values):
            layer[1:slots] = [layer[0].clone() for _ in range(1, slots)]
        cache.lengths[1:slots] = [length] * (slots - 1)
        return
    for layer in (*cache.keys, *cache.values):
        layer[1:slots, :, :length] = layer[0, :, :length]


def release_device_memory(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# --- main -------------------------------------------------------------------------------------------


def torch_dtype(args: argparse.Namespace, dtype: str | None = None) -> Any:
    from kosmos_cli.model.loading import resolve_dtype

    return resolve_dtype(dtype or args.dtype, args.device)


def machine(device: str) -> str:
    """Name the hardware the figures come from."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from kosmos_cli.model.sizing import available_cores

    return f"{name}, {available_cores()} cores available, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint folder or hub id (default: a random full-size model)")
    parser.add_argument("--pages", type=int, help=f"pages in the test PDF (default {DEFAULTS['pages']})")
    parser.add_argument("--tokens", type=int, help=f"new tokens per page (default {DEFAULTS['tokens']})")
    parser.add_argument("--batch-size", type=int, help="kosmos --batch-size (default: kosmos's own choice)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 (both sides)")
    parser.add_argument("--baseline-dtype", help="the baseline's dtype, if not --dtype (e.g. its faster one)")
    parser.add_argument("--task", choices=("md", "ocr"), default="md")
    parser.add_argument("--compile", action="store_true", help="kosmos --compile")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="kosmos --cuda-graph (with --decode-sweep: also the eager loop)",
    )
    parser.add_argument(
        "--kv-dtype", default="auto", help="kosmos --kv-dtype (with --decode-sweep: also the --dtype cache)"
    )
    parser.add_argument(
        "--also-int8", action="store_true", help="also run kosmos --quantize int8 and its drift"
    )
    parser.add_argument("--natural", action="store_true", help="stop at EOS on both sides (real weights)")
    parser.add_argument(
        "--decode-sweep", help="only time decode steps at these batch sizes, e.g. 1,8,max (max: kosmos's own)"
    )
    parser.add_argument(
        "--kv-waste",
        nargs="?",
        const="100,2000",
        metavar="SHORTEST,LONGEST",
        help="only run a mix of page lengths (default 100,2000 tokens): KV-cache reads against the minimum, "
        "time to the first page, step times with pages joining",
    )
    parser.add_argument("--bandwidth", type=float, help="memory bandwidth in GB/s for --decode-sweep's bound")
    parser.add_argument("--skip-baseline", action="store_true", help="only run kosmos (no ratio)")
    parser.add_argument(
        "--baseline-pages", type=int, help="the baseline reads only the first N pages (rates are compared)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK['pages']} pages x {QUICK['tokens']} tokens"
    )
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    args.pages = args.pages or preset["pages"]
    args.tokens = args.tokens or preset["tokens"]
    return args


def main(argv: list[str] | None = None) -> None:
    import logging

    from transformers.utils import logging as hf_logging

    from kosmos_cli.model.loading import resolve_device

    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("kosmos_cli").setLevel(logging.ERROR)
    args.device = resolve_device(args.device)
    args.model = args.model or str(random_model())
    print(f"machine: {machine(args.device)}; python {platform.python_version()}; {_versions()}")
    print(
        f"model: {args.model}; {args.pages} pages, {args.tokens} tokens per page, task {args.task}, "
        f"device {args.device}, dtype {torch_dtype(args)}"
    )
    if args.kv_waste:
        kv_waste(args, *(int(tokens) for tokens in args.kv_waste.split(",")))
        return
    if args.decode_sweep:
        decode_sweep(args, [0 if b == "max" else int(b) for b in args.decode_sweep.split(",")])
        return
    memory = PeakMemory(args.device)
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kosmos-bench-") as folder:
        pdf = make_pdf(Path(folder) / "pages.pdf", args.pages)
        baseline, outputs = None, []
        if not args.skip_baseline:
            baseline, outputs = run_baseline(args, pdf, memory)
            print(baseline.report(), flush=True)
            figures["baseline"] = vars(baseline)
        kosmos, runner = run_kosmos(args, pdf, memory)
        print(kosmos.report(), flush=True)
        figures["kosmos"] = vars(kosmos)
        if baseline is not None and str(runner.dtype) != "torch.float32":
            label = str(runner.dtype).removeprefix("torch.")
            figures["drift"] = logit_drift(fp32_runner(args), runner, pdf, outputs, args.task, label)
            print(figures["drift"], flush=True)
        del runner  # each side's peak RAM is its own
        release_memory()
        if args.also_int8:
            fp32, fp32_side_runner = run_kosmos(args, pdf, memory, dtype="float32")
            print(fp32.report(), flush=True)
            figures["kosmos_fp32"] = vars(fp32)
            del fp32_side_runner
            release_memory()
            quantized, int8_runner = run_kosmos(args, pdf, memory, quantize="int8")
            print(quantized.report(), flush=True)
            figures["kosmos_int8"] = vars(quantized)
            for side in (kosmos, quantized):
                same = sum(side.texts[page] == text for page, text in fp32.texts.items())
                print(f"{side.name}: {same} of {len(fp32.texts)} pages token-identical to float32")
                figures[f"{side.name} identical to float32"] = same
            if baseline is not None:
                print(f"ratio (int8): {quantized.pages_per_s / baseline.pages_per_s:.2f}x")
                drift = logit_drift(fp32_runner(args), int8_runner, pdf, outputs, args.task, "int8")
                print(drift)
                figures["int8_drift"] = drift
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    if baseline is not None:
        print(f"ratio: {kosmos.pages_per_s / baseline.pages_per_s:.2f}x")


def _versions() -> str:
    import torch
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}"


if __name__ == "__main__":
    main()
