"""The slot KV cache and its decode attention: each row reads its own slot's filled columns."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch

from kosmos_cli.model import slots
from kosmos_cli.model.slots import GROW_COLUMNS, FixedSlots, GrowingSlots

# (heads, head_dim, each row's (slot, length)): lengths across the kernels' 64-column blocks, a head
# size that is not a power of two (the full-size model's 96), slots out of order.
CASES = [
    (2, 16, [(0, 1)]),
    (3, 96, [(4, 1), (0, 65), (2, 300)]),
    (16, 96, [(1, 64), (3, 63), (0, 128), (2, 129)]),
]
TOLERANCES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


def _triton_runs_the_kernel() -> bool:
    """Whether Triton can run the slot kernel here: compiled on a GPU, or in its interpreter from 3.9
    (3.6's interpreter, the GPU machine's, cannot take a loop bound loaded from memory)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if torch.cuda.is_available():
        return True
    import triton
    from packaging.version import Version

    return Version(triton.__version__) >= Version("3.9")


NEEDS_TRITON = pytest.mark.skipif(
    not _triton_runs_the_kernel(), reason="needs Triton on a GPU, or Triton >= 3.9's interpreter"
)


def reference(query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Each row alone over exactly its tokens, in float64: [rows, 1, heads, dim]."""
    outputs = []
    for row, (k, v) in enumerate(zip(keys, values, strict=True)):
        weights = (query[row].double() @ k.double().transpose(-1, -2) * 0.125).softmax(dim=-1)
        outputs.append((weights @ v.double()).transpose(0, 1))
    return torch.stack(outputs)


def filled(heads: int, dim: int, rows: list[tuple[int, int]], dtype: torch.dtype) -> GrowingSlots:
    """A GrowingSlots cache holding random tokens, written as a prefill and then decode steps would."""
    cache = GrowingSlots(5, layers=1, heads=heads, head_dim=dim, dtype=dtype, device="cpu")
    generator = torch.Generator().manual_seed(heads * dim)
    for slot, length in rows:
        states = torch.randn(2, 1, heads, length, dim, generator=generator).to(dtype)
        prompt = max(1, length // 2)
        cache.at([slot])
        cache.update(states[0, :, :, :prompt], states[1, :, :, :prompt], 0)
        for column in range(prompt, length):
            cache.at([slot], [column])
            cache.update(states[0, :, :, column : column + 1], states[1, :, :, column : column + 1], 0)
    return cache


@pytest.mark.parametrize(("heads", "dim", "rows"), CASES)
@pytest.mark.parametrize(("dtype", "tolerance"), TOLERANCES)
def test_growing_slots_attend_over_each_rows_own_tokens(
    heads: int, dim: int, rows: list[tuple[int, int]], dtype: torch.dtype, tolerance: float
) -> None:
    cache = filled(heads, dim, rows, dtype)
    for slot, length in rows:
        width = cache.keys[0][slot].shape[1]
        assert width == -(-length // GROW_COLUMNS) * GROW_COLUMNS, "grown a block at a time"
        assert not cache.keys[0][slot][:, length:].any() and not cache.values[0][slot][:, length:].any()
    query = torch.randn(len(rows), heads, 1, dim).to(dtype)
    cache.at([slot for slot, _ in rows], [length for _, length in rows])
    got = cache.attend(query, 0, 0.125)
    assert got.shape == (len(rows), 1, heads, dim) and got.dtype == dtype
    expected = reference(
        query,
        [cache.keys[0][slot][:, :length] for slot, length in rows],
        [cache.values[0][slot][:, :length] for slot, length in rows],
    )
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)


ON_CUDA = pytest.param(
    "cuda",
    marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
)


@NEEDS_TRITON
@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize(("heads", "dim", "rows"), CASES)
@pytest.mark.parametrize(("dtype", "tolerance"), TOLERANCES)
def test_triton_kernel_reads_each_rows_own_tokens(
    heads: int,
    dim: int,
    rows: list[tuple[int, int]],
    dtype: torch.dtype,
    tolerance: float,
    device: str,
) -> None:
    # Without a GPU, Triton's interpreter runs the kernel's own code on the CPU (conftest): CI checks it.
    cache = FixedSlots(5, layers=1, heads=heads, head_dim=dim, capacity=300, dtype=dtype, device=device)
    for layer in (*cache.keys, *cache.values):  # what lies past a row's length must not count
        layer.fill_(float("nan"))
    generator = torch.Generator().manual_seed(heads * dim)
    for slot, length in rows:
        states = torch.randn(2, 1, heads, length, dim, generator=generator).to(dtype).to(device)
        cache.at([slot])
        cache.update(states[0], states[1], 0)
    query = torch.randn(len(rows), heads, 1, dim).to(dtype).to(device)
    cache.at([slot for slot, _ in rows], [length - 1 for _, length in rows])  # the step writing each last one
    cache.update(
        *(torch.stack([cache.keys[0][slot, :, length - 1 : length] for slot, length in rows]),) * 2, 0
    )
    got = cache.attend(query, 0, 0.125)
    assert got.shape == (len(rows), 1, heads, dim) and got.dtype == dtype
    expected = reference(
        query,
        [cache.keys[0][slot, :, :length] for slot, length in rows],
        [cache.values[0][slot, :, :length] for slot, length in rows],
    )
    torch.testing.assert_close(got.double().cpu(), expected.cpu(), rtol=tolerance, atol=tolerance)


@NEEDS_TRITON
def test_the_triton_kernel_launches_on_its_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    guarded: list[torch.device] = []

    def guard(device: torch.device) -> contextlib.nullcontext[None]:
        guarded.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(slots, "device_guard", guard)
    cache = FixedSlots(2, layers=1, heads=1, head_dim=16, capacity=8, dtype=torch.float32, device="cpu")
    cache.at([1])
    cache.update(torch.ones(1, 1, 3, 16), torch.ones(1, 1, 3, 16), 0)
    cache.at([1], [3])
    query = torch.ones(1, 1, 1, 16)
    cache.update(query, query, 0)
    cache.attend(query, 0, 0.25)
    assert guarded == [query.device]


@pytest.mark.parametrize(("device", "index"), [("cuda:1", 1), (torch.device("cuda", 2), 2)])
def test_the_device_guard_makes_a_cuda_device_current(device: str | torch.device, index: int) -> None:
    guard = slots.device_guard(device)  # made without a GPU: nothing runs until it is entered
    assert isinstance(guard, torch.cuda.device) and guard.idx == index


def test_the_device_guard_does_nothing_off_cuda() -> None:
    assert isinstance(slots.device_guard("cpu"), contextlib.nullcontext)


def test_a_growing_slot_keeps_every_key_and_value_written_past_its_first_blocks() -> None:
    cache = GrowingSlots(3, layers=2, heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    generator = torch.Generator().manual_seed(7)
    prompt = torch.randn(2, 1, 2, 10, 4, generator=generator)
    cache.at([1])
    cache.update(prompt[0], prompt[1], 1)
    written = [prompt[0, 0], prompt[1, 0]]  # [heads, columns, head_dim]: what was written, kept here
    length = 3 * GROW_COLUMNS + 5  # grows three times
    for column in range(10, length):
        step = torch.randn(2, 1, 2, 1, 4, generator=generator)
        cache.at([1], [column])
        cache.update(step[0], step[1], 1)
        written = [torch.cat([written[0], step[0, 0]], dim=1), torch.cat([written[1], step[1, 0]], dim=1)]
    assert cache.lengths[1] == length
    assert torch.equal(cache.keys[1][1][:, :length], written[0])
    assert torch.equal(cache.values[1][1][:, :length], written[1])
    assert not cache.keys[1][1][:, length:].any(), "the spare columns stay zeros"


def test_slots_are_taken_and_given_back() -> None:
    cache = GrowingSlots(3, layers=1, heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    assert [cache.take(), cache.take()] == [0, 1]
    cache.at([0])
    cache.update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), 0)
    cache.release(0)
    assert cache.keys[0][0] is None, "a freed slot's memory goes back"
    assert [cache.take(), cache.take()] == [0, 2]
    with pytest.raises(IndexError):
        cache.take()


@pytest.mark.parametrize("kind", ["fixed", "growing"])
def test_a_prefill_fills_its_slots_from_column_0_and_a_step_writes_each_rows_next_column(kind: str) -> None:
    sizes = {"layers": 2, "heads": 2, "head_dim": 4, "dtype": torch.float32, "device": "cpu"}
    cache = FixedSlots(3, capacity=70, **sizes) if kind == "fixed" else GrowingSlots(3, **sizes)  # type: ignore[arg-type]

    def slot(layer: int, index: int) -> torch.Tensor:
        return cache.keys[layer][index][:, :6]

    if isinstance(cache, FixedSlots):
        for layer in (*cache.keys, *cache.values):
            layer.fill_(-1)
    prompt = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).view(2, 2, 3, 4)  # two pages, three tokens
    cache.at([2, 0])
    got = cache.update(prompt, -prompt, 1)
    assert got[0] is prompt, "a prefill attends over its own states"
    assert torch.equal(slot(1, 2)[:, :3], prompt[0]) and torch.equal(slot(1, 0)[:, :3], prompt[1])
    assert torch.equal(cache.values[1][2][:, :3], -prompt[0])
    new = torch.full((2, 2, 1, 4), 7.0)
    cache.at([0, 2], [3, 5])  # rows of different lengths
    cache.update(new, new, 1)
    assert (slot(1, 0)[:, 3] == 7).all() and (slot(1, 2)[:, 5] == 7).all()
    assert (slot(1, 0)[:, 4:] != 7).all() and (slot(1, 2)[:, 3:5] != 7).all()
    if isinstance(cache, FixedSlots):
        assert (cache.keys[0] == -1).all() and (cache.keys[1][1] == -1).all(), "only that layer and slots"
    else:
        assert cache.keys[0][1] is None and cache.keys[1][1] is None
        assert cache.lengths == [4, 0, 6]


def test_the_cpu_runner_decodes_through_slots(tiny_checkpoint: Path) -> None:
    from kosmos_cli.config import Settings
    from kosmos_cli.model.loading import load_runner

    runner = load_runner(
        Settings(model=str(tiny_checkpoint), device="cpu", dtype="float32", max_new_tokens=4)
    )
    assert runner.model.config.text_config._attn_implementation == f"{slots.SLOT_ATTENTION}:sdpa"
    assert isinstance(runner.decoder.new_cache(2)[0], GrowingSlots)
    compiled = load_runner(
        Settings(model=str(tiny_checkpoint), device="cpu", dtype="float32", max_new_tokens=4, compile=True)
    )
    assert compiled.model.config.text_config._attn_implementation == "sdpa", "fixed batches keep their kernel"
