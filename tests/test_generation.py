"""Every speed path of the runner gives the output of the plain one-page-at-a-time loop (tiny model)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw
from test_slots import NEEDS_TRITON

from kosmos_cli.config import DEFAULT_MAX_NEW_TOKENS, Settings
from kosmos_cli.errors import GenerationError, UsageError
from kosmos_cli.model import Request, continuous, encoding, graph, loading, patches
from kosmos_cli.model.continuous import ContinuousDecoder
from kosmos_cli.model.fixed import greedy_config
from kosmos_cli.model.loading import load_runner
from kosmos_cli.model.runner import KosmosRunner
from kosmos_cli.model.sizing import available_cores
from kosmos_cli.model.slots import GROW_COLUMNS, SLOT_ATTENTION, FixedSlots, SlotCache
from kosmos_cli.repetition import Loop, LoopKind, LoopRule
from kosmos_cli.values import Finish, Generation, Status, Task
from kosmos_cli.vocabulary import TASK_PROMPTS

BUDGET = 16  # new tokens per page: long enough for rows to leave and join mid-run, short enough to be quick
EOS = 2
SMALL_LOOP_RULE = LoopRule(max_period=8, min_span=12, min_repeats=3)  # catches a loop within the budget


def load(checkpoint: Path, **settings: object) -> KosmosRunner:
    # One thread: the tiny model's ops are too small to split, and a busy CI box makes two threads wait.
    # float32 unless a test asks: `auto` is bf16 on CPUs with native bf16, and exact comparisons need fp32.
    settings = {"device": "cpu", "dtype": "float32", "max_new_tokens": BUDGET, "threads": 1, **settings}
    return load_runner(Settings(model=str(checkpoint), **settings))  # type: ignore[arg-type]


def pages(count: int, *, seed: int = 0) -> list[Request]:
    """Pages of mixed sizes and aspect ratios (each one resized differently), alternating md and ocr."""
    rng = random.Random(seed)
    sizes = [(64, 48), (200, 300), (500, 120), (31, 400), (800, 600), (120, 120)]
    requests = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, x1 = sorted(rng.randrange(width) for _ in range(2))
            y0, y1 = sorted(rng.randrange(height) for _ in range(2))
            draw.rectangle([x0, y0, x1, y1], fill=tuple(rng.randrange(256) for _ in range(3)))
        requests.append(Request(index, image, Task.OCR if index % 2 else Task.MD))
    return requests


_references: dict[tuple[str, object], list[int]] = {}


def reference(
    runner: KosmosRunner, request: Request, *, variant: str = "", budget: int = BUDGET
) -> list[int]:
    """The model card's loop: this page alone through `model.generate`, greedy; new ids up to EOS.

    Pages from `pages()` with the same model `variant` give the same ids, so they are computed once.
    """
    if variant and (variant, request.key) in _references:
        return _references[variant, request.key]
    inputs = runner.processor(text=[TASK_PROMPTS[request.task]], images=[request.image], return_tensors="pt")
    inputs.pop("width"), inputs.pop("height")
    with torch.inference_mode():
        output = runner.model.generate(**inputs, generation_config=greedy_config(runner.model, budget))
    ids: list[int] = output[0, inputs["input_ids"].shape[1] :].tolist()
    ids = ids[: ids.index(EOS)] if EOS in ids else ids
    if variant:
        _references[variant, request.key] = ids
    return ids


def reference_probabilities(runner: KosmosRunner, request: Request) -> tuple[list[int], list[float]]:
    """This page alone through `model.generate`: its new ids up to EOS and each one's softmax probability."""
    inputs = runner.processor(text=[TASK_PROMPTS[request.task]], images=[request.image], return_tensors="pt")
    inputs.pop("width"), inputs.pop("height")
    with torch.inference_mode():
        output = runner.model.generate(
            **inputs,
            generation_config=greedy_config(runner.model, BUDGET),
            output_logits=True,
            return_dict_in_generate=True,
        )
    ids: list[int] = output.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    probs = [
        float(torch.softmax(step[0].float(), dim=-1)[token])
        for step, token in zip(output.logits, ids, strict=True)
    ]
    end = ids.index(EOS) if EOS in ids else len(ids)
    return ids[:end], probs[:end]


def tie_lm_head(runner: KosmosRunner, bias: torch.Tensor | None = None) -> None:
    """Put back a plain LM head on the embedding matrix (kosmos packs its own copy for oneDNN on CPU)."""
    embeddings = runner.model.text_model.model.embed_tokens.weight
    head = torch.nn.Linear(embeddings.shape[1], embeddings.shape[0], bias=bias is not None)
    head.weight = embeddings
    if bias is not None:
        head.bias = torch.nn.Parameter(bias)
    runner.model.text_model.lm_head = head


