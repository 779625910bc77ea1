"""Every speed path of the runner gives the output of the plain one-page-at-a-time loop (tiny model)."""

from __future__ import annotations

import logging
import os
import random
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from kosmos_cli import runner as runner_module
from kosmos_cli.document import Finish, Generation, Status, Task
from kosmos_cli.errors import GenerationError, ModelLoadError
from kosmos_cli.loops import LoopRule
from kosmos_cli.runner import (
    TASK_PROMPTS,
    KosmosRunner,
    Request,
    Settings,
    available_cores,
    greedy_config,
    load_runner,
)

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


def reference(runner: KosmosRunner, request: Request, *, variant: str = "") -> list[int]:
    """The model card's loop: this page alone through `model.generate`, greedy; new ids up to EOS.

    Pages from `pages()` with the same model `variant` give the same ids, so they are computed once.
    """
    if variant and (variant, request.key) in _references:
        return _references[variant, request.key]
    inputs = runner.processor(text=[TASK_PROMPTS[request.task]], images=[request.image], return_tensors="pt")
    inputs.pop("width"), inputs.pop("height")
    with torch.inference_mode():
        output = runner.model.generate(**inputs, generation_config=greedy_config(runner.model, BUDGET))
    ids: list[int] = output[0, inputs["input_ids"].shape[1] :].tolist()
    ids = ids[: ids.index(EOS)] if EOS in ids else ids
    if variant:
        _references[variant, request.key] = ids
    return ids


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
        assert generation.token_count == len(ids), request.key
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


