"""A KV cache of page slots, and the decode attention that reads each page's own tokens only.

Every page in the running batch owns one slot of the cache for as long as it decodes. A page joins
by prefilling into a free slot and leaves by freeing it; nothing else moves (the left-padded cache
this replaced copied the whole cache at every join). A decode step writes each row's new token at
its own length and reads, per row, only the columns that row filled, so the KV bytes a step reads
stay at the minimum (the left-padded cache read every row up to the longest: 1.12x-1.31x the
minimum over a mix of page lengths, BENCHMARKS.md).

Two kinds of slot, one per kernel:
- `FixedSlots` (CUDA with Triton): preallocated [slots, heads, capacity, head_dim] buffers, read by
  one Triton kernel for the whole batch, a program per row and head looping over the row's own
  columns with an online softmax; slots and lengths come from device memory, so the step's shapes
  stay fixed as pages come and go.
- `GrowingSlots` (CPU, and devices without Triton): a contiguous buffer per slot that grows with its
  page, read by two matmuls per row.
"""

from __future__ import annotations

import contextlib
import functools
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from kosmos_cli.model.attention import recorder

if TYPE_CHECKING:
    import torch

    from kosmos_cli.model.attention import Recorder

SLOT_ATTENTION = "kosmos_slots"  # the prefix of the names registered with transformers' AttentionInterface
GROW_COLUMNS = 64  # a GrowingSlots buffer grows this many columns at a time


