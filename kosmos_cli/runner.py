"""Load Kosmos-2.5 and generate text for batches of images; the only module that imports torch."""

from __future__ import annotations

import functools
import logging
import math
import os
import pickle
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kosmos_cli.errors import GenerationError, ModelLoadError
from kosmos_cli.repetition import Decode, Loop, LoopDetector, LoopRule, find_loop
from kosmos_cli.values import Finish, Generation, Task

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "microsoft/kosmos-2.5"
MODEL_ENV = "KOSMOS_MODEL"  # overrides DEFAULT_MODEL
MODEL_TYPE = "kosmos-2.5"  # config.json model_type of every Kosmos-2.5 checkpoint
TASK_PROMPTS = {Task.MD: "<md>", Task.OCR: "<ocr>"}
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")
QUANTIZATIONS = ("int8",)
INT8_PREFIX = "text_model."  # the modules --quantize int8 quantizes: the decoder and its LM head
# The reference's budget: microsoft/unilm kosmos-2.5/inference.py generates up to max_len_b=4000 new
# tokens. A dense OCR page costs about 24 tokens a line, so 2,044 (what the 4096-row position table
# leaves after the 2052-token prompt) cut pages of more than about 85 lines; the sinusoidal table is
# grown to fit instead (`fit_positions`).
DEFAULT_MAX_NEW_TOKENS = 4000
GROW_COLUMNS = 256  # spare KV cache columns allocated at a time while decoding
CPU_BATCH_SIZE = 4  # pages decoding together on CPU: a step of 4 costs 1.8x a step of 1 (BENCHMARKS.md)
CPU_MEMORY_SHARE = 0.5  # of available RAM given to the KV cache
CUDA_MAX_BATCH_SIZE = 64
CUDA_MEMORY_SHARE = 0.7  # of free GPU memory given to the KV cache
KV_BYTES_PER_TOKEN_PER_DTYPE_BYTE = 24 * 2 * 1536  # layers x (key, value) x embed_dim
ENCODE_WORKERS = 4  # processor threads on GPU machines (one on CPU, where cores are busy decoding)
REFILL_SHARE = 8  # a batch of B refills once B / REFILL_SHARE rows are free (every row on CPU)
CPU_DECODE_ATTENTION = "kosmos_cpu_decode"  # registered with transformers' AttentionInterface
HUB_CONNECT_TIMEOUT = 5.0  # seconds to open a connection to the hub before calling it unreachable
LOAD_HINT = "download it once with `kosmos download` (needs network), or pass a local folder with --model"


def output_settings(settings: Settings, *, resolve: bool = True) -> dict[str, Any]:
    """Return every model setting that changes outputs, resolved as `load_runner` resolves it.

    The model is named by what is in it: a hub model by the cached snapshot's commit, a folder by
    its files' names, sizes and modification times, so new weights in the same folder count as a
    change. Resolving the device and dtype imports torch but loads nothing; `resolve=False` keeps
    them as asked (a Ray driver may have no GPU of its own).
    """
    dtype, attn = settings.dtype, settings.attn
    if resolve:
        device = resolve_device(settings.device)
        resolved = resolve_dtype(settings.dtype, device, quantize=settings.quantize)
        dtype, attn = str(resolved).removeprefix("torch."), resolve_attn(settings.attn, device, resolved)
    return {
        "model": model_identity(settings.model, settings.revision),
        "dtype": dtype,
        "attn": attn,
        "quantize": settings.quantize,
        "max_new_tokens": settings.max_new_tokens,
        "compile": settings.compile,
        "detect_loops": settings.detect_loops,
    }


def model_identity(model: str, revision: str | None) -> str:
    """Name a checkpoint by its contents where they can be seen without loading it."""
    import hashlib

    folder = Path(model)
    if folder.is_dir():
        files = sorted(path for path in folder.iterdir() if path.is_file())
        listing = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files]
        return "folder:" + hashlib.sha256(repr(listing).encode()).hexdigest()[:32]
    cached = cached_model_path(model, revision=revision)
    return f"{model}@{cached.name if cached is not None else revision or 'main'}"


def cache_argument(model: Any) -> str:
    """Name the forward argument that takes the KV cache: `cache` from transformers 5.24 on.

    5.24 renamed `past_key_values` and warns on every call that passes it (removal in 5.40); the
    oldest transformers kosmos supports (5.20) knows only the old name.
    """
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def default_model() -> str:
    """Return the model named by `KOSMOS_MODEL`, else the hub default."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


@dataclass(frozen=True)
class Request:
    """One image to transcribe; `key` is the caller's handle, returned untouched."""

    key: object
    image: Image.Image
    task: Task