def set_eos_row(runner: KosmosRunner, row: torch.Tensor) -> None:
    """Change EOS's row of the tied embedding / LM head: EOS is never fed back, so only its logit moves."""
    with torch.no_grad():
        runner.model.text_model.model.embed_tokens.weight[EOS] = row
    tie_lm_head(runner)


EARLY = "ocr pages end early"


def end_ocr_pages_early(runner: KosmosRunner) -> None:
    """Make EOS win where a token only `<ocr>` pages produce would, so pages finish at different steps."""
    md_ids = reference(runner, pages(1)[0], variant="plain")
    ocr_ids = reference(runner, pages(2)[1], variant="plain")
    trigger = next(token for token in ocr_ids[1:] if token not in md_ids)
    set_eos_row(runner, runner.model.text_model.model.embed_tokens.weight[trigger] * 1.02)


def force_token(runner: KosmosRunner, token: int) -> None:
    """Give the LM head a bias that makes greedy decoding emit `token` forever: a scripted loop."""
    bias = torch.zeros(runner.model.text_model.model.embed_tokens.weight.shape[0])
    bias[token] = 1e4
    tie_lm_head(runner, bias)


def generate(runner: KosmosRunner, requests: list[Request]) -> dict[object, Generation]:
    results: dict[object, Generation] = {}
    for request, outcome in runner.generate(requests):
        assert not isinstance(outcome, GenerationError), outcome.message
        results[request.key] = outcome
    assert sorted(results) == sorted(r.key for r in requests)
    return results


def assert_matches_reference(
    runner: KosmosRunner, requests: list[Request], got: dict[object, Generation], *, variant: str
) -> None:
    for request in requests:
        ids = reference(runner, request, variant=variant)
        generation = got[request.key]
        assert generation.ids == tuple(ids), request.key
        assert generation.text == runner.processor.tokenizer.decode(ids, skip_special_tokens=True), (
            request.key
        )
        assert generation.finish is (Finish.LENGTH if len(ids) == BUDGET else Finish.EOS), request.key
        expected_size = runner.encode(request).resized_size
        assert generation.resized_size == expected_size


@pytest.fixture
def runner(tiny_checkpoint: Path) -> KosmosRunner:
    return load(tiny_checkpoint, batch_size=2)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_batched_output_is_identical_to_one_page_at_a_time(tiny_checkpoint: Path, batch_size: int) -> None:
    runner = load(tiny_checkpoint, batch_size=batch_size)
    end_ocr_pages_early(runner)
    requests = pages(6)
    got = generate(runner, requests)
    lengths = {g.token_count for g in got.values()}
    assert len(lengths) >= 2 and BUDGET in lengths, "pages should finish at different steps"
    assert_matches_reference(runner, requests, got, variant=EARLY)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_each_token_carries_the_probability_the_model_gave_it(tiny_checkpoint: Path, batch_size: int) -> None:
    runner = load(tiny_checkpoint, batch_size=batch_size)
    end_ocr_pages_early(runner)
    requests = pages(5)
    joined = generate(runner, requests)  # pages leaving and joining the running batch
    fixed = dict(
        zip((r.key for r in requests[:3]), runner.generate_batch(requests[:3]), strict=True)
    )  # --compile's
    bbox = runner.processor.tokenizer.convert_tokens_to_ids("<bbox>")
    for request in requests:
        ids, probs = reference_probabilities(runner, request)
        for got in [joined[request.key], *([fixed[request.key]] if request.key in fixed else [])]:
            assert got.ids == tuple(ids), request.key
            assert got.probs == pytest.approx(probs, rel=1e-4, abs=1e-6), request.key
            assert len(got.segments) == ids.count(bbox) + 1
            text_probs = [p for token, p in zip(ids, probs, strict=True) if token not in runner.box_ids]
            assert [p for segment in got.segments for p in segment] == pytest.approx(
                text_probs, rel=1e-4, abs=1e-6
            )


WORDS = [
    "invoice",
    "total",
    "amount",
    "date",
    "name",
    "address",
    "phone",
    "city",
    "receipt",
    "table",
    "figure",
    "chapter",
]


def text_page(number: int) -> Image.Image:
    """A white 400 x 300 page with six lines of black text; pages differ only in their words and indents."""
    image = Image.new("RGB", (400, 300), "white")
    draw = ImageDraw.Draw(image)
    for line in range(6):
        words = [WORDS[(3 * number + line + k) % len(WORDS)] for k in range(1 + (number + line) % 4)]
        draw.text((20 + 7 * ((number + line) % 5), 20 + 40 * line), " ".join(words), fill="black")
    return image