class SlotCache:
    """The KV cache of `slots` pages, each page in a slot of its own (`for_model` picks the kind).

    It speaks transformers' cache protocol for one forward at a time: `at` says where that forward
    writes (the joining pages' slots from column 0 for a prefill, each row's next column for a decode
    step), `update` writes there, and a prefill's attention runs on the states it was given, as with a
    fresh cache. A decode step's attention (`attend`) reads each row's own slot.
    """

    is_compileable = False

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.free = list(range(slots - 1, -1, -1))  # popped from the end: slot 0 first
        self.rows: list[int] = []  # the slots the next forward writes, one per row
        self.columns: list[int] | None = None  # and where, for a decode step (None: a prefill, from 0)

    @staticmethod
    def for_model(model: Any, *, slots: int, capacity: int, dtype: Any, device: str) -> SlotCache:
        """An empty cache for `model`'s text decoder: `FixedSlots` where Triton reads them (CUDA),
        else `GrowingSlots`."""
        text = model.config.text_config
        heads = text.attention_heads
        shape = {"layers": text.layers, "heads": heads, "head_dim": text.embed_dim // heads}
        if fixed_slots(device):
            return FixedSlots(slots, capacity=capacity, dtype=dtype, device=device, **shape)
        return GrowingSlots(slots, dtype=dtype, device=device, **shape)

    def take(self) -> int:
        """Return a free slot, now in use."""
        return self.free.pop()

    def release(self, slot: int) -> None:
        """Give a slot back; its columns are written again before they are read."""
        self.free.append(slot)

    def at(self, slots: list[int], columns: list[int] | None = None) -> None:
        """Say where the next forward writes: `slots` from column 0 (a prefill), or each row's `columns`."""
        self.rows, self.columns = slots, columns

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a forward's new keys and values where `at` said; return them (a prefill attends to them)."""
        if self.columns is None:
            self._write_prompts(layer_idx, key_states, value_states)
        else:
            self._write_step(layer_idx, key_states[:, :, 0], value_states[:, :, 0])
        return key_states, value_states

    def attend(
        self, query: torch.Tensor, layer: int, scaling: float | None, looking: Recorder | None = None
    ) -> torch.Tensor:
        """A decode step's attention: each row's one query over its own slot, [rows, 1, heads, head_dim].

        With `looking` (`--attention`), each row's softmax weights over the image slots go to it too.
        """
        raise NotImplementedError

    def _write_prompts(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def _write_step(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise NotImplementedError

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """0: a prefill starts its pages' slots; decode steps pass their positions themselves."""
        return 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query: Any, layer_idx: int = 0) -> tuple[int, int]:
        """A prefill attends over its own tokens (a decode step's mask is unused: `attend` reads slots)."""
        length = query if isinstance(query, int) else query.shape[0]
        return length, 0


class FixedSlots(SlotCache):
    """Slots preallocated once: per layer [slots, heads, capacity, head_dim] keys and values.

    Read by one Triton kernel for the whole batch, which takes each row's slot and length from device
    memory: a decode step's shapes do not change as pages join and leave.
    """

    def __init__(
        self, slots: int, *, layers: int, heads: int, head_dim: int, capacity: int, dtype: Any, device: str
    ) -> None:
        import torch

        super().__init__(slots)
        shape = (slots, heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._device = device
        self._slot_index: torch.Tensor | None = None
        self._column_index: torch.Tensor | None = None

    def at(self, slots: list[int], columns: list[int] | None = None) -> None:
        import torch

        super().at(slots, columns)
        self._slot_index = torch.tensor(slots, device=self._device)
        self._column_index = None if columns is None else torch.tensor(columns, device=self._device)

    def at_every_slot(self, slots: torch.Tensor, columns: torch.Tensor) -> None:
        """Say that the next forwards are decode steps of every slot, row i in slot `slots[i]`, writing
        at `columns[i]`: tensors the caller owns and fills before each (a step captured as a CUDA
        graph), read as they are, never copied."""
        SlotCache.at(self, list(range(self.slots)), [])
        self._slot_index, self._column_index = slots, columns

    def _write_prompts(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        length = keys.shape[2]
        self.keys[layer][self._slot_index, :, :length] = keys.to(self.keys[layer].dtype)
        self.values[layer][self._slot_index, :, :length] = values.to(self.values[layer].dtype)

    def _write_step(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys[layer][self._slot_index, :, self._column_index] = keys.to(self.keys[layer].dtype)
        self.values[layer][self._slot_index, :, self._column_index] = values.to(self.values[layer].dtype)

    def attend(
        self, query: torch.Tensor, layer: int, scaling: float | None, looking: Recorder | None = None
    ) -> torch.Tensor:
        assert self._slot_index is not None and self._column_index is not None
        lengths = (self._column_index + 1).int()
        if looking is not None and looking.wants(layer):
            looking.keep(layer, self._weights(query, layer, lengths, scaling))
        return _triton_attention(
            query, self.keys[layer], self.values[layer], self._slot_index, lengths, scaling
        )

    def _weights(
        self, query: torch.Tensor, layer: int, lengths: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        """Each row's softmax weights over its own columns, [rows, heads, columns] in float32 (the
        kernel keeps none): the columns past a row's length get none."""
        import torch

        width = int(lengths.max())
        keys = self.keys[layer][self._slot_index, :, :width].float()
        scores = torch.matmul(query.float(), keys.transpose(-1, -2))[:, :, 0]
        if scaling is not None:
            scores *= scaling
        past = torch.arange(width, device=scores.device)[None, None, :] >= lengths[:, None, None]
        return scores.masked_fill(past, float("-inf")).softmax(dim=-1)


class GrowingSlots(SlotCache):
    """Slots whose buffers grow with their page: per layer and slot one [heads, width, head_dim] tensor.

    The width is the page's tokens rounded up to `GROW_COLUMNS`, the spare columns zeros, so each
    row's attention is two matmuls over one contiguous buffer: on CPU a bf16 matmul over the first
    columns of a larger buffer copies them first, 2.0-2.3x the time for a row of 2,100 tokens
    (`benchmarks/attention.py`, BENCHMARKS.md). The spare columns cost at most GROW_COLUMNS - 1
    columns a row; growing copies a slot once every GROW_COLUMNS tokens. Memory is taken as pages
    grow, not for the whole budget.
    """

    def __init__(
        self, slots: int, *, layers: int, heads: int, head_dim: int, dtype: Any, device: str
    ) -> None:
        super().__init__(slots)
        self.keys: list[list[Any]] = [[None] * slots for _ in range(layers)]
        self.values: list[list[Any]] = [[None] * slots for _ in range(layers)]
        self.lengths = [0] * slots
        self._shape, self._dtype, self._device = (heads, head_dim), dtype, device

    def release(self, slot: int) -> None:
        for layer in (*self.keys, *self.values):
            layer[slot] = None  # its memory goes back at once
        super().release(slot)

    def _write_prompts(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        length = keys.shape[2]
        for row, slot in enumerate(self.rows):
            for buffers, states in ((self.keys[layer], keys), (self.values[layer], values)):
                buffer = self._new_buffer(length)
                buffer[:, :length] = states[row]
                buffers[slot] = buffer
            self.lengths[slot] = length

    def _write_step(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        assert self.columns is not None
        for row, (slot, column) in enumerate(zip(self.rows, self.columns, strict=True)):
            for buffers, states in ((self.keys[layer], keys), (self.values[layer], values)):
                buffer = buffers[slot]
                if column >= buffer.shape[1]:
                    grown = self._new_buffer(column + 1)
                    grown[:, :column] = buffer[:, :column]
                    buffers[slot] = buffer = grown
                buffer[:, column] = states[row]
            self.lengths[slot] = column + 1

    def _new_buffer(self, length: int) -> torch.Tensor:
        import torch

        width = -(-length // GROW_COLUMNS) * GROW_COLUMNS
        return torch.zeros((self._shape[0], width, self._shape[1]), dtype=self._dtype, device=self._device)

    def attend(
        self, query: torch.Tensor, layer: int, scaling: float | None, looking: Recorder | None = None
    ) -> torch.Tensor:
        kept: list[torch.Tensor] | None = [] if looking is not None and looking.wants(layer) else None
        output = _row_attention(
            query,
            [self.keys[layer][slot] for slot in self.rows],
            [self.values[layer][slot] for slot in self.rows],
            [self.lengths[slot] for slot in self.rows],
            scaling,
            kept,
        )
        if looking is not None and kept is not None:
            import torch

            looking.keep(layer, torch.stack(kept))
        return output


def use_slot_attention(model: Any) -> str:
    """Make the text decoder's attention read a `SlotCache` in decode steps; everything else as it was.

    The decoder's own kernel (`sdpa`, `eager`, `flash_attention_2`) and its mask still serve prompts
    and fixed batches; a forward that passes `slot_cache=` gets its `attend`. Returns the name
    registered, `kosmos_slots:<kernel>`.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.kosmos2_5.modeling_kosmos2_5 import eager_attention_forward

    text = model.config.text_config
    base = text._attn_implementation
    if base.startswith(SLOT_ATTENTION):
        return base
    name = f"{SLOT_ATTENTION}:{base}"
    AttentionInterface.register(
        name,
        functools.partial(_attention, ALL_ATTENTION_FUNCTIONS.get_interface(base, eager_attention_forward)),
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
    slot_cache: SlotCache | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    looking = recorder()
    if slot_cache is None:
        output = base(module, query, key, value, attention_mask, **kwargs)
        if looking is not None:  # a prompt: the projection's weights, each page's last prompt row
            looking.see(module.layer_idx, query, key, kwargs.get("scaling"))
        return output
    return slot_cache.attend(query, module.layer_idx, kwargs.get("scaling"), looking), None


def _row_attention(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    lengths: list[int],
    scaling: float | None,
    kept: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each row's query over its own whole [heads, width, head_dim] buffers, the first `length` columns
    filled and the rest zeros: two matmuls, the softmax in float32 over the filled columns.

    With `kept`, each row's float32 weights over the prompt's columns, [heads, prompt], are appended
    to it (`--attention`: what the row loop computed anyway).

    `query` is [rows, heads, 1, head_dim]; the result [rows, 1, heads, head_dim]. Scores are rounded
    to the weights' dtype before the softmax, as transformers' eager attention does.
    """
    import torch

    outputs = []
    for row, (k, v, length) in enumerate(zip(keys, values, lengths, strict=True)):
        q = query[row]
        if k.dtype != q.dtype:  # --kv-dtype: a smaller cache, computed in the weights' dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
        scores = torch.matmul(q, k.transpose(-1, -2))[..., :length].float()
        if scaling is not None:
            scores *= scaling
        weights = scores.softmax(dim=-1)
        if kept is not None:
            kept.append(weights[:, 0, : min(lengths)])
        weights = weights.to(v.dtype)
        if v.shape[1] > length:  # the spare columns are zeros and get no weight
            weights = torch.nn.functional.pad(weights, (0, v.shape[1] - length))
        outputs.append(torch.matmul(weights, v))
    return torch.stack(outputs).transpose(1, 2)


def fixed_slots(device: str) -> bool:
    """Whether a cache on `device` is `FixedSlots`, read by the Triton kernel (CUDA with Triton).

    Only there can a decode step keep its shapes as pages come and go, so only there can
    `--cuda-graph` capture it.
    """
    return device.startswith("cuda") and triton_available()


def device_guard(device: str | torch.device) -> AbstractContextManager[Any]:
    """Make `device` the current CUDA device inside the block (a no-op elsewhere).

    Kernel launches, streams and graph captures use the current device, not their tensors': without
    this, `--device cuda:1` would launch on device 0.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported (it ships with torch's CUDA wheels on Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """The whole batch's decode attention in one Triton kernel launch: row i reads the first
    `lengths[i]` columns of slot `slots[i]` of the [slots, heads, capacity, head_dim] buffers."""
    import torch
    import triton

    rows, heads, _, head_dim = query.shape
    out = torch.empty((rows, heads, head_dim), dtype=query.dtype, device=query.device)
    q = query[:, :, 0]
    with device_guard(query.device):  # Triton launches on the current device's stream, not the tensors'
        _decode_kernel()[(rows, heads)](
            q, keys, values, out, slots, lengths,
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
    def decode(  # type: ignore[no-untyped-def]
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
