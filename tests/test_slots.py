"""The slot KV cache and its decode attention: each row reads its own slot's filled columns, exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kosmos_cli.model import slots
from kosmos_cli.model.slots import SlotCache, SlotRead

# (heads, head_dim, each row's (slot, length)): lengths across the Triton kernel's 64-column blocks,
# a head size that is not a power of two (the full-size model's 96), slots out of order.
CASES = [
    (2, 16, [(0, 1)]),
    (3, 96, [(4, 1), (0, 65), (2, 300)]),
    (16, 96, [(1, 64), (3, 63), (0, 128), (2, 129)]),
]


def read_of(rows: list[tuple[int, int]]) -> SlotRead:
    slot_list, lengths = [slot for slot, _ in rows], [length for _, length in rows]
    return SlotRead(slot_list, lengths, torch.tensor(slot_list), torch.tensor(lengths, dtype=torch.int32))


def buffers(heads: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(heads * dim)
    keys, values = torch.randn(2, 5, heads, 300, dim, generator=generator).to(dtype)
    return keys, values


def reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: list[tuple[int, int]]
) -> torch.Tensor:
    """Each row alone, in float64, as transformers' eager attention computes it: [rows, 1, heads, dim]."""
    outputs = []
    for row, (slot, length) in enumerate(rows):
        k, v = keys[slot, :, :length].double(), values[slot, :, :length].double()
        weights = (query[row].double() @ k.transpose(-1, -2) * 0.125).softmax(dim=-1)
        outputs.append((weights @ v).transpose(0, 1))
    return torch.stack(outputs)


@pytest.mark.parametrize(("heads", "dim", "rows"), CASES)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_row_attention_reads_each_rows_own_columns(
    heads: int, dim: int, rows: list[tuple[int, int]], dtype: torch.dtype, tolerance: float
) -> None:
    keys, values = buffers(heads, dim, dtype)
    for slot, length in rows:  # what lies past a row's length must not count: NaN would spread
        keys[slot, :, length:] = float("nan")
        values[slot, :, length:] = float("nan")
    query = torch.randn(len(rows), heads, 1, dim).to(dtype)
    got = slots._row_attention(query, keys, values, read_of(rows), 0.125)
    assert got.shape == (len(rows), 1, heads, dim) and got.dtype == dtype
    torch.testing.assert_close(
        got.double(), reference(query, keys, values, rows), rtol=tolerance, atol=tolerance
    )


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize(("heads", "dim", "rows"), CASES)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_triton_kernel_matches_each_row_alone(
    heads: int,
    dim: int,
    rows: list[tuple[int, int]],
    dtype: torch.dtype,
    tolerance: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Triton's interpreter runs the kernel's own code on the CPU, so CI checks what CUDA runs.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    slots._decode_kernel.cache_clear()
    try:
        keys, values = buffers(heads, dim, dtype)
        for slot, length in rows:
            keys[slot, :, length:] = float("nan")
            values[slot, :, length:] = float("nan")
        query = torch.randn(len(rows), heads, 1, dim).to(dtype)
        got = slots._triton_attention(query, keys, values, read_of(rows), 0.125)
    finally:
        slots._decode_kernel.cache_clear()
    assert got.shape == (len(rows), 1, heads, dim) and got.dtype == dtype
    torch.testing.assert_close(
        got.double(), reference(query, keys, values, rows), rtol=tolerance, atol=tolerance
    )


def test_slots_are_taken_and_given_back() -> None:
    cache = SlotCache(layers=1, slots=3, heads=1, capacity=4, head_dim=2, dtype=torch.float32, device="cpu")
    assert [cache.take(), cache.take()] == [0, 1]
    cache.release(0)
    assert [cache.take(), cache.take()] == [0, 2]
    with pytest.raises(IndexError):
        cache.take()


def test_a_prefill_fills_its_slots_from_column_0_and_a_step_writes_each_rows_next_column() -> None:
    cache = SlotCache(layers=2, slots=3, heads=2, capacity=6, head_dim=4, dtype=torch.float32, device="cpu")
    for layer in (*cache.keys, *cache.values):
        layer.fill_(-1)
    prompt = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).view(2, 2, 3, 4)  # two pages, three tokens
    cache.at(torch.tensor([2, 0]), 0)
    got = cache.update(prompt, -prompt, 1)
    assert got[0] is prompt, "a prefill attends over its own states"
    assert torch.equal(cache.keys[1][2, :, :3], prompt[0]) and torch.equal(cache.keys[1][0, :, :3], prompt[1])
    assert torch.equal(cache.values[1][2, :, :3], -prompt[0])
    assert (cache.keys[0] == -1).all() and (cache.keys[1][1] == -1).all(), "only that layer and those slots"
    new = torch.full((2, 2, 1, 4), 7.0)
    cache.at(torch.tensor([0, 2]), torch.tensor([3, 5]))  # rows of different lengths
    keys, _ = cache.update(new, new, 1)
    assert keys is cache.keys[1]
    assert (keys[0, :, 3] == 7).all() and (keys[2, :, 5] == 7).all()
    assert (keys[0, :, 4:] == -1).all() and (keys[2, :, 3:5] == -1).all()


def test_cpu_runner_uses_the_row_kernel(tiny_checkpoint: Path) -> None:
    from kosmos_cli.config import Settings
    from kosmos_cli.model.loading import load_runner

    runner = load_runner(
        Settings(model=str(tiny_checkpoint), device="cpu", dtype="float32", max_new_tokens=4)
    )
    assert runner.model.config.text_config._attn_implementation == f"{slots.SLOT_ATTENTION}:sdpa"
    compiled = load_runner(
        Settings(model=str(tiny_checkpoint), device="cpu", dtype="float32", max_new_tokens=4, compile=True)
    )
    assert compiled.model.config.text_config._attn_implementation == "sdpa", "fixed batches keep their kernel"