@pytest.mark.parametrize("task", [Task.MD, Task.OCR])
def test_eight_pages_give_eight_token_sequences(runner: KosmosRunner, task: Task) -> None:
    # The same size, the same white paper, only the words differ: the tiny model must still tell them
    # apart, or a batch that hands one page another page's image would go unseen.
    requests = [Request((task, number), text_page(number), task) for number in range(8)]
    got = generate(runner, requests)
    assert len({g.ids for g in got.values()}) == 8
    assert len({g.ids[0] for g in got.values()}) >= 6  # mostly from the first token on
    assert_matches_reference(runner, requests, got, variant="plain")


def test_tiles_of_a_tall_page_match_one_tile_at_a_time(tiny_checkpoint: Path) -> None:
    from kosmos_cli.tiling import plan_tiles

    page = Image.new("RGB", (600, 4000), "white")  # tall and over 4,096 patches: read in tiles
    draw = ImageDraw.Draw(page)
    for line in range(100):
        draw.text(
            (20 + 9 * (line % 7), 15 + 40 * line), " ".join(WORDS[line % 12 : line % 12 + 3]), fill="black"
        )
    tiles = plan_tiles(*page.size)
    assert len(tiles) == 5
    requests = [Request(("tile", index), page.crop(tile), Task.OCR) for index, tile in enumerate(tiles)]
    runner = load(tiny_checkpoint, batch_size=2)
    got = generate(runner, requests)
    assert len({g.ids for g in got.values()}) == len(tiles)
    assert_matches_reference(runner, requests, got, variant="")


