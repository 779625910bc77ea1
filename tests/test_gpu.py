"""kosmos on a CUDA GPU: exactness in float32 and bf16, --cuda-graph, out-of-memory halving, flash-attention.

Skipped without CUDA; `make gpu-check` (benchmarks/gpu_check.sh) runs them on a lent GPU. The full-size
test reads the random full-size checkpoint named by KOSMOS_GPU_CHECK_MODEL (gpu_check.sh builds it).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import pytest
import torch
from test_generation import BF16_TOLERANCE, BUDGET, EOS, divergence_margin, generate, load, pages

from kosmos_cli.config import Settings
from kosmos_cli.model import Request
from kosmos_cli.model.fixed import greedy_config
from kosmos_cli.model.loading import load_runner
from kosmos_cli.model.runner import KosmosRunner
from kosmos_cli.model.slots import FixedSlots, triton_available
from kosmos_cli.values import Finish
from kosmos_cli.vocabulary import TASK_PROMPTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
]
FULL_MODEL_ENV = "KOSMOS_GPU_CHECK_MODEL"


def on_cuda(checkpoint: Path, **settings: object) -> KosmosRunner:
    chosen = {"device": "cuda", "dtype": "float32", "max_new_tokens": BUDGET, **settings}
    return load_runner(Settings(model=str(checkpoint), **chosen))  # type: ignore[arg-type]


def cuda_reference(runner: KosmosRunner, request: Request) -> list[int]:
    """This page alone through `model.generate` on the GPU, greedy: new ids up to EOS."""
    inputs = runner.processor(text=[TASK_PROMPTS[request.task]], images=[request.image], return_tensors="pt")
    inputs.pop("width"), inputs.pop("height")
    inputs = {key: value.to(runner.device) for key, value in inputs.items()}
    inputs["flattened_patches"] = inputs["flattened_patches"].to(runner.dtype)
    with torch.inference_mode():
        output = runner.model.generate(**inputs, generation_config=greedy_config(runner.model, BUDGET))
    ids: list[int] = output[0, inputs["input_ids"].shape[1] :].tolist()
    return ids[: ids.index(EOS)] if EOS in ids else ids


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cuda_float32_batches_match_one_page_at_a_time(tiny_checkpoint: Path, batch_size: int) -> None:
    runner = on_cuda(tiny_checkpoint, batch_size=batch_size)
    if triton_available():
        assert isinstance(runner.decoder.new_cache(batch_size)[0], FixedSlots), (
            "Triton reads preallocated slots"
        )
    requests = pages(7)
    got = generate(runner, requests)
    for request in requests:
        assert list(got[request.key].ids) == cuda_reference(runner, request), request.key


@pytest.mark.parametrize("kv_dtype", ["auto", "float8"])
def test_cuda_bf16_differs_from_float32_only_at_near_ties(tiny_checkpoint: Path, kv_dtype: str) -> None:
    if kv_dtype == "float8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 KV needs compute capability 8.9")
    exact = load(tiny_checkpoint, batch_size=2)  # CPU float32: the margins are measured there
    fast = on_cuda(tiny_checkpoint, dtype="bfloat16", kv_dtype=kv_dtype, batch_size=4, detect_loops=False)
    requests = pages(8)
    got = generate(fast, requests)
    margins = [divergence_margin(exact, request, got[request.key].ids) for request in requests]
    assert all(0 <= margin <= BF16_TOLERANCE for margin in margins if margin is not None), margins


def test_cuda_graph_matches_eager(tiny_checkpoint: Path) -> None:
    # (--compile's torch.compile'd fixed batches are checked on the CPU: tests/test_generation.py)
    eager = on_cuda(tiny_checkpoint, batch_size=2)
    compiled = on_cuda(tiny_checkpoint, batch_size=2, ignore_eos=True, detect_loops=False, cuda_graph=True)
    requests = pages(6)  # more pages than slots: pages join the captured step's slots as others leave
    expected = {key: g.ids for key, g in generate(eager, requests).items()}
    got = generate(compiled, requests)
    assert {(g.token_count, g.finish) for g in got.values()} == {(BUDGET, Finish.LENGTH)}
    assert {key: g.ids[: len(expected[key])] for key, g in got.items()} == expected


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash-attn is not installed")
def test_flash_attention_stays_near_float32(tiny_checkpoint: Path) -> None:
    exact = load(tiny_checkpoint, batch_size=2)
    flash = on_cuda(
        tiny_checkpoint, dtype="bfloat16", attn="flash_attention_2", batch_size=4, detect_loops=False
    )
    requests = pages(6)
    got = generate(flash, requests)
    margins = [divergence_margin(exact, request, got[request.key].ids) for request in requests]
    assert all(0 <= margin <= BF16_TOLERANCE for margin in margins if margin is not None), margins


@pytest.mark.skipif(
    not os.environ.get(FULL_MODEL_ENV), reason=f"set {FULL_MODEL_ENV} to a full-size checkpoint"
)
def test_out_of_memory_halves_the_batch_and_every_page_finishes(caplog: pytest.LogCaptureFixture) -> None:
    """With the GPU capped a little above the weights, 16 full-size pages have no room for their cache
    slots (4.9 GB) nor for prefilling together."""
    runner = load_runner(
        Settings(
            model=os.environ[FULL_MODEL_ENV], device="cuda", dtype="bfloat16", batch_size=16, max_new_tokens=8,
            ignore_eos=True, detect_loops=False,
        )
    )  # fmt: skip
    total = torch.cuda.get_device_properties(0).total_memory
    cap = (torch.cuda.memory_allocated() + (3 << 30)) / total  # the weights and 3 GiB: a few pages' prefill
    torch.cuda.set_per_process_memory_fraction(cap)
    try:
        with caplog.at_level(logging.WARNING, logger="kosmos_cli.model.continuous"):
            got = generate(runner, pages(16))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert {(g.token_count, g.finish) for g in got.values()} == {(8, Finish.LENGTH)}
    halved = [
        r.getMessage() for r in caplog.records if "trying" in r.getMessage() or "halves" in r.getMessage()
    ]
    assert halved, "16 pages did not fit: the slots or the prefill must have been halved"
