"""What kosmos changes in a loaded model: vision attention, oneDNN linears, int8, a longer position table."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kosmos_cli.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
INT8_PREFIX = "text_model."  # the modules --quantize int8 quantizes: the decoder and its LM head
_MADV_DONTNEED = 4  # Linux's madvise advice: drop these pages (a file mapping reads them again)


def fit_positions(model: Any, tokens: int) -> None:
    """Grow the sinusoidal position table to cover `tokens` per sequence (a compiled step cannot grow it)."""
    table = model.text_model.model.embed_positions
    needed = table.padding_idx + 1 + tokens
    if needed > table.weights.shape[0]:
        table.make_weights(needed + table.offset, table.embedding_dim, table.padding_idx)


def use_sdpa_in_vision(model: Any) -> None:
    """Make the vision encoder's attention use SDPA, as the text model already does.

    transformers 5.23 `Kosmos2_5VisionAttention.forward` looks its kernel up with
    `getattr(ALL_ATTENTION_FUNCTIONS, name, eager_attention_forward)` on a mapping, so it always falls
    back to eager attention: 18 layers x heads x 4096 x 4096 fp32 scores per page. Patched per model
    instance (not in the transformers module), so other models in the process are untouched.
    """
    import types

    from transformers.models.kosmos2_5 import modeling_kosmos2_5

    for module in model.vision_model.modules():
        if isinstance(module, modeling_kosmos2_5.Kosmos2_5VisionAttention):
            module.forward = types.MethodType(_vision_attention_sdpa, module)  # type: ignore[method-assign]


def _vision_attention_sdpa(
    self: Any, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """Kosmos2_5VisionAttention.forward with torch's scaled_dot_product_attention."""
    import torch

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
    if attention_mask is not None:
        attention_mask = attention_mask.to(query.dtype)  # additive: 0 on patches, dtype min on padding
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=self.scaling
    )
    return self.output(output.transpose(1, 2).reshape(*input_shape, -1)), None


def use_onednn_linears(model: Any) -> int:
    """Run every fp32 (and natively supported bf16) nn.Linear through oneDNN with a prepacked weight.

    On CPU, torch's fp32 `F.linear` goes to MKL, whose skinny GEMMs (2 to 8 rows: a decode step
    of a small batch) run at a fraction of its one-row speed, so batching decode gained nothing.
    oneDNN's `_linear_pointwise` on a prepacked weight (the kernel inductor uses on CPU) measured
    2-4x faster for those shapes and ~20% faster for prefill (BENCHMARKS.md). Results agree with
    MKL's to float32 rounding. Returns how many layers were swapped.
    """
    import torch

    mkldnn = torch.ops.mkldnn
    if not (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_linear_pointwise")
        and hasattr(mkldnn, "_reorder_linear_weight")
    ):
        return 0
    dtypes = {torch.float32, torch.bfloat16} if native_bf16_cpu() else {torch.float32}
    layer_class = _onednn_linear_class()
    mapped = checkpoint_mappings()
    # By name, holding no module: each replaced layer's weight is freed as soon as it is packed (a list
    # of the modules kept every original alive until the end: bf16 loading peaked at the weights twice).
    names = [
        name
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and module.weight.dtype in dtypes
    ]
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        weight = getattr(parent, child_name).weight
        setattr(parent, child_name, layer_class(getattr(parent, child_name)))
        release_file_pages(weight, mapped)
        del weight
    return len(names)


