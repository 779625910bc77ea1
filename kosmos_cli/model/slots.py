"""A KV cache of fixed page slots, and the decode attention that reads each page's own tokens only.

Every page in the running batch owns one slot: a [heads, capacity, head_dim] key and value buffer
per layer, allocated once for the run. A page joins by prefilling into a free slot and leaves by
freeing it; nothing else moves. A decode step writes each row's new token at its own length and
reads, per row, exactly the columns that row filled, so the KV bytes a step reads are the minimum
(the left-padded cache it replaced read every row up to the longest: 1.12x-1.31x, BENCHMARKS.md).

Two kernels compute that attention: on CUDA, when Triton is there, one Triton kernel for the whole
batch (a program per row and head, looping over the row's own columns with an online softmax, its
lengths read from device memory); elsewhere a loop over the rows, each a dense attention over its
slot's filled columns.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SLOT_ATTENTION = "kosmos_slots"  # the prefix of the names registered with transformers' AttentionInterface


@dataclass(frozen=True)
class SlotRead:
    """Where a decode step's rows are: each row's slot, and its length with the token being written."""

    slots: list[int]
    lengths: list[int]
    slot_index: torch.Tensor  # [rows] int64 on the cache's device
    length_index: torch.Tensor  # [rows] int32: `lengths`


class SlotCache:
    """Keys and values of `slots` pages, preallocated: per layer [slots, heads, capacity, head_dim].

    It speaks transformers' cache protocol for one forward at a time: `at` says where that forward
    writes (the joining pages' slots from column 0 for a prefill, each row's next column for a decode
    step); `update` writes there. A prefill's attention runs on the states it was given, as with a
    fresh cache; a decode step's attention gets the whole buffers and the `SlotRead` that says which
    columns are filled. On CPU `torch.empty` reserves address space only: memory is taken as pages
    fill their slots, not for the whole capacity up front.
    """

    is_compileable = False

    def __init__(
        self, *, layers: int, slots: int, heads: int, capacity: int, head_dim: int, dtype: Any, device: Any
    ):
        import torch

        shape = (slots, heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.free = list(range(slots - 1, -1, -1))  # popped from the end: slot 0 first
        self._slots: torch.Tensor | None = None
        self._start: torch.Tensor | int = 0

    @classmethod
    def for_model(cls, model: Any, *, slots: int, capacity: int, dtype: Any, device: Any) -> SlotCache:
        """An empty cache sized for `model`'s text decoder."""
        text = model.config.text_config
        heads = text.attention_heads
        return cls(
            layers=text.layers, slots=slots, heads=heads, capacity=capacity,
            head_dim=text.embed_dim // heads, dtype=dtype, device=device,
        )  # fmt: skip

    @property
    def slots(self) -> int:
        """How many pages the cache holds."""
        return self.keys[0].shape[0]

    def take(self) -> int:
        """Return a free slot, now in use."""
        return self.free.pop()

    def release(self, slot: int) -> None:
        """Give a slot back; its columns are written again before they are read."""
        self.free.append(slot)

    def at(self, slots: torch.Tensor, start: torch.Tensor | int) -> None:
        """Say where the next forward writes: `slots` [rows], from column `start` (one per row, or 0)."""
        self._slots, self._start = slots, start

    # --- transformers' cache protocol, as the text decoder calls it ---------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a forward's new keys and values; return what its attention reads."""
        assert self._slots is not None
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if isinstance(self._start, int):  # a prefill: whole prompts, from column start
            end = self._start + key_states.shape[2]
            keys[self._slots, :, self._start : end] = key_states
            values[self._slots, :, self._start : end] = value_states
            return key_states, value_states
        keys[self._slots, :, self._start] = key_states[:, :, 0]  # a decode step: one column per row
        values[self._slots, :, self._start] = value_states[:, :, 0]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """0: a prefill starts the page's slot; decode steps pass their positions themselves."""
        return 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query: Any, layer_idx: int = 0) -> tuple[int, int]:
        """A prefill attends over its own tokens (a decode step's mask is unused: `SlotRead` says)."""
        length = query if isinstance(query, int) else query.shape[0]
        return length, 0