def test_pages_join_free_slots_while_others_decode(
    runner: KosmosRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    end_ocr_pages_early(runner)
    steps: list[list[tuple[int, int]]] = []  # each decode step's (slot, length) per row
    step = ContinuousDecoder.decode_step

    def spy(self: ContinuousDecoder, batch: continuous.Batch) -> tuple[list[int], list[float], Any]:
        steps.append([(row.slot, row.cached) for row in batch.rows])
        return step(self, batch)

    monkeypatch.setattr(ContinuousDecoder, "decode_step", spy)
    requests = pages(6)
    got = generate(runner, requests)
    assert any(len({length for _, length in rows}) > 1 for rows in steps), "no page joined a running one"
    assert {slot for rows in steps for slot, _ in rows} == {0, 1}, "two slots, each reused"
    assert all(len({slot for slot, _ in rows}) == len(rows) for rows in steps)
    assert_matches_reference(runner, requests, got, variant=EARLY)


def test_a_failed_prefill_of_joining_pages_retries_them_in_halves(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runner = load(tiny_checkpoint, batch_size=3)
    end_ocr_pages_early(runner)
    prefill = ContinuousDecoder.prefill
    failures: list[int] = []
    free_after: list[int] = []

    def no_room_once(self: ContinuousDecoder, cache: SlotCache, rows: list) -> object:  # type: ignore[type-arg]
        if len(rows) > 1 and not failures:
            failures.append(len(rows))
            raise RuntimeError("CUDA out of memory (scripted)")
        return prefill(self, cache, rows)

    def release(self: SlotCache, slot: int) -> None:
        self.free.append(slot)
        free_after.append(len(self.free))

    monkeypatch.setattr(ContinuousDecoder, "prefill", no_room_once)
    monkeypatch.setattr(SlotCache, "release", release)
    requests = pages(7)
    with caplog.at_level(logging.WARNING, logger="kosmos_cli.model.continuous"):
        got = generate(runner, requests)
    assert failures and "retrying in halves" in caplog.text
    assert free_after[-1] == 3, "every slot is free again at the end"
    assert_matches_reference(runner, requests, got, variant=EARLY)


@pytest.mark.parametrize("room", [1, 0])
def test_no_room_for_the_cache_slots_halves_them(
    tiny_checkpoint: Path, room: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    runner = load(tiny_checkpoint, batch_size=4)
    end_ocr_pages_early(runner)
    asked: list[int] = []
    for_model = SlotCache.for_model

    def scarce(model: object, *, slots: int, **sizes: object) -> SlotCache:
        asked.append(slots)
        if slots > room:
            raise torch.OutOfMemoryError("CUDA out of memory (scripted)")
        return for_model(model, slots=slots, **sizes)  # type: ignore[arg-type]

    monkeypatch.setattr(SlotCache, "for_model", scarce)
    requests = pages(3)
    with caplog.at_level(logging.WARNING, logger="kosmos_cli.model.continuous"):
        outcomes = dict((request.key, outcome) for request, outcome in runner.generate(requests))
    assert asked[:3] == [4, 2, 1] and "no room for 4 cache slots" in caplog.text
    if room:
        assert_matches_reference(runner, requests, outcomes, variant=EARLY)  # type: ignore[arg-type]
    else:
        assert {outcome.message for outcome in outcomes.values()} == {"out of memory even alone"}  # type: ignore[union-attr]


def test_budget_is_reported_as_length(runner: KosmosRunner) -> None:
    set_eos_row(runner, torch.zeros_like(runner.model.text_model.model.embed_tokens.weight[EOS]))
    got = generate(runner, pages(3))
    assert {(g.token_count, g.finish) for g in got.values()} == {(BUDGET, Finish.LENGTH)}


def test_eos_at_once_gives_empty_text(runner: KosmosRunner) -> None:
    force_token(runner, EOS)
    got = generate(runner, pages(3))
    assert {(g.text, g.token_count, g.finish) for g in got.values()} == {("", 0, Finish.EOS)}


def test_ignore_eos_generates_the_whole_budget(tiny_checkpoint: Path) -> None:
    runner = load(tiny_checkpoint, batch_size=2, ignore_eos=True)
    force_token(runner, EOS)
    got = generate(runner, pages(3))
    assert {(g.token_count, g.finish) for g in got.values()} == {(BUDGET, Finish.LENGTH)}


def test_scripted_loop_stops_the_page_and_keeps_one_occurrence(runner: KosmosRunner) -> None:
    token = runner.processor.tokenizer.convert_tokens_to_ids("<bbox>")
    force_token(runner, token)
    runner.loop_rule = SMALL_LOOP_RULE
    got = generate(runner, pages(3))
    assert {(g.text, g.token_count, g.finish) for g in got.values()} == {("<bbox>", 1, Finish.LOOP)}


def test_loop_stops_fixed_batches_too(runner: KosmosRunner) -> None:
    token = runner.processor.tokenizer.convert_tokens_to_ids("<bbox>")
    force_token(runner, token)
    runner.loop_rule = SMALL_LOOP_RULE
    generations = runner.generate_batch(pages(2))
    assert {(g.text, g.token_count, g.finish) for g in generations} == {("<bbox>", 1, Finish.LOOP)}


def test_no_loop_detection_runs_to_the_budget(tiny_checkpoint: Path) -> None:
    runner = load(tiny_checkpoint, batch_size=2, detect_loops=False)
    force_token(runner, runner.processor.tokenizer.convert_tokens_to_ids("<bbox>"))
    got = generate(runner, pages(2))
    assert {(g.token_count, g.finish) for g in got.values()} == {(BUDGET, Finish.LENGTH)}


def test_pipeline_marks_a_looping_page_truncated(runner: KosmosRunner) -> None:
    from kosmos_cli.api import Transcriber

    force_token(runner, runner.processor.tokenizer.convert_tokens_to_ids("<bbox>"))
    runner.loop_rule = SMALL_LOOP_RULE
    [result] = Transcriber(runner).transcribe([pages(1)[0].image], task=Task.MD)
    assert result.status is Status.TRUNCATED
    assert result.truncation == "repetition loop cut: a 1-token box block repeating from token 0"


@pytest.mark.parametrize(
    ("finish", "loop", "reason"),
    [
        (Finish.LOOP, Loop(30, 20, 10, LoopKind.LAYOUT), "a 20-token layout block repeating from token 10"),
        (Finish.LENGTH, None, "hit --max-new-tokens 16"),
    ],
)
def test_a_cut_markdown_page_ends_cleanly_and_says_why(
    finish: Finish, loop: Loop | None, reason: str
) -> None:
    from kosmos_cli.transcribe import build_result
    from kosmos_cli.values import Document, Page, PageInfo

    cut = Generation(
        "<table><tr><td>a</td></tr><tr><td></t", (10, 10), ids=(7,) * 30, finish=finish, loop=loop
    )
    page = Page(PageInfo(Document("/in/a.png", "a"), 0, 1, 10, 10), Image.new("RGB", (10, 10), "white"))
    result = build_result(page, Task.MD, {(0, 0, 10, 10): cut}, BUDGET)
    assert result.status is Status.TRUNCATED
    assert result.text == "<table><tr><td>a</td></tr><tr><td></td></tr></table>"
    assert str(result.truncation).endswith(reason)


def test_requests_are_pulled_lazily(runner: KosmosRunner) -> None:
    pulled = 0
    requests = pages(20)

    def stream() -> Iterator[Request]:
        nonlocal pulled
        for request in requests:
            pulled += 1
            yield request

    outcomes = runner.generate(stream())
    next(outcomes)
    assert pulled <= 2 * runner.batch_size + 2  # the running batch, the read-ahead queue and one in hand
    outcomes.close()


def test_an_image_the_processor_rejects_fails_alone(runner: KosmosRunner) -> None:
    requests = pages(3)
    broken = Request("broken", "not an image", Task.MD)  # type: ignore[arg-type]
    outcomes = dict((request.key, outcome) for request, outcome in runner.generate([*requests, broken]))
    assert isinstance(outcomes.pop("broken"), GenerationError)
    assert all(isinstance(outcome, Generation) for outcome in outcomes.values())


def test_a_failed_step_restarts_its_pages_in_smaller_batches(
    runner: KosmosRunner, caplog: pytest.LogCaptureFixture
) -> None:
    end_ocr_pages_early(runner)
    step = ContinuousDecoder.decode_step
    failures = []

    def flaky(self: ContinuousDecoder, batch):  # type: ignore[no-untyped-def]
        if len(batch.rows) > 1 and not failures:
            failures.append(len(batch.rows))
            raise RuntimeError("CUDA out of memory (scripted)")
        return step(self, batch)

    runner.decoder.decode_step = flaky.__get__(runner.decoder)  # type: ignore[method-assign]
    requests = pages(4)
    with caplog.at_level(logging.WARNING, logger="kosmos_cli.model.continuous"):
        got = generate(runner, requests)
    assert failures and "restarting them" in caplog.text
    assert_matches_reference(runner, requests, got, variant=EARLY)


def test_a_page_failing_alone_is_an_error(runner: KosmosRunner) -> None:
    runner.batch_size = 1

    def broken(self: ContinuousDecoder, batch):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    runner.decoder.decode_step = broken.__get__(runner.decoder)  # type: ignore[method-assign]
    outcomes = list(runner.generate(pages(2)))
    assert [type(outcome) for _, outcome in outcomes] == [GenerationError, GenerationError]
    assert outcomes[0][1].message == "generation failed: boom"


def eager_vision(runner: KosmosRunner) -> KosmosRunner:
    """Put back transformers' own (eager) attention in the vision encoder."""
    from transformers.models.kosmos2_5.modeling_kosmos2_5 import Kosmos2_5VisionAttention

    for module in runner.model.vision_model.modules():
        if isinstance(module, Kosmos2_5VisionAttention):
            module.__dict__.pop("forward", None)  # back to the class's forward
    return runner


def vision_output(runner: KosmosRunner, request: Request) -> torch.Tensor:
    patches = runner.encode(request).inputs["flattened_patches"]
    with torch.inference_mode():
        return runner.model.vision_model(flattened_patches=patches).last_hidden_state.float()


def test_vision_sdpa_matches_eager_attention(runner: KosmosRunner, tiny_checkpoint: Path) -> None:
    requests = pages(4)
    fast = [vision_output(runner, request) for request in requests]
    fast_ids = {key: g.ids for key, g in generate(runner, requests).items()}
    eager_vision(runner)
    for request, output in zip(requests, fast, strict=True):
        torch.testing.assert_close(output, vision_output(runner, request), rtol=1e-4, atol=1e-4)
    assert {key: g.ids for key, g in generate(runner, requests).items()} == fast_ids
    # In bf16 the SDPA path is as close to fp32 as the eager one (each 1-5% of the output's norm).
    bf16 = load(tiny_checkpoint, dtype="bfloat16")
    sdpa_error = [(vision_output(bf16, r) - f).norm() / f.norm() for r, f in zip(requests, fast, strict=True)]
    eager_vision(bf16)
    eager_error = [
        (vision_output(bf16, r) - f).norm() / f.norm() for r, f in zip(requests, fast, strict=True)
    ]
    assert max(sdpa_error) < 0.06 and sum(sdpa_error) <= 1.1 * sum(eager_error)


def test_cpu_linears_run_on_onednn(runner: KosmosRunner) -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    kinds = {type(module).__name__ for module in runner.model.modules()}
    assert "OneDnnLinear" in kinds and "Linear" not in kinds


# bf16 rounds every matmul, so greedy decoding follows fp32 only until two tokens come within the
# rounding of each other. On the tiny model (32 pages, 24 new tokens) kosmos's bf16 CPU path (oneDNN
# linears, matmul decode attention, batches of 3) kept 14 of 32 pages token-identical to fp32 with the
# left-padded cache and 16 with slots, against 12 for bf16 with eager attention one page at a time;
# all first differed at fp32 margins of at most 0.73 of that step's logit standard deviation (0.65
# with slots). A float8 KV cache under fp32 weights kept 23 of 32, first differing at margins up to
# 0.11; a bf16 or fp16 one all 32. bf16 cannot tell a bug from rounding below that; the exact fp32
# tests above are what catch wrong images, positions and masks.
BF16_TOLERANCE = 1.0  # logit standard deviations


def logits_after(runner: KosmosRunner, request: Request, ids: list[int]) -> torch.Tensor:
    """The next-token logits after `ids`, for this page alone, without a cache (teacher forcing)."""
    inputs = runner.processor(text=[TASK_PROMPTS[request.task]], images=[request.image], return_tensors="pt")
    inputs.pop("width"), inputs.pop("height")
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([ids], dtype=torch.long)], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    position_mask = inputs["image_embeds_position_mask"]
    inputs["image_embeds_position_mask"] = torch.cat([position_mask, position_mask.new_zeros(1, len(ids))], 1)
    with torch.inference_mode():
        return runner.model(**inputs, use_cache=False).logits[0, -1].float()


def divergence_margin(runner: KosmosRunner, request: Request, got: tuple[int, ...]) -> float | None:
    """Where `got` first leaves fp32's greedy ids for this page: fp32's margin there, in logit stds."""
    expected = reference(runner, request, variant="plain")
    if list(got) == expected:
        return None
    step = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b), None)
    if step is None:  # one stopped where the other went on: the margin of EOS against the next token
        step = min(len(expected), len(got))
    logits = logits_after(runner, request, expected[:step])
    chosen = expected[step] if step < len(expected) else EOS
    other = got[step] if step < len(got) else EOS
    return float((logits[chosen] - logits[other]) / logits.std())