@functools.cache
def _onednn_linear_class() -> type:
    """Build (once) the nn.Module that replaces an nn.Linear on CPU."""
    import torch

    class OneDnnLinear(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight = None  # the packed weight is opaque; modules that peek at `.weight` skip a None
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            self.register_buffer("packed_weight", packed, persistent=False)
            bias = None if linear.bias is None else linear.bias.detach()
            self.register_buffer("bias", bias, persistent=False)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(
                hidden_states, self.packed_weight, self.bias, "none", [], ""
            )

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN"

    return OneDnnLinear


def own_weights(model: Any) -> None:
    """Copy the weights still read from the checkpoint's memory map into process memory.

    After the linear layers were repacked (oneDNN) or quantized, the rest of the weights (embeddings,
    norms) still point into the memory-mapped safetensors files, which keeps the whole mapping, and
    every page of it read during conversion, resident: 5.5 GB counted twice in RSS. Copying the rest
    (about 0.7 GB) lets the mapping go.
    """
    import itertools

    import torch

    mapped = checkpoint_mappings()
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.device.type == "cpu" and not tensor.is_mkldnn and _in_mapping(tensor, mapped):
                mapped_data = tensor.data
                tensor.data = mapped_data.clone()
                release_file_pages(mapped_data, mapped)


def cast_weights(model: Any, dtype: Any) -> None:
    """Cast a model's floating-point weights to `dtype` one tensor at a time, dropping each original's
    pages of the memory-mapped checkpoint as soon as it is copied.

    transformers converts a float32 checkpoint to bf16 while loading, and every float32 page it read
    stays resident until the end: loading in bf16 peaked at 7.9 GiB for 2.55 GiB of weights
    (BENCHMARKS.md). Loading the checkpoint as it is stored (memory-mapped, nothing read yet) and
    casting here rounds every value the same way (round to nearest even) and peaks at about the
    cast weights' size.
    """
    import itertools

    import torch

    mapped = checkpoint_mappings()
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.is_floating_point() and tensor.dtype != dtype:
                stored = tensor.data
                tensor.data = stored.to(dtype)
                release_file_pages(stored, mapped)
    for config in (model.config, *(getattr(model.config, name) for name in model.config.sub_configs)):
        config.dtype = dtype


def checkpoint_mappings() -> list[tuple[int, int]]:
    """Return the address ranges where this process maps checkpoint files (`*.safetensors`); [] off Linux."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def release_file_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop from memory the pages of a weight read from a memory-mapped checkpoint, once it was copied.

    transformers maps the safetensors files and leaves the weights pointing into the mapping; every
    page a conversion reads (oneDNN packing, int8) then stays resident, so loading used to peak at
    the weights twice over (BENCHMARKS.md). Only whole pages inside the tensor and inside a file
    mapping (`mapped`) are dropped (madvise MADV_DONTNEED): a tensor that still points there reads the
    file's bytes again, unchanged. Anywhere else this does nothing.
    """
    import ctypes
    import mmap

    if tensor.device.type != "cpu" or tensor.is_mkldnn or not _in_mapping(tensor, mapped):
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def _in_mapping(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> bool:
    """Whether a CPU tensor's bytes lie inside one of the checkpoint file mappings `mapped`."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(low <= start and end <= high for low, high in mapped)


def trim_heap() -> None:
    """Hand the C heap's free memory back to the system (glibc's `malloc_trim`; elsewhere nothing).

    Casting and repacking free hundreds of weight-sized blocks; glibc keeps blocks under its mmap
    threshold (raised to 32 MiB by the first large free) in the heap, so 1.5 GiB freed while loading
    in bf16 stayed in RSS until trimmed (BENCHMARKS.md).
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def quantize_int8(model: Any) -> None:
    """Make the text decoder's linear layers dynamic int8: per-channel int8 weights, activations per batch.

    The vision encoder and the image projection stay float32: they run once per page, and on the tiny
    image-sensitive model quantizing them too cut the pages token-identical to float32 from 12 of 16 to 3;
    per-tensor weights (one scale for a whole matrix) cut them to 8. The decoder's layers and the LM head
    are what every generated token reads. torch.ao's quantized kernels (fbgemm/x86) ran a 4-row decode
    matmul 2x faster than bf16 on oneDNN; torchao's int8 configs ran 50-100x slower than that without
    torch.compile on this CPU (BENCHMARKS.md).
    """
    import torch

    try:
        quantization = torch.ao.quantization
    except AttributeError as error:  # deprecated since torch 2.10 in favour of torchao; not removed yet
        raise ModelLoadError(
            "this torch has no dynamic int8 quantization (torch.ao.quantization)", hint="drop --quantize"
        ) from error
    layers = {
        name: quantization.per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.startswith(INT8_PREFIX)
    }
    with torch.no_grad():  # packed int8 layers keep the float bias as it is: copy it off the memory map
        for name in layers:
            bias = model.get_submodule(name).bias
            if bias is not None:
                bias.data = bias.data.clone()
    weights = [model.get_submodule(name).weight for name in layers]
    with warnings.catch_warnings():  # deprecated in favour of torchao, whose CPU int8 is slower (above)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantization.quantize_dynamic(model, layers, dtype=torch.qint8, inplace=True)
    mapped = checkpoint_mappings()
    for weight in weights:
        release_file_pages(weight, mapped)


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX) and oneDNN can use them."""
    import torch

    cpu = torch.cpu
    native = any(
        getattr(cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return native and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