class Runner(Protocol):
    """Turns requests into generations, in any order, one answer per request."""

    max_new_tokens: int

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Yield each request with its generation, or the error that stopped it."""
        ...


@dataclass(frozen=True)
class Settings:
    """How to load the model and generate; fields have a CLI option of the same name unless noted."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"
    batch_size: int | None = None  # None: chosen from the device and its free memory
    max_new_tokens: int | None = None  # None: what the position table allows after the prompt
    compile: bool = False  # static KV cache + torch.compile'd decode, in fixed batches (GPU)
    quantize: str | None = None  # "int8": dynamic int8 nn.Linear layers (CPU only)
    threads: int | None = None  # CPU threads; None: the cores this process may run on
    detect_loops: bool = True  # stop a page whose output repeats itself (no CLI option)
    ignore_eos: bool = False  # benchmarks only: always generate max_new_tokens (no CLI option)


class KosmosRunner:
    """A loaded Kosmos-2.5 model and processor with greedy, continuously batched generation."""

    def __init__(self, *, model: Any, processor: Any, settings: Settings, device: str, dtype: Any) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.prompt_length = processor.num_image_tokens + 4  # <s> <image> ... </image> <task>
        self.max_new_tokens = settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        self.batch_size = settings.batch_size or default_batch_size(
            device, dtype, self.prompt_length + self.max_new_tokens
        )
        self.eos_id = int(model.generation_config.eos_token_id)
        self.pad_id = int(model.config.text_config.pad_token_id)
        self.loop_rule = LoopRule() if settings.detect_loops else None
        self.decode_raw = functools.partial(processor.tokenizer.decode, skip_special_tokens=False)
        self.cache_argument = cache_argument(model)

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Yield each request with its generation (or error) as soon as its page is done."""
        workers = 1 if self.device == "cpu" else min(ENCODE_WORKERS, available_cores())
        pages = _Encoder(self, requests, depth=self.batch_size + 1, workers=workers)
        try:
            if self.settings.compile:
                yield from self._generate_fixed(pages)
            else:
                yield from self._generate_continuous(pages)
        finally:
            pages.close()

    # --- preprocessing (runs in _Encoder's worker threads, overlapping decode) -----------------

    def encode(self, request: Request) -> _Encoded:
        """Run the processor on one request: flattened patches, prompt ids and the resized size."""
        inputs = self.processor(
            text=[TASK_PROMPTS[request.task]], images=[request.image], return_tensors="pt"
        )
        resized = (int(inputs.pop("width")[0]), int(inputs.pop("height")[0]))
        inputs["flattened_patches"] = inputs["flattened_patches"].to(self.dtype)
        return _Encoded(dict(inputs), resized)

    # --- continuous batching (default) -------------------------------------------------------------

    def _generate_continuous(self, pages: _Encoder) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Keep up to `batch_size` pages decoding; a finished page leaves, the next page joins."""
        batch = _Batch()
        waiting: deque[tuple[Request, _Encoded]] = deque()  # pages to (re)start before new ones
        limit = self.batch_size
        refill_min = default_refill_min(self.device, limit)
        while True:
            free = limit - len(batch.rows)
            if free > 0 and (not batch.rows or free >= refill_min or pages.exhausted):
                joining = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                wait_for = 0 if batch.rows or joining else 1  # never stall running rows on rendering
                for request, encoded in pages.take(free - len(joining), wait_for=wait_for):
                    if isinstance(encoded, GenerationError):
                        yield request, encoded
                    else:
                        joining.append((request, encoded))
                try:
                    if joining:
                        yield from self._join(batch, joining)
                except _NoRoom as no_room:  # widening the cache failed half way: start again smaller
                    waiting.extendleft(reversed(no_room.pages))
                    limit = self._restart(batch, waiting, no_room.error, limit)
            if not batch.rows:
                if pages.exhausted and not waiting:
                    return
                continue
            try:
                tokens = self._decode_step(batch)
            except Exception as error:  # one place that turns a failing step into a retry or per-page errors
                if len(batch.rows) == 1:
                    row = batch.rows[0]
                    batch.clear()
                    yield row.request, _page_error(error)
                    continue
                limit = self._restart(batch, waiting, error, limit)
                continue
            yield from self._advance(batch, tokens)

    def _join(
        self, batch: _Batch, joining: list[tuple[Request, _Encoded]]
    ) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Prefill new pages and merge them into the running batch; raise _NoRoom if merging fails."""
        parts: list[_Batch] = []
        yield from self._prefill_parts(joining, parts)
        for index, part in enumerate(parts):
            assert part.tokens is not None
            first = part.tokens.tolist()
            try:
                batch.merge(part)
            except Exception as error:
                if not _is_out_of_memory(error):
                    raise
                unmerged = [(row.request, row.encoded) for later in parts[index:] for row in later.rows]
                raise _NoRoom(unmerged, error) from error
            yield from self._advance(batch, first, rows_from=len(batch.rows) - len(part.rows))

    def _prefill_parts(
        self, joining: list[tuple[Request, _Encoded]], parts: list[_Batch]
    ) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Prefill pages together, halving the group when it fails; a page failing alone is an error."""
        try:
            cache, mask, first = self._prefill([encoded for _, encoded in joining])
        except Exception as error:  # one place that turns a failing prefill into per-page errors
            if len(joining) == 1:
                yield joining[0][0], _page_error(error)
                return
            logger.warning(
                "prefill of %d pages failed (%s); retrying in halves", len(joining), _describe(error)
            )
            _release_memory()
            half = len(joining) // 2
            yield from self._prefill_parts(joining[:half], parts)
            yield from self._prefill_parts(joining[half:], parts)
            return
        rows = [self._new_row(request, encoded) for request, encoded in joining]
        parts.append(_Batch(rows, cache, mask, first))

    def _prefill(self, encoded: Sequence[_Encoded]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Run the vision encoder and the prompt for new pages; return their cache, mask and first tokens."""
        import torch

        inputs = {
            key: torch.cat([e.inputs[key] for e in encoded]).to(self.device) for key in encoded[0].inputs
        }
        cache = _new_cache(self.model)
        with torch.inference_mode():
            output = self.model(**inputs, **{self.cache_argument: cache}, use_cache=True, logits_to_keep=1)
        return cache, inputs["attention_mask"], self._pick(output.logits[:, -1, :])

    def _decode_step(self, batch: _Batch) -> list[int]:
        """Feed every row its last token; return the next token of each row."""
        import torch

        assert batch.tokens is not None and batch.mask is not None
        input_ids = batch.tokens[:, None]
        # Kosmos' sinusoidal positions count from padding_idx + 1 over the row's own tokens; left padding
        # in the shared cache would shift the positions the model computes itself from the cache length.
        lengths = torch.tensor([row.cached for row in batch.rows], device=input_ids.device)[:, None]
        position_ids = torch.where(input_ids == self.pad_id, self.pad_id, self.pad_id + 1 + lengths)
        mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                **{self.cache_argument: batch.cache},
                position_ids=position_ids,
                use_cache=True,
            )
        batch.mask = mask
        for row in batch.rows:
            row.cached += 1
        batch.tokens = self._pick(output.logits[:, -1, :])
        return batch.tokens.tolist()

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy choice: the argmax token of each row (EOS excluded when `ignore_eos`)."""
        if self.settings.ignore_eos:
            logits = logits.clone()
            logits[:, self.eos_id] = float("-inf")
        return logits.argmax(dim=-1)

    def _advance(
        self, batch: _Batch, tokens: list[int], rows_from: int = 0
    ) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Record each row's new token; yield and drop the rows that finished."""
        finished = [
            i for i, token in enumerate(tokens, start=rows_from) if batch.rows[i].add(token, self.eos_id)
        ]
        if not finished:
            return
        done = [batch.rows[i] for i in finished]
        batch.drop(finished)
        for row in done:
            yield row.request, self._to_generation(row.ids, row.resized_size, row.finish, row.loop)

    def _new_row(self, request: Request, encoded: _Encoded) -> _Row:
        detector = LoopDetector(self.loop_rule, self.decode_raw) if self.loop_rule is not None else None
        cached = int(encoded.inputs["input_ids"].shape[1])
        return _Row(request, encoded, self.max_new_tokens, detector, cached)

    def _restart(
        self, batch: _Batch, waiting: deque[tuple[Request, _Encoded]], error: BaseException, limit: int
    ) -> int:
        """Put every running page back in line to start again, and return a halved batch limit."""
        restart = [(row.request, row.encoded) for row in batch.rows]
        batch.clear()
        _release_memory()
        waiting.extendleft(reversed(restart))
        smaller = max(1, min(limit, len(restart)) // 2)
        logger.warning(
            "a batch of %d pages failed (%s); restarting them in batches of %d",
            len(restart),
            _describe(error),
            smaller,
        )
        return smaller

    # --- fixed batches with a static cache (--compile) -------------------------------------------

    def _generate_fixed(self, pages: _Encoder) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Generate in fixed batches of `batch_size`, halving a batch that fails."""
        while not pages.exhausted:
            batch: list[tuple[Request, _Encoded]] = []
            for request, encoded in pages.take(self.batch_size, wait_for=self.batch_size):
                if isinstance(encoded, GenerationError):
                    yield request, encoded
                else:
                    batch.append((request, encoded))
            if batch:
                yield from self._generate_or_split(batch)

    def _generate_or_split(
        self, batch: list[tuple[Request, _Encoded]]
    ) -> Iterator[tuple[Request, Generation | GenerationError]]:
        try:
            generations = self._generate_static([encoded for _, encoded in batch])
        except Exception as error:  # one place that turns a failing batch into per-page errors
            if len(batch) == 1:
                yield batch[0][0], _page_error(error)
                return
            logger.warning("batch of %d failed (%s); retrying in halves", len(batch), _describe(error))
            _release_memory()
            half = len(batch) // 2
            yield from self._generate_or_split(batch[:half])
            yield from self._generate_or_split(batch[half:])
            return
        yield from zip((request for request, _ in batch), generations, strict=True)

    def generate_batch(self, batch: Sequence[Request]) -> list[Generation]:
        """Run one fixed batch through `model.generate` (static cache when `compile`); raises on failure."""
        return self._generate_static([self.encode(request) for request in batch])

    def _generate_static(self, encoded: Sequence[_Encoded]) -> list[Generation]:
        import torch
        from transformers import StoppingCriteriaList

        inputs = {
            key: torch.cat([e.inputs[key] for e in encoded]).to(self.device) for key in encoded[0].inputs
        }
        config = greedy_config(self.model, self.max_new_tokens)
        if self.settings.ignore_eos:
            config.min_new_tokens = self.max_new_tokens
        if self.settings.compile:
            config.cache_implementation = "static"
            config.compile_config = compile_config(self.device)
        stopping = StoppingCriteriaList()
        if self.loop_rule is not None:
            stopping.append(_loop_stopping_criteria(len(encoded), self.loop_rule, self.decode_raw))
        with torch.inference_mode():
            output = self.model.generate(**inputs, generation_config=config, stopping_criteria=stopping)
        new_ids = output[:, inputs["input_ids"].shape[1] :].cpu().tolist()
        generations = []
        for ids, page in zip(new_ids, encoded, strict=True):
            ids, finish, loop = self._finish_of(ids)
            generations.append(self._to_generation(ids, page.resized_size, finish, loop))
        return generations

    def _finish_of(self, ids: list[int]) -> tuple[list[int], Finish, Loop | None]:
        """Cut a fixed-batch row at its EOS or loop and say why it ended."""
        if self.eos_id in ids and not self.settings.ignore_eos:
            ids = ids[: ids.index(self.eos_id)]
            finish = Finish.EOS
        else:
            finish = Finish.LENGTH
        loop = find_loop(ids, self.loop_rule, self.decode_raw) if self.loop_rule is not None else None
        if loop is not None:
            return ids[: loop.keep], Finish.LOOP, loop
        return ids, finish, None

    def _to_generation(
        self, ids: list[int], resized_size: tuple[int, int], finish: Finish, loop: Loop | None = None
    ) -> Generation:
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(text=text, resized_size=resized_size, ids=tuple(ids), finish=finish, loop=loop)


class _NoRoom(Exception):
    """Merging new pages into the running batch ran out of memory; `pages` were not merged."""

    def __init__(self, pages: list[tuple[Request, _Encoded]], error: BaseException) -> None:
        super().__init__(str(error))
        self.pages = pages
        self.error = error


@dataclass(frozen=True)
class _Encoded:
    """A request after the processor: model inputs for one page (batch dim 1) and the resized size."""

    inputs: dict[str, torch.Tensor]
    resized_size: tuple[int, int]


@dataclass
class _Row:
    """One page in the running batch."""

    request: Request
    encoded: _Encoded  # kept so the page can restart after a failed step
    budget: int
    detector: LoopDetector | None
    cached: int  # tokens of this page in the KV cache (left padding excluded)
    ids: list[int] = field(default_factory=list)
    finish: Finish = Finish.LENGTH
    loop: Loop | None = None  # the loop that stopped the page, if one did

    @property
    def resized_size(self) -> tuple[int, int]:
        """The (width, height) the model saw."""
        return self.encoded.resized_size

    def add(self, token: int, eos_id: int) -> bool:
        """Record the next token; return True when the page is finished."""
        if token == eos_id:
            self.finish = Finish.EOS
            return True
        self.ids.append(token)
        if self.detector is not None and (loop := self.detector.push(token)) is not None:
            del self.ids[loop.keep :]
            self.finish, self.loop = Finish.LOOP, loop
            return True
        return len(self.ids) >= self.budget


@dataclass
class _Batch:
    """Rows decoding together over one left-padded KV cache; `mask` is 0 over each row's padding."""

    rows: list[_Row] = field(default_factory=list)
    cache: Any = None
    mask: torch.Tensor | None = None  # [rows, cache columns]
    tokens: torch.Tensor | None = None  # [rows]: the token each row feeds next

    def clear(self) -> None:
        """Forget every row and free the cache."""
        self.rows, self.cache, self.mask, self.tokens = [], None, None, None

    def merge(self, other: _Batch) -> None:
        """Append `other`'s rows, left-padding the shorter cache with masked columns.

        Layer by layer, so the extra memory is one layer's cache, not the whole cache again; a failure
        half way leaves the batch unusable (the caller restarts its pages).
        """
        import torch

        if not self.rows:
            self.rows, self.cache, self.mask, self.tokens = other.rows, other.cache, other.mask, other.tokens
            return
        assert self.mask is not None and other.mask is not None and self.tokens is not None
        assert other.tokens is not None
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            theirs.keys = None
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
            theirs.values = None
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.rows = self.rows + other.rows

    def drop(self, indices: list[int]) -> None:
        """Remove rows from the batch and trim cache columns that are padding for every remaining row."""
        import torch

        gone = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        if not keep:
            self.clear()
            return
        assert self.mask is not None and self.tokens is not None
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        mask = self.mask[index]
        start = int(mask.any(dim=0).int().argmax())  # padding is on the left, so leading columns go first
        self.mask = mask[:, start:]
        self.tokens = self.tokens[index]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Pad a [rows, columns] mask or a [rows, heads, columns, dim] cache tensor on the left with zeros."""
    import torch

    if tensor.dim() == 2:
        missing = width - tensor.shape[1]
        return torch.nn.functional.pad(tensor, (missing, 0)) if missing else tensor
    missing = width - tensor.shape[-2]
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0)) if missing else tensor


def _new_cache(model: Any) -> Any:
    """Return an empty KV cache whose layers grow in place instead of re-concatenating every step."""
    from transformers import DynamicCache

    cache = DynamicCache()
    layer_class = _growing_layer_class()
    cache.layers = [layer_class() for _ in range(model.config.text_config.layers)]
    cache.layer_class_to_replicate = None
    return cache


@functools.cache
def _growing_layer_class() -> type:
    """Build (once) a DynamicLayer that keeps spare columns, so a decode step writes in place.

    transformers' DynamicLayer concatenates the whole cache with the new token at every step, which
    copies every row's KV (2052 prompt tokens and more) once per token; here `update` writes into
    spare capacity and only reallocates every `GROW_COLUMNS` tokens.
    """
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        # `keys`/`values` read as the filled part of a buffer with spare columns; assigning them
        # (as batch_select_indices and _Batch do) replaces the buffer, filled to its full width.
        def __init__(self) -> None:
            self._buffers: dict[str, Any] = {"keys": None, "values": None}
            self._lengths = {"keys": 0, "values": 0}
            super().__init__()

        def _get(self, name: str) -> Any:
            buffer = self._buffers[name]
            return buffer if buffer is None or buffer.dim() < 3 else buffer[:, :, : self._lengths[name]]

        def _set(self, name: str, value: Any) -> None:
            self._buffers[name] = value
            self._lengths[name] = 0 if value is None or value.dim() < 3 else value.shape[-2]

        keys = property(lambda self: self._get("keys"), lambda self, value: self._set("keys", value))
        values = property(lambda self: self._get("values"), lambda self, value: self._set("values", value))

        def get_seq_length(self) -> int:
            return self._lengths["keys"] if self.is_initialized else 0

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized or self.get_seq_length() == 0:
                self.lazy_initialization(key_states, value_states)
                self.keys, self.values = key_states, value_states
                return key_states, value_states
            start = self._lengths["keys"]
            end = start + key_states.shape[-2]
            for name, states in (("keys", key_states), ("values", value_states)):
                buffer = self._buffers[name]
                if end > buffer.shape[-2]:
                    buffer = _grow(buffer, start, end + GROW_COLUMNS)
                    self._buffers[name] = buffer
                buffer[:, :, start:end] = states
                self._lengths[name] = end
            return self.keys, self.values

    def _grow(tensor: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
        shape = (*tensor.shape[:2], capacity, tensor.shape[-1])
        grown = tensor.new_zeros(shape)  # zero spare columns: readers may use the whole buffer
        grown[:, :, :length] = tensor[:, :, :length]
        return grown

    return GrowingLayer


class _Encoder:
    """Run the processor on upcoming requests in worker threads while the model decodes.

    Requests are pulled from the caller's iterator in the caller's thread (callers such as
    `jobs.run_job` do bookkeeping inside that iterator, which must stay on one thread); only the
    processor call, pure CPU work on the image, runs in the workers.
    """

    def __init__(
        self, runner: KosmosRunner, requests: Iterable[Request], *, depth: int, workers: int
    ) -> None:
        self._runner = runner
        self._requests = iter(requests)
        self._depth = max(1, depth)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kosmos-encode")
        self._pending: deque[tuple[Request, Future[_Encoded]]] = deque()
        self._input_done = False

    @property
    def exhausted(self) -> bool:
        """Whether every request has been taken."""
        self._fill()
        return self._input_done and not self._pending

    def _fill(self) -> None:
        while len(self._pending) < self._depth and not self._input_done:
            request = next(self._requests, None)
            if request is None:
                self._input_done = True
                return
            self._pending.append((request, self._pool.submit(self._runner.encode, request)))

    def take(self, count: int, *, wait_for: int) -> list[tuple[Request, _Encoded | GenerationError]]:
        """Return up to `count` encoded requests: wait for the first `wait_for`, take the rest if ready."""
        taken: list[tuple[Request, _Encoded | GenerationError]] = []
        self._fill()
        while self._pending and len(taken) < count:
            request, future = self._pending[0]
            if len(taken) >= wait_for and not future.done():
                break
            self._pending.popleft()
            try:
                taken.append((request, future.result()))
            except (ValueError, TypeError, OSError, RuntimeError) as error:  # an image the processor rejects
                taken.append((request, GenerationError(f"could not prepare the image: {_describe(error)}")))
            self._fill()
        return taken

    def close(self) -> None:
        """Drop what is still queued and let the workers go."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _loop_stopping_criteria(rows: int, rule: LoopRule, decode: Decode) -> Any:
    """A transformers StoppingCriteria that stops each row of a fixed batch when its output loops."""
    import torch
    from transformers import StoppingCriteria

    class LoopStopping(StoppingCriteria):
        def __init__(self) -> None:
            self.detectors = [LoopDetector(rule, decode) for _ in range(rows)]
            self.stopped = [False] * rows

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            for row, token in enumerate(input_ids[:, -1].tolist()):
                if not self.stopped[row] and self.detectors[row].push(token) is not None:
                    self.stopped[row] = True
            return torch.tensor(self.stopped, device=input_ids.device)

    return LoopStopping()


def compile_config(device: str) -> Any:
    """How `--compile` compiles the decode step: CUDA graphs on GPU, plain inductor elsewhere."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, mode="reduce-overhead" if device.startswith("cuda") else "default")
    config._compile_all_devices = True  # type: ignore[assignment]  # transformers only auto-compiles on accelerators otherwise
    return config


def _page_error(error: BaseException) -> GenerationError:
    """Turn what stopped a page that ran alone into its error."""
    if _is_out_of_memory(error):
        return GenerationError("out of memory even alone", hint="try --dtype bfloat16 or --device cpu")
    return GenerationError(f"generation failed: {_describe(error)}")


def greedy_config(model: Any, max_new_tokens: int) -> Any:
    """Build an explicit greedy generation config, ignoring what the checkpoint ships."""
    from transformers import GenerationConfig

    shipped = model.generation_config
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        bos_token_id=shipped.bos_token_id,
        eos_token_id=shipped.eos_token_id,
        pad_token_id=shipped.pad_token_id,
    )


def default_batch_size(device: str, dtype: Any = None, tokens: int = 4096) -> int:
    """Pick how many pages decode together: from free memory on GPU and CPU, at most a measured cap on CPU."""
    dtype_bytes = dtype.itemsize if dtype is not None else 2
    kv_bytes_per_page = KV_BYTES_PER_TOKEN_PER_DTYPE_BYTE * dtype_bytes * (tokens + GROW_COLUMNS)
    if device.startswith("cuda"):
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
        return max(1, min(CUDA_MAX_BATCH_SIZE, int(free_bytes * CUDA_MEMORY_SHARE // kv_bytes_per_page)))
    if device == "cpu":
        import psutil

        free_bytes = psutil.virtual_memory().available
        return max(1, min(CPU_BATCH_SIZE, int(free_bytes * CPU_MEMORY_SHARE // kv_bytes_per_page)))
    return 4


def default_refill_min(device: str, batch_size: int) -> int:
    """How many rows must be free before new pages join a running batch.

    Joining copies the running cache once (like one decode step); on GPU with large batches that
    is worth batching up, on CPU a free row is worth filling at once.
    """
    if device == "cpu":
        return 1
    return max(1, batch_size // REFILL_SHARE)


def available_cores() -> int:
    """Return the CPU cores this process may use: its affinity set, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota to honour
    return cores


def resolve_device(device: str) -> str:
    """Turn `auto` into the best device present, and check an explicit one exists."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device `{device}` was asked for but CUDA is not available on this machine",
                hint="use --device cpu, or install a CUDA build of torch",
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device `{device}` does not exist: "
                f"this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return device
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device `mps` was asked for but is not available", hint="use --device cpu")
    if device not in ("cpu", "mps"):
        raise ModelLoadError(f"unknown device `{device}`", hint="use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(dtype: str, device: str, *, quantize: str | None = None) -> torch.dtype:
    """Turn `auto` into bf16 where the hardware computes in it, else fp16 on GPU and fp32 on CPU.

    On CPU, bf16 needs native instructions (AVX512-BF16 or AMX): with them its oneDNN matmuls run
    about twice as fast as fp32 (BENCHMARKS.md); without them bf16 is emulated and slower.
    `--quantize int8` starts from fp32 weights, so `auto` is fp32 then.
    """
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return (
                torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
            )
        if device == "mps":
            return torch.float16
        return torch.bfloat16 if quantize is None and native_bf16_cpu() else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype `{dtype}`", hint="use auto, bfloat16, float16 or float32")
    return getattr(torch, dtype)


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX) and oneDNN can use them."""
    import torch

    cpu = torch.cpu
    native = any(
        getattr(cpu, name, lambda: False)()
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return native and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_attn(attn: str, device: str, dtype: torch.dtype) -> str:
    """Pick flash attention 2 when installed and usable, else SDPA."""
    import torch

    flash_usable = device.startswith("cuda") and dtype in (torch.float16, torch.bfloat16)
    if attn == "auto":
        return "flash_attention_2" if flash_usable and _flash_attn_installed() else "sdpa"
    if attn not in ATTENTIONS:
        raise ModelLoadError(f"unknown attention `{attn}`", hint="use auto, sdpa, eager or flash_attention_2")
    if attn == "flash_attention_2" and not (flash_usable and _flash_attn_installed()):
        raise ModelLoadError(
            "flash_attention_2 needs the flash-attn package, a CUDA device and --dtype bfloat16/float16",
            hint="use --attn sdpa",
        )
    return attn


def _flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def load_runner(settings: Settings) -> KosmosRunner:
    """Load the processor and model named by `settings`, raising ModelLoadError with a hint on failure."""
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, quantize=settings.quantize)
    attn = resolve_attn(settings.attn, device, dtype)
    check_speed_settings(settings, device, dtype)
    from safetensors import SafetensorError

    source = settings.model
    if Path(source).exists() and not Path(source, "config.json").is_file():
        raise ModelLoadError(
            f"`{source}` is not a Kosmos-2.5 checkpoint: it has no config.json", hint=LOAD_HINT
        )
    # A cached model loads without touching the network: no hub round trip on every run, and no
    # retries that stall an offline machine. Only a model that is not (fully) cached is fetched.
    cached = cached_model_path(source, revision=settings.revision) is not None
    if not cached and not hub_offline():
        if not Path(source).exists():
            require_hub(source)
        logger.warning("model `%s` is not cached; fetching it from the hub (about 5.5 GB)", source)
    try:
        try:
            processor, model = _load_parts(settings, dtype, attn, local_only=cached)
        except OSError:
            if not cached or Path(source).is_dir():
                raise
            processor, model = _load_parts(settings, dtype, attn, local_only=False)  # a partial cache
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        # A damaged folder raises whatever its reader raises: a truncated safetensors file, a bad pickle.
        raise _load_error(source, error) from error
    model.to(device).eval()
    logger.info("loaded %s on %s as %s with %s attention", source, device, dtype, attn)
    runner = KosmosRunner(model=model, processor=processor, settings=settings, device=device, dtype=dtype)
    prepare_for_speed(runner)
    return runner


def _load_parts(settings: Settings, dtype: Any, attn: str, *, local_only: bool) -> tuple[Any, Any]:
    """Load and check the config, then the processor and the model, from the cache only if asked."""
    from transformers import AutoConfig, AutoProcessor, Kosmos2_5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    source, revision = settings.model, settings.revision
    config = AutoConfig.from_pretrained(source, revision=revision, local_files_only=local_only)
    if config.model_type != MODEL_TYPE:
        raise ModelLoadError(
            f"`{source}` is a `{config.model_type}` checkpoint, not Kosmos-2.5",
            hint=f"pass a Kosmos-2.5 checkpoint, e.g. --model {DEFAULT_MODEL}",
        )
    processor = AutoProcessor.from_pretrained(source, revision=revision, local_files_only=local_only)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists nothing actionable for a complete checkpoint
    try:
        model = Kosmos2_5ForConditionalGeneration.from_pretrained(
            source,
            revision=revision,  # type: ignore[arg-type]
            dtype=dtype,
            attn_implementation=attn,
            local_files_only=local_only,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return processor, model


def check_speed_settings(settings: Settings, device: str, dtype: Any) -> None:
    """Reject `quantize`/`compile`/`threads` combinations that cannot work, before loading weights."""
    import torch

    if settings.quantize is not None:
        if settings.quantize not in QUANTIZATIONS:
            raise ModelLoadError(f"unknown quantization `{settings.quantize}`", hint="use --quantize int8")
        if device != "cpu":
            raise ModelLoadError(
                "--quantize int8 runs on CPU only", hint="drop --quantize, or add --device cpu"
            )
        if dtype != torch.float32:
            raise ModelLoadError(
                "--quantize int8 needs float32 weights", hint="use --dtype float32, or leave --dtype auto"
            )
        if settings.compile:
            raise ModelLoadError("--quantize and --compile do not work together", hint="pick one")
    if settings.threads is not None and settings.threads < 1:
        raise ModelLoadError("--threads must be at least 1")


def prepare_for_speed(runner: KosmosRunner) -> None:
    """Set CPU threads, quantize, and size the position table for a loaded runner, as its settings ask."""
    import torch

    settings = runner.settings
    if runner.device == "cpu":
        threads = settings.threads or available_cores()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    fit_positions(runner.model, runner.prompt_length + runner.max_new_tokens)
    if runner.model.config.vision_config._attn_implementation != "eager":
        use_sdpa_in_vision(runner.model)
    if runner.device == "cpu" and runner.dtype != torch.float32 and not settings.compile:
        use_cpu_decode_attention(runner.model)
    changed = False
    if settings.quantize == "int8":
        quantize_int8(runner.model)
        changed = True
    if runner.device == "cpu" and not settings.compile:
        changed = use_onednn_linears(runner.model) > 0 or changed  # what int8 left in float too
    if changed:
        own_weights(runner.model)
    logger.info("batch size %d, %d CPU threads", runner.batch_size, torch.get_num_threads())


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


def use_cpu_decode_attention(model: Any) -> None:
    """Make the text model's one-token (decode) attention in bf16/fp16 two matmuls over whole cache buffers.

    torch's CPU flash-attention kernel is slow in bf16 for one query over a long cache, and a matmul
    over the cache's filled columns (a strided view of the growing buffer) copies them first. Two
    matmuls over the whole, contiguous buffer and a float32 softmax over the filled columns made a
    bf16 decode step of 4 pages 1.8x faster on the 2-core CPU (BENCHMARKS.md); in fp32 the same
    change was slower, so fp32 keeps SDPA. Scores are rounded to the model's dtype before the
    softmax, as transformers' eager attention does. Prompts (more than one query) keep SDPA.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if model.config.text_config._attn_implementation != "sdpa":
        return  # an explicit --attn eager (or another kernel) stays as asked
    AttentionInterface.register(CPU_DECODE_ATTENTION, _cpu_decode_attention)
    AttentionMaskInterface.register(CPU_DECODE_ATTENTION, sdpa_mask)
    model.set_attn_implementation({"text_config": CPU_DECODE_ATTENTION})


def _cpu_decode_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for one query token as matmuls; SDPA for anything longer."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    columns = key.shape[2]
    key, value = _whole_buffer(key), _whole_buffer(value)
    scores = torch.matmul(query, key.transpose(-1, -2))[..., :columns].float()
    if scaling is not None:
        scores *= scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, float("-inf"))
        else:
            scores += attention_mask
    weights = scores.softmax(dim=-1).to(value.dtype)
    if value.shape[2] > columns:  # the spare columns are zeros (GrowingLayer) and get zero weight
        weights = torch.nn.functional.pad(weights, (0, value.shape[2] - columns))
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def _whole_buffer(tensor: torch.Tensor) -> torch.Tensor:
    """The contiguous [rows, heads, capacity, dim] buffer whose leading columns `tensor` is, if it is one."""
    if tensor.is_contiguous():
        return tensor
    rows, heads, _, dim = tensor.shape
    stride = tensor.stride()
    whole_rows = (
        stride[3] == 1 and stride[2] == dim and stride[1] % dim == 0 and stride[0] == heads * stride[1]
    )
    if whole_rows and tensor.storage_offset() == 0:
        return tensor.as_strided((rows, heads, stride[1] // dim, dim), stride)
    return tensor.contiguous()


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
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.dtype in dtypes:
                setattr(parent, name, layer_class(child))
                swapped += 1
    return swapped


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

    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.device.type == "cpu" and not tensor.is_mkldnn:
                tensor.data = tensor.data.clone()


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
    with warnings.catch_warnings():  # deprecated in favour of torchao, whose CPU int8 is slower (above)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantization.quantize_dynamic(model, layers, dtype=torch.qint8, inplace=True)


def _load_error(source: str, error: Exception) -> ModelLoadError:
    """Explain why from_pretrained failed in one line."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cause: BaseException | None = error
    while cause is not None:  # transformers wraps hub errors in an OSError
        if isinstance(cause, GatedRepoError):
            return ModelLoadError(f"model `{source}` is gated", hint="log in with `hf auth login`")
        if isinstance(cause, RepositoryNotFoundError):
            return ModelLoadError(
                f"model `{source}` was not found on the hub", hint="check the id, or pass a folder"
            )
        if isinstance(cause, RevisionNotFoundError):
            return ModelLoadError(f"revision not found for model `{source}`", hint="check --revision")
        cause = cause.__cause__ or cause.__context__
    if Path(source).exists():
        damaged = _damaged_weights(Path(source))
        if damaged is not None:
            return ModelLoadError(
                f"`{damaged}` is damaged: {_describe(error)}",
                hint="download the checkpoint again (`kosmos download --to DIR`)",
            )
        return ModelLoadError(f"`{source}` is not a usable Kosmos-2.5 checkpoint: {_describe(error)}")
    where = "offline mode is on (HF_HUB_OFFLINE)" if hub_offline() else "the hub could not be reached"
    return ModelLoadError(f"model `{source}` is not in the Hugging Face cache and {where}", hint=LOAD_HINT)


def _damaged_weights(folder: Path) -> Path | None:
    """Return the first weights file in a checkpoint folder that does not open, if any."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as weights:
                weights.keys()
        except (SafetensorError, OSError):
            return path
    return next(iter(sorted(folder.glob("*.bin"))), None)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _is_out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


def _release_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def download_model(model: str, *, revision: str | None = None, to: Path | None = None) -> Path:
    """Fetch a checkpoint into the Hugging Face cache (or a folder) and return where it is."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if not hub_offline():
        require_hub(model)
    try:
        path = snapshot_download(model, revision=revision, local_dir=to)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        raise _load_error(model, error) from error
    return Path(path)


def require_hub(model: str) -> None:
    """Fail at once when the hub cannot be reached, not after huggingface_hub's 23 s of retries.

    One TCP connection to the hub's endpoint, unless a proxy is configured (then the proxy decides,
    and huggingface_hub's own retries apply, as they do once the hub has answered).
    """
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    if urllib.request.getproxies():
        return
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError as error:
        raise ModelLoadError(
            f"model `{model}` is not in the Hugging Face cache and the hub could not be reached"
            f" ({constants.ENDPOINT}: {_describe(error)})",
            hint=LOAD_HINT,
        ) from error


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (HF_HUB_OFFLINE, read once when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_model_path(model: str, *, revision: str | None = None) -> Path | None:
    """Return the cached snapshot folder of a hub model, or None when it is not fully cached."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if Path(model).is_dir():
        return Path(model)
    try:
        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except HFValidationError:  # neither a folder nor a valid hub id, e.g. a path that does not exist
        return None
    return Path(found).parent if isinstance(found, str) else None