def test_bf16_on_cpu_differs_from_fp32_only_at_near_ties(runner: KosmosRunner, tiny_checkpoint: Path) -> None:
    fast = load(tiny_checkpoint, dtype="bfloat16", batch_size=3, detect_loops=False)
    assert fast.model.config.text_config._attn_implementation == f"{SLOT_ATTENTION}:sdpa"
    if patches.native_bf16_cpu():
        assert "OneDnnLinear" in {type(module).__name__ for module in fast.model.modules()}
    requests = pages(8)
    got = generate(fast, requests)
    margins = [divergence_margin(runner, request, got[request.key].ids) for request in requests]
    differing = [margin for margin in margins if margin is not None]
    assert all(0 <= margin <= BF16_TOLERANCE for margin in differing), margins


@pytest.mark.parametrize(
    ("kv_dtype", "stored"), [("bfloat16", torch.bfloat16), ("float8", torch.float8_e4m3fn)]
)
def test_a_smaller_kv_cache_differs_from_fp32_only_at_near_ties(
    runner: KosmosRunner, tiny_checkpoint: Path, kv_dtype: str, stored: torch.dtype
) -> None:
    small = load(tiny_checkpoint, kv_dtype=kv_dtype, batch_size=3, detect_loops=False)
    cache, _ = small.decoder.new_cache(1)
    cache.at([cache.take()])
    cache.update(torch.ones(1, 2, 3, 16), torch.ones(1, 2, 3, 16), 0)
    assert cache.keys[0][0].dtype == stored  # type: ignore[attr-defined]
    requests = pages(8)
    got = generate(small, requests)
    margins = [divergence_margin(runner, request, got[request.key].ids) for request in requests]
    differing = [margin for margin in margins if margin is not None]
    assert all(0 <= margin <= BF16_TOLERANCE for margin in differing), margins