def use_slot_attention(model: Any) -> str:
    """Make the text decoder's attention read a `SlotCache` in decode steps; everything else as it was.

    The decoder's own kernel (`sdpa`, `eager`, `flash_attention_2`) and its mask still serve prompts
    and fixed batches; a forward that passes `slot_read=` gets `slot_attention`. Returns the name
    registered, `kosmos_slots:<kernel>`.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    text = model.config.text_config
    base = text._attn_implementation
    if base.startswith(SLOT_ATTENTION):
        return base
    name = f"{SLOT_ATTENTION}:{base}"
    AttentionInterface.register(
        name, functools.partial(_attention, ALL_ATTENTION_FUNCTIONS.get_interface(base, None))
    )
    if base in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation({"text_config": name})
    return name


def _attention(
    base: Any,
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    *,
    slot_read: SlotRead | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if slot_read is None:
        return base(module, query, key, value, attention_mask, **kwargs)
    return slot_attention(query, key, value, slot_read, scaling=kwargs.get("scaling")), None


def slot_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    read: SlotRead,
    *,
    scaling: float | None = None,
) -> torch.Tensor:
    """Attention of one new token per row over its own slot's filled columns: [rows, 1, heads, head_dim].

    `query` is [rows, heads, 1, head_dim]; `keys` and `values` are the cache's [slots, heads, capacity,
    head_dim] buffers. Scores and softmax are float32 in both kernels.
    """
    if query.is_cuda and triton_available():
        return _triton_attention(query, keys, values, read, scaling)
    return _row_attention(query, keys, values, read, scaling)


def _row_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, read: SlotRead, scaling: float | None
) -> torch.Tensor:
    """One dense attention per row over its slot's first `length` columns (CPU, and GPUs without Triton).

    float32 runs torch's SDPA, which gives the same values as a page decoding alone; in bf16 and fp16
    two matmuls and a float32 softmax, which ran 1.8x faster than SDPA's CPU kernel for one query
    (BENCHMARKS.md).
    """
    import torch

    outputs = []
    for row, (slot, length) in enumerate(zip(read.slots, read.lengths, strict=True)):
        q, k, v = query[row], keys[slot, :, :length], values[slot, :, :length]
        if q.dtype == torch.float32:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scaling)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)).float()
            if scaling is not None:
                scores *= scaling
            out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
        outputs.append(out)
    return torch.stack(outputs).transpose(1, 2)


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it ships with torch's CUDA wheels on Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, read: SlotRead, scaling: float | None
) -> torch.Tensor:
    """The whole batch's decode attention in one Triton kernel launch."""
    import torch
    import triton

    rows, heads, _, head_dim = query.shape
    out = torch.empty((rows, heads, head_dim), dtype=query.dtype, device=query.device)
    q = query[:, :, 0]
    _decode_kernel()[(rows, heads)](
        q, keys, values, out, read.slot_index, read.length_index,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        out.stride(0), out.stride(1),
        1.0 if scaling is None else float(scaling), head_dim,
        BLOCK_N=64, BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
    return out[:, None]


@functools.cache
def _decode_kernel() -> Any:
    """Build (once) the Triton kernel: one program per (row, head), an online softmax over its columns."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode(
        q, keys, values, out, slots, lengths,
        q_row, q_head, kv_slot, kv_head, kv_column, out_row, out_head,
        scaling, head_dim,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        head = tl.program_id(1)
        slot = tl.load(slots + row).to(tl.int64)
        length = tl.load(lengths + row)
        dims = tl.arange(0, BLOCK_D)
        in_head = dims < head_dim
        query = tl.load(q + row * q_row + head * q_head + dims, mask=in_head, other=0.0).to(tl.float32)
        base = slot * kv_slot + head * kv_head
        best = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for start in range(0, length, BLOCK_N):
            columns = start + tl.arange(0, BLOCK_N)
            filled = columns < length
            where = base + columns[:, None] * kv_column + dims[None, :]
            inside = filled[:, None] & in_head[None, :]
            k = tl.load(keys + where, mask=inside, other=0.0).to(tl.float32)
            scores = tl.sum(k * query[None, :], axis=1) * scaling
            scores = tl.where(filled, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            weights = tl.exp(scores - new_best)
            rescale = tl.exp(best - new_best)
            v = tl.load(values + where, mask=inside, other=0.0).to(tl.float32)
            acc = acc * rescale + tl.sum(weights[:, None] * v, axis=0)
            total = total * rescale + tl.sum(weights, axis=0)
            best = new_best
        result = acc / total
        tl.store(out + row * out_row + head * out_head + dims, result.to(out.dtype.element_ty), mask=in_head)

    return decode