def test_rows_join_a_running_batch_with_left_padding(
    runner: KosmosRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    end_ocr_pages_early(runner)
    widths: list[tuple[int, int]] = []
    merge = runner_module._Batch.merge

    def spy(self: runner_module._Batch, other: runner_module._Batch) -> None:
        if self.rows:
            assert self.mask is not None and other.mask is not None
            widths.append((self.mask.shape[1], other.mask.shape[1]))
        merge(self, other)

    monkeypatch.setattr(runner_module._Batch, "merge", spy)
    requests = pages(6)
    got = generate(runner, requests)
    assert any(running > joining for running, joining in widths), "no page joined with left padding"
    assert_matches_reference(runner, requests, got, variant=EARLY)


def test_no_room_to_merge_restarts_the_pages(
    runner: KosmosRunner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    end_ocr_pages_early(runner)
    merge = runner_module._Batch.merge
    failures: list[int] = []

    def no_room_once(self: runner_module._Batch, other: runner_module._Batch) -> None:
        if self.rows and not failures:
            failures.append(len(self.rows))
            raise RuntimeError("CUDA out of memory (scripted)")
        merge(self, other)

    monkeypatch.setattr(runner_module._Batch, "merge", no_room_once)
    requests = pages(5)
    with caplog.at_level(logging.WARNING, logger="kosmos_cli.runner"):
        got = generate(runner, requests)
    assert failures and "restarting them" in caplog.text
    assert_matches_reference(runner, requests, got, variant=EARLY)


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
    from kosmos_cli.pipeline import Transcriber

    force_token(runner, runner.processor.tokenizer.convert_tokens_to_ids("<bbox>"))
    runner.loop_rule = SMALL_LOOP_RULE
    [result] = Transcriber(runner).transcribe([pages(1)[0].image], task=Task.MD)
    assert result.status is Status.TRUNCATED
    assert result.extra["truncation"] == "repetition loop cut"


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
    step = type(runner)._decode_step
    failures = []

    def flaky(self: KosmosRunner, batch):  # type: ignore[no-untyped-def]
        if len(batch.rows) > 1 and not failures:
            failures.append(len(batch.rows))
            raise RuntimeError("CUDA out of memory (scripted)")
        return step(self, batch)

    runner._decode_step = flaky.__get__(runner)  # type: ignore[method-assign]
    requests = pages(4)
    with caplog.at_level(logging.WARNING, logger="kosmos_cli.runner"):
        got = generate(runner, requests)
    assert failures and "restarting them" in caplog.text
    assert_matches_reference(runner, requests, got, variant=EARLY)


def test_a_page_failing_alone_is_an_error(runner: KosmosRunner) -> None:
    runner.batch_size = 1

    def broken(self: KosmosRunner, batch):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    runner._decode_step = broken.__get__(runner)  # type: ignore[method-assign]
    outcomes = list(runner.generate(pages(2)))
    assert [type(outcome) for _, outcome in outcomes] == [GenerationError, GenerationError]
    assert outcomes[0][1].message == "generation failed: boom"


def test_vision_sdpa_matches_eager_attention(runner: KosmosRunner) -> None:
    from transformers.models.kosmos2_5.modeling_kosmos2_5 import Kosmos2_5VisionAttention

    patches = runner.encode(pages(1)[0]).inputs["flattened_patches"]
    with torch.inference_mode():
        fast = runner.model.vision_model(flattened_patches=patches).last_hidden_state
        for module in runner.model.vision_model.modules():
            if isinstance(module, Kosmos2_5VisionAttention):
                del module.forward  # back to the class's (eager) forward
        slow = runner.model.vision_model(flattened_patches=patches).last_hidden_state
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_cpu_linears_run_on_onednn(runner: KosmosRunner) -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    kinds = {type(module).__name__ for module in runner.model.modules()}
    assert "OneDnnLinear" in kinds and "Linear" not in kinds


def test_cpu_decode_attention_matches_sdpa() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(0)
    rows, heads, columns, dim = 3, 4, 37, 8
    buffer = torch.zeros(2, rows, heads, columns + 11, dim)  # spare columns are zeros, as GrowingLayer keeps
    buffer[:, :, :, :columns].normal_(generator=generator)
    key, value = buffer[0, :, :, :columns], buffer[1, :, :, :columns]  # strided views, as the cache gives
    assert not key.is_contiguous()
    mask = torch.ones(rows, 1, 1, columns, dtype=torch.bool)
    mask[0, ..., :5] = False  # a row's left padding
    module = torch.nn.Module()
    for queries in (1, 3):
        query = torch.randn(rows, heads, queries, dim, generator=generator)
        query_mask = mask.expand(rows, 1, queries, columns)
        expected, _ = sdpa_attention_forward(module, query, key, value, query_mask, scaling=0.3)
        got, _ = runner_module._cpu_decode_attention(module, query, key, value, query_mask, scaling=0.3)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not runner_module.native_bf16_cpu(), reason="this CPU has no native bf16")
def test_bf16_on_cpu_runs_onednn_and_matmul_decode_attention(tiny_checkpoint: Path) -> None:
    fast = load(tiny_checkpoint, dtype="bfloat16", batch_size=3, detect_loops=False)
    assert fast.dtype == torch.bfloat16
    assert fast.model.config.text_config._attn_implementation == runner_module.CPU_DECODE_ATTENTION
    assert "OneDnnLinear" in {type(module).__name__ for module in fast.model.modules()}
    plain = load(tiny_checkpoint, dtype="bfloat16", attn="eager", batch_size=1, detect_loops=False)
    assert plain.model.config.text_config._attn_implementation == "eager"
    requests = pages(4)
    expected = {key: (g.text, g.token_count) for key, g in generate(plain, requests).items()}
    got = {key: (g.text, g.token_count) for key, g in generate(fast, requests).items()}
    assert got == expected


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
    monkeypatch.setattr(runner_module, "native_bf16_cpu", lambda: native)
    assert runner_module.resolve_dtype("auto", "cpu", quantize=quantize) == expected
    assert runner_module.resolve_dtype("float32", "cpu") == torch.float32


def test_cpu_threads_follow_the_cores_available(tiny_checkpoint: Path) -> None:
    load(tiny_checkpoint, threads=None)
    assert torch.get_num_threads() == available_cores()


def test_the_default_budget_is_the_reference_one_and_decoding_runs_past_the_trained_table(
    tiny_checkpoint: Path,
) -> None:
    assert (
        load(tiny_checkpoint, max_new_tokens=None).max_new_tokens
        == runner_module.DEFAULT_MAX_NEW_TOKENS
        == 4000
    )
    # The tiny model's prompt is 12 tokens: 4,090 new ones run past its 4,096 trained positions.
    long = load(tiny_checkpoint, max_new_tokens=4090, ignore_eos=True, detect_loops=False)
    (generation,) = generate(long, pages(1)).values()
    assert (generation.token_count, generation.finish) == (4090, Finish.LENGTH)


def test_position_table_grows_for_long_budgets(tiny_checkpoint: Path) -> None:
    runner = load(tiny_checkpoint, max_new_tokens=5000)
    table = runner.model.text_model.model.embed_positions
    assert table.weights.shape[0] >= table.padding_idx + 1 + runner.prompt_length + 5000


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"quantize": "int4"}, "unknown quantization"),
        ({"quantize": "int8", "dtype": "bfloat16"}, "needs float32"),
        ({"quantize": "int8", "compile": True}, "do not work together"),
        ({"threads": 0}, "at least 1"),
    ],
)
def test_impossible_speed_settings_fail_before_loading(
    tiny_checkpoint: Path, settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load(tiny_checkpoint, **settings)


def test_int8_quantization_runs(tiny_checkpoint: Path) -> None:
    if not {"x86", "fbgemm", "qnnpack"} & set(torch.backends.quantized.supported_engines):
        pytest.skip("this torch build has no quantized CPU engine")
    runner = load(tiny_checkpoint, quantize="int8", batch_size=2, detect_loops=False)
    modules = list(runner.model.modules())
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in modules)
    assert not any(type(m) is torch.nn.Linear for m in modules)
    got = generate(runner, pages(3))
    assert {(g.token_count, g.finish) for g in got.values()} <= {(BUDGET, Finish.LENGTH)} | {
        (g.token_count, Finish.EOS) for g in got.values()
    }


COMPILE_ENV = "KOSMOS_TEST_COMPILE"


@pytest.mark.skipif(
    not (os.environ.get(COMPILE_ENV) or torch.cuda.is_available()),
    reason=f"torch.compile takes 1-2 minutes on a small CPU; set {COMPILE_ENV}=1 to run it",
)
@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile's CPU backend needs a C compiler")
@pytest.mark.skipif(sys.platform == "win32", reason="torch.compile's CPU backend does not run on Windows")
def test_compile_path_matches_eager(tiny_checkpoint: Path) -> None:
    eager = load(tiny_checkpoint, batch_size=2, max_new_tokens=6)
    compiled = load(tiny_checkpoint, batch_size=2, max_new_tokens=6, compile=True)
    requests = pages(3)
    expected = {key: (g.text, g.token_count) for key, g in generate(eager, requests).items()}
    got = {key: (g.text, g.token_count) for key, g in generate(compiled, requests).items()}
    assert got == expected