@pytest.mark.parametrize(
    ("native", "quantize", "expected"),
    [
        (True, None, torch.bfloat16),
        (False, None, torch.float32),
        (True, "int8", torch.float32),
    ],
)
def test_auto_dtype_on_cpu_is_bf16_only_where_native(
    monkeypatch: pytest.MonkeyPatch, native: bool, quantize: str | None, expected: torch.dtype
) -> None:
    monkeypatch.setattr(loading, "native_bf16_cpu", lambda: native)
    assert loading.resolve_dtype("auto", "cpu", quantize=quantize) == expected
    assert loading.resolve_dtype("float32", "cpu") == torch.float32


def test_cpu_threads_follow_the_cores_available(tiny_checkpoint: Path) -> None:
    load(tiny_checkpoint, threads=None)
    assert torch.get_num_threads() == available_cores()


def test_the_default_budget_is_the_reference_one_and_decoding_runs_past_the_trained_table(
    tiny_checkpoint: Path,
) -> None:
    assert load(tiny_checkpoint, max_new_tokens=None).max_new_tokens == DEFAULT_MAX_NEW_TOKENS == 4000
    # The tiny model's prompt is 12 tokens: 4,090 new ones run past its 4,096 trained positions.
    long = load(tiny_checkpoint, max_new_tokens=4090, ignore_eos=True, detect_loops=False)
    (generation,) = generate(long, pages(1)).values()
    assert (generation.token_count, generation.finish) == (4090, Finish.LENGTH)


def test_position_table_grows_for_long_budgets(tiny_checkpoint: Path) -> None:
    runner = load(tiny_checkpoint, max_new_tokens=5000)
    table = runner.model.text_model.model.embed_positions
    assert table.weights.shape[0] >= table.padding_idx + 1 + runner.prompt_length + 5000


def test_int8_where_auto_picks_a_gpu_is_a_usage_error_before_loading(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "resolve_device", lambda device: "cuda")  # as on a GPU machine
    monkeypatch.setattr(loading, "_load_parts", None)  # loading anything would fail otherwise
    with pytest.raises(UsageError) as caught:
        load(tiny_checkpoint, quantize="int8")
    assert caught.value.message == "--quantize int8 runs on CPU in float32, and --device auto chose cuda"
    assert caught.value.hint == "add --device cpu"


def test_cuda_graph_where_auto_picks_the_cpu_is_a_usage_error_before_loading(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "resolve_device", lambda device: "cpu")  # as on a machine without a GPU
    monkeypatch.setattr(loading, "_load_parts", None)  # loading anything would fail otherwise
    with pytest.raises(UsageError) as caught:
        load(tiny_checkpoint, cuda_graph=True, device="auto")
    assert caught.value.message == "--cuda-graph needs a CUDA GPU with Triton, and --device auto chose cpu"


def test_a_float8_cache_on_a_gpu_before_ada_is_a_usage_error_before_loading(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "resolve_device", lambda device: "cuda")  # as on an A100
    monkeypatch.setattr(loading, "resolve_dtype", lambda *args, **kwargs: torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(loading, "_load_parts", None)  # loading anything would fail otherwise
    with pytest.raises(UsageError) as caught:
        load(tiny_checkpoint, kv_dtype="float8", device="auto", dtype="auto")
    assert (
        caught.value.message
        == "--kv-dtype float8 needs a GPU of compute capability 8.9 or later (Ada, Hopper)"
    )


@NEEDS_TRITON
@pytest.mark.parametrize("captures", [True, False])
def test_the_decode_step_over_every_slot_matches_one_page_at_a_time(
    tiny_checkpoint: Path, captures: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # --cuda-graph: fixed slots read by the Triton kernel, every slot in every step, captured as a
    # CUDA graph. Here the same step runs eagerly, the kernel in Triton's interpreter (conftest).
    runner = load(tiny_checkpoint, batch_size=3)
    runner.captures_steps = True
    made: list[graph.CapturedStep] = []
    read: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []  # what each step's attention read
    guarded: list[str] = []
    captured, attend = graph.CapturedStep, FixedSlots.attend

    def fixed(model: object, *, slots: int, capacity: int, dtype: torch.dtype, device: str) -> FixedSlots:
        text = runner.model.config.text_config
        heads = text.attention_heads
        return FixedSlots(
            slots, layers=text.layers, heads=heads, head_dim=text.embed_dim // heads, capacity=capacity,
            dtype=dtype, device=device,
        )  # fmt: skip

    def spy(*args: object) -> graph.CapturedStep:
        if not captures:  # as where CUDA cannot capture some op: the run goes on without the graph
            raise RuntimeError("operation not permitted when stream is capturing (scripted)")
        made.append(captured(*args))  # type: ignore[arg-type]
        return made[-1]

    def reading(
        self: FixedSlots, query: torch.Tensor, layer: int, scaling: float | None, *rest: Any
    ) -> torch.Tensor:
        read.append((self._slot_index, self._column_index))
        return attend(self, query, layer, scaling, *rest)

    def guard(device: str) -> contextlib.nullcontext[None]:
        guarded.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(SlotCache, "for_model", fixed)
    monkeypatch.setattr(continuous, "CapturedStep", spy)
    monkeypatch.setattr(FixedSlots, "attend", reading)
    monkeypatch.setattr(graph, "device_guard", guard)
    end_ocr_pages_early(runner)
    requests = pages(6)
    with caplog.at_level(logging.WARNING, logger="kosmos_cli.model.continuous"):
        got = generate(runner, requests)
    assert len(made) == (1 if captures else 0)
    assert ("could not capture the decode step" in caplog.text) is not captures
    assert_matches_reference(runner, requests, got, variant=EARLY)
    if captures:
        # A graph replays the addresses it captured: every step reads the tensors the step made and
        # keeps, never ones a prefill made since (prefills point the cache at tensors of their own).
        step = made[0]
        assert read and all(slots is step.slots and columns is step.columns for slots, columns in read)
        assert guarded == ["cpu"] * (1 + len(read) // runner.model.config.text_config.layers)


class Synchronous(concurrent.futures.Executor):
    """An executor that runs each call at once: every page is ready as soon as it is asked for."""

    def __init__(self, **kwargs: object) -> None:
        pass

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def test_pages_finishing_in_the_same_step_each_free_their_own_slot(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = load(tiny_checkpoint, batch_size=3)
    set_eos_row(runner, torch.zeros_like(runner.model.text_model.model.embed_tokens.weight[EOS]))
    # Every page ready at once: three join in one prefill and, with no EOS, finish in one step.
    monkeypatch.setattr(encoding, "ThreadPoolExecutor", Synchronous)
    together: list[int] = []
    advance = ContinuousDecoder.advance

    def checked(
        self: ContinuousDecoder, batch: continuous.Batch, *args: object, **kwargs: object
    ) -> Iterator[object]:
        finished = list(advance(self, batch, *args, **kwargs))  # type: ignore[arg-type]
        together.append(len(finished))
        assert batch.cache is not None
        running = [row.slot for row in batch.rows]
        assert sorted(batch.cache.free + running) == list(range(3)), "each slot free or running, once"
        yield from finished

    monkeypatch.setattr(ContinuousDecoder, "advance", checked)
    requests = pages(6)
    got = generate(runner, requests)
    assert together.count(3) == 2, together
    assert_matches_reference(runner, requests, got, variant="no eos")


def test_pages_longer_than_a_cpu_slots_first_blocks_match_one_page_at_a_time(tiny_checkpoint: Path) -> None:
    budget = 2 * GROW_COLUMNS + 20  # the tiny prompt's 12 tokens and this: a slot grows twice
    runner = load(tiny_checkpoint, batch_size=2, max_new_tokens=budget, detect_loops=False)
    set_eos_row(runner, torch.zeros_like(runner.model.text_model.model.embed_tokens.weight[EOS]))
    requests = pages(3)
    got = generate(runner, requests)
    for request in requests:
        assert list(got[request.key].ids) == reference(runner, request, budget=budget), request.key


def test_int8_quantizes_the_decoder_and_stays_near_fp32(runner: KosmosRunner, tiny_checkpoint: Path) -> None:
    if not {"x86", "fbgemm", "qnnpack"} & set(torch.backends.quantized.supported_engines):
        pytest.skip("this torch build has no quantized CPU engine")
    int8 = load(tiny_checkpoint, quantize="int8", batch_size=3, detect_loops=False)
    quantized = torch.ao.nn.quantized.dynamic.Linear
    kinds = {name: type(module) for name, module in int8.model.named_modules()}
    assert {name for name, kind in kinds.items() if kind is quantized} == {
        name
        for name, kind in kinds.items()
        if name.startswith("text_model.") and kind in (quantized, torch.nn.Linear)
    }
    assert not any(kind is quantized for name, kind in kinds.items() if not name.startswith("text_model."))
    assert any(kind is quantized and name.endswith("lm_head") for name, kind in kinds.items())
    # Per-channel weights, vision in float: 23 of 32 tiny pages (24 tokens) identical to fp32 (bf16: 14),
    # first differing at margins of at most 0.06 logit standard deviations (bf16: 0.73).
    requests = pages(8)
    got = generate(int8, requests)
    margins = [divergence_margin(runner, request, got[request.key].ids) for request in requests]
    assert margins.count(None) >= len(requests) // 2, margins
    assert all(0 <= margin <= BF16_TOLERANCE for margin in margins if margin is not None), margins


COMPILE_ENV = "KOSMOS_TEST_COMPILE"


@pytest.mark.skipif(
    not (os.environ.get(COMPILE_ENV) or torch.cuda.is_available()),
    reason=f"torch.compile takes 1-2 minutes on a small CPU; set {COMPILE_ENV}=1 to run it",
)
@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile's CPU backend needs a C compiler")
@pytest.mark.skipif(sys.platform == "win32", reason="torch.compile's CPU backend does not run on Windows")
def test_compile_path_matches_eager_and_runs_past_the_trained_positions(tiny_checkpoint: Path) -> None:
    eager = load(tiny_checkpoint, batch_size=2, max_new_tokens=6)
    # The tiny prompt is 12 tokens: 4,090 new ones fill a static cache past the 4,096 trained positions.
    budget = 4090
    compiled = load(
        tiny_checkpoint,
        batch_size=2,
        max_new_tokens=budget,
        compile=True,
        ignore_eos=True,
        detect_loops=False,
    )
    requests = pages(3)
    expected = {key: g.ids for key, g in generate(eager, requests).items()}
    got = generate(compiled, requests)
    assert {(g.token_count, g.finish) for g in got.values()} == {(budget, Finish.LENGTH)}
    # Greedy ids do not depend on the budget: the first ones are eager's (up to where eager met EOS).
    assert {key: g.ids[: len(expected[key])] for key, g in got.items()} == expected
