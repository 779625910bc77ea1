"""Generate for many pages at once: greedy decoding in a continuous batch, pages joining as rows free up."""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kosmos_cli.config import DEFAULT_MAX_NEW_TOKENS, Settings
from kosmos_cli.errors import GenerationError, first_line
from kosmos_cli.model import Arrivals, Request
from kosmos_cli.model.slots import FixedSlots, SlotCache, fixed_slots
from kosmos_cli.repetition import Decode, Loop, LoopDetector, LoopRule, find_loop
from kosmos_cli.values import Finish, Generation, Task

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)
TASK_PROMPTS = {Task.MD: "<md>", Task.OCR: "<ocr>"}
CPU_BATCH_SIZE = 4  # pages decoding together on CPU: a step of 4 costs 1.8x a step of 1 (BENCHMARKS.md)
CPU_MEMORY_SHARE = 0.5  # of available RAM given to the KV cache
CUDA_MEMORY_SHARE = 0.7  # of free GPU memory given to the KV cache (the rest: weights' activations, prefill)
PREFILL_GROUP = 16  # most pages in one prefill: bounds its activations and how long running rows wait
ENCODE_WORKERS = 4  # processor threads on GPU machines (one on CPU, where cores are busy decoding)
_BOX_TOKEN = re.compile(r"</?bbox>|<[xy]_\d+>")  # the tokens of a line's box, not of its text
# What a page can make the model raise: out of memory (torch.OutOfMemoryError), a CUDA or shape error
# on that input (RuntimeError). Anything else is a bug in kosmos and ends the run with a traceback.
PAGE_ERRORS = (RuntimeError, MemoryError)


def cache_argument(model: Any) -> str:
    """Name the forward argument that takes the KV cache: `cache` from transformers 5.24 on.

    5.24 renamed `past_key_values` and warns on every call that passes it (removal in 5.40); the
    oldest transformers kosmos supports (5.20) knows only the old name.
    """
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class KosmosRunner:
    """A loaded Kosmos-2.5 model and processor with greedy, continuously batched generation."""

    def __init__(
        self, *, model: Any, processor: Any, settings: Settings, device: str, dtype: Any, kv_dtype: Any = None
    ) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype  # what the KV cache stores
        self.prompt_length = processor.num_image_tokens + 4  # <s> <image> ... </image> <task>
        self.max_new_tokens = settings.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        self.capacity = self.prompt_length + self.max_new_tokens  # KV columns a page can fill
        self.batch_size = settings.batch_size or default_batch_size(
            device, kv_bytes_per_token(model, self.kv_dtype) * self.capacity
        )
        self.eos_id = int(model.generation_config.eos_token_id)
        self.pad_id = int(model.config.text_config.pad_token_id)
        self.loop_rule = LoopRule() if settings.detect_loops else None
        self.decode_raw = functools.partial(processor.tokenizer.decode, skip_special_tokens=False)
        added = processor.tokenizer.get_added_vocab()
        self.bbox_id = added.get("<bbox>")  # where an OCR line starts
        self.box_ids = frozenset(i for token, i in added.items() if _BOX_TOKEN.fullmatch(token))
        self.cache_argument = cache_argument(model)
        self.captures_steps = settings.compile and fixed_slots(device)

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Yield each request with its generation (or error) as soon as its page is done."""
        workers = 1 if self.device == "cpu" else min(ENCODE_WORKERS, available_cores())
        pages = _Encoder(self, requests, depth=self.batch_size + 1, workers=workers)
        try:
            if self.settings.compile and not self.captures_steps:
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
        """Keep up to `batch_size` pages decoding, each in its own cache slot; a finished page leaves,
        the next page joins."""
        batch = _Batch()
        waiting: deque[tuple[Request, _Encoded]] = deque()  # pages to (re)start before new ones
        limit = self.batch_size
        while True:
            free = limit - len(batch.rows)  # a free slot is filled at once: joining costs only its prefill
            if free > 0:
                joining = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                wait_for = 0 if batch.rows or joining else 1  # never stall running rows on rendering
                for request, encoded in pages.take(free - len(joining), wait_for=wait_for):
                    if isinstance(encoded, GenerationError):
                        yield request, encoded
                    else:
                        joining.append((request, encoded))
                if joining and batch.cache is None:
                    try:
                        batch.cache, limit = self._new_cache(limit)
                    except PAGE_ERRORS as error:  # not even one slot: these pages cannot run
                        for request, _ in joining:
                            yield request, _page_error(error)
                        continue
                    batch.step = self._captured_step(batch.cache)
                    waiting.extendleft(reversed(joining[limit:]))
                    joining = joining[:limit]
                if joining:
                    for start in range(0, len(joining), PREFILL_GROUP):
                        yield from self._join(batch, joining[start : start + PREFILL_GROUP])
            if not batch.rows:
                if pages.exhausted and not waiting:
                    return
                continue
            try:
                tokens, probs = self._decode_step(batch)
            except PAGE_ERRORS as error:  # a failing step: retried smaller, then per-page errors
                if len(batch.rows) == 1:
                    row = batch.rows[0]
                    batch.clear()
                    yield row.request, _page_error(error)
                    continue
                limit = self._restart(batch, waiting, error, limit)
                continue
            yield from self._advance(batch, tokens, probs)

    def _new_cache(self, slots: int) -> tuple[SlotCache, int]:
        """Allocate a run's KV cache slots, halving their number while there is no room; return it and
        the number of slots."""
        while True:
            try:
                cache = SlotCache.for_model(
                    self.model, slots=slots, capacity=self.capacity, dtype=self.kv_dtype, device=self.device
                )
            except PAGE_ERRORS as error:
                if slots == 1 or not _is_out_of_memory(error):
                    raise
                _release_memory()
                logger.warning(
                    "no room for %d cache slots (%s); trying %d", slots, first_line(error), slots // 2
                )
                slots //= 2
                continue
            return cache, slots

    def _captured_step(self, cache: SlotCache) -> _CapturedStep | None:
        """Capture the decode step over a new cache's slots (`--compile` on CUDA); None if not asked, or
        if capturing fails (then steps run as without --compile, and the run says so once)."""
        if not (self.captures_steps and isinstance(cache, FixedSlots)):
            return None
        try:
            return _CapturedStep(self, cache)
        except PAGE_ERRORS as error:
            logger.warning(
                "could not capture the decode step as a CUDA graph (%s); running it eagerly",
                first_line(error),
            )
            _release_memory()
            return None

    def _join(
        self, batch: _Batch, joining: list[tuple[Request, _Encoded]]
    ) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Prefill new pages into free slots of the running batch, halving the group when it fails."""
        assert batch.cache is not None
        rows = [self._new_row(request, encoded, batch.cache.take()) for request, encoded in joining]
        try:
            first, first_probs = self._prefill(batch.cache, rows)
        except PAGE_ERRORS as error:  # a failing prefill: retried in halves, then per-page errors
            for row in rows:
                batch.cache.release(row.slot)
            if len(joining) == 1:
                yield joining[0][0], _page_error(error)
                return
            logger.warning(
                "prefill of %d pages failed (%s); retrying in halves", len(joining), first_line(error)
            )
            _release_memory()
            half = len(joining) // 2
            yield from self._join(batch, joining[:half])
            yield from self._join(batch, joining[half:])
            return
        batch.add(rows, first)
        yield from self._advance(
            batch, first.tolist(), first_probs.tolist(), rows_from=len(batch.rows) - len(rows)
        )

    def _prefill(self, cache: SlotCache, rows: Sequence[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the vision encoder and the prompt of new pages into their slots; return their first tokens.

        The first tokens come with their probabilities (`_pick`).
        """
        import torch

        encoded = [row.encoded for row in rows]
        inputs = {
            key: torch.cat([e.inputs[key] for e in encoded]).to(self.device) for key in encoded[0].inputs
        }
        cache.at([row.slot for row in rows])
        with torch.inference_mode():
            output = self.model(**inputs, **{self.cache_argument: cache}, use_cache=True, logits_to_keep=1)
        return self._pick(output.logits[:, -1, :])

    def _decode_step(self, batch: _Batch) -> tuple[list[int], list[float]]:
        """Feed every row its last token; return the next token of each row and its probability."""
        import torch

        assert batch.tokens is not None and batch.cache is not None
        if batch.step is not None:
            return batch.step(batch)
        input_ids = batch.tokens[:, None]
        lengths = [row.cached for row in batch.rows]
        columns = torch.tensor(lengths, device=input_ids.device)[:, None]
        # Kosmos' sinusoidal positions count from padding_idx + 1 over the row's own tokens, as
        # transformers computes them for a page alone (a pad token keeps the padding position).
        position_ids = torch.where(input_ids == self.pad_id, self.pad_id, self.pad_id + 1 + columns)
        batch.cache.at([row.slot for row in batch.rows], lengths)
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids,
                **{self.cache_argument: batch.cache},
                position_ids=position_ids,
                use_cache=True,
                slot_cache=batch.cache,
            )
        for row in batch.rows:
            row.cached += 1
        batch.tokens, probs = self._pick(output.logits[:, -1, :])
        return batch.tokens.tolist(), probs.tolist()

    def _pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy choice: the argmax token of each row (EOS excluded when `ignore_eos`), with its probability.

        The probability is the model's softmax over the whole vocabulary for that token, computed
        in float32 from the logits at hand: one pass over the row (`token_probabilities`).
        """
        chosen_from = logits
        if self.settings.ignore_eos:
            chosen_from = logits.clone()
            chosen_from[:, self.eos_id] = float("-inf")
        tokens = chosen_from.argmax(dim=-1)
        return tokens, token_probabilities(logits, tokens)

    def _advance(
        self, batch: _Batch, tokens: list[int], probs: list[float], rows_from: int = 0
    ) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Record each row's new token and its probability; yield and drop the rows that finished."""
        finished = [
            i
            for i, (token, prob) in enumerate(zip(tokens, probs, strict=True), start=rows_from)
            if batch.rows[i].add(token, prob, self.eos_id)
        ]
        if not finished:
            return
        done = [batch.rows[i] for i in finished]
        batch.drop(finished)
        for row in done:
            yield row.request, self._to_generation(row.ids, row.probs, row.resized_size, row.finish, row.loop)

    def _new_row(self, request: Request, encoded: _Encoded, slot: int) -> _Row:
        detector = LoopDetector(self.loop_rule, self.decode_raw) if self.loop_rule is not None else None
        cached = int(encoded.inputs["input_ids"].shape[1])
        return _Row(request, encoded, self.max_new_tokens, detector, slot, cached)

    def _restart(
        self, batch: _Batch, waiting: deque[tuple[Request, _Encoded]], error: BaseException, limit: int
    ) -> int:
        """Put every running page back in line to start again, and return a halved batch limit.

        The cache is freed too: the next pages get one of the smaller size.
        """
        restart = [(row.request, row.encoded) for row in batch.rows]
        batch.clear()
        batch.cache, batch.step = None, None
        _release_memory()
        waiting.extendleft(reversed(restart))
        smaller = max(1, min(limit, len(restart)) // 2)
        logger.warning(
            "a batch of %d pages failed (%s); restarting them in batches of %d",
            len(restart),
            first_line(error),
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
        except PAGE_ERRORS as error:  # a failing batch: retried in halves, then per-page errors
            if len(batch) == 1:
                yield batch[0][0], _page_error(error)
                return
            logger.warning("batch of %d failed (%s); retrying in halves", len(batch), first_line(error))
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
        from transformers import LogitsProcessorList, StoppingCriteriaList

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
        recorder = _probability_recorder(len(encoded))
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                generation_config=config,
                stopping_criteria=stopping,
                logits_processor=LogitsProcessorList([recorder]),
            )
        new_ids = output[:, inputs["input_ids"].shape[1] :].cpu().tolist()
        new_probs = recorder.rows()
        generations = []
        for ids, probs, page in zip(new_ids, new_probs, encoded, strict=True):
            ids, finish, loop = self._finish_of(ids)
            generations.append(self._to_generation(ids, probs[: len(ids)], page.resized_size, finish, loop))
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
        self,
        ids: list[int],
        probs: list[float],
        resized_size: tuple[int, int],
        finish: Finish,
        loop: Loop | None = None,
    ) -> Generation:
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(
            text=text,
            resized_size=resized_size,
            ids=tuple(ids),
            probs=tuple(probs),
            segments=self._segments(ids, probs),
            finish=finish,
            loop=loop,
        )

    def _segments(self, ids: list[int], probs: list[float]) -> tuple[tuple[float, ...], ...]:
        """Split the text tokens' probabilities at each `<bbox>`: a group per line, one before the first."""
        segments: list[list[float]] = [[]]
        for token, prob in zip(ids, probs, strict=True):
            if token == self.bbox_id:
                segments.append([])
            elif token not in self.box_ids:
                segments[-1].append(prob)
        return tuple(tuple(segment) for segment in segments)


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
    slot: int  # its slot in the run's SlotCache
    cached: int  # tokens of this page in its slot
    ids: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)  # the probability of each of `ids`
    finish: Finish = Finish.LENGTH
    loop: Loop | None = None  # the loop that stopped the page, if one did

    @property
    def resized_size(self) -> tuple[int, int]:
        """The (width, height) the model saw."""
        return self.encoded.resized_size

    def add(self, token: int, prob: float, eos_id: int) -> bool:
        """Record the next token and its probability; return True when the page is finished."""
        if token == eos_id:
            self.finish = Finish.EOS
            return True
        self.ids.append(token)
        self.probs.append(prob)
        if self.detector is not None and (loop := self.detector.push(token)) is not None:
            del self.ids[loop.keep :], self.probs[loop.keep :]
            self.finish, self.loop = Finish.LOOP, loop
            return True
        return len(self.ids) >= self.budget


@dataclass
class _Batch:
    """Rows decoding together, each in its own slot of `cache`."""

    rows: list[_Row] = field(default_factory=list)
    cache: SlotCache | None = None  # allocated when the first page joins, freed after a failed step
    tokens: torch.Tensor | None = None  # [rows]: the token each row feeds next
    step: _CapturedStep | None = None  # the decode step as a CUDA graph (--compile), made with `cache`

    def clear(self) -> None:
        """Forget every row, freeing their slots."""
        if self.cache is not None:
            for row in self.rows:
                self.cache.release(row.slot)
        self.rows, self.tokens = [], None

    def add(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        """Append rows already prefilled into their slots, with the token each feeds next."""
        import torch

        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens])
        self.rows = self.rows + rows

    def drop(self, indices: list[int]) -> None:
        """Remove rows from the batch and free their slots."""
        gone = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        assert self.cache is not None and self.tokens is not None
        for i in indices:
            self.cache.release(self.rows[i].slot)
        if not keep:
            self.rows, self.tokens = [], None
            return
        if len(keep) < len(self.rows):
            import torch

            self.tokens = self.tokens[torch.tensor(keep, device=self.tokens.device)]
        self.rows = [self.rows[i] for i in keep]


class _CapturedStep:
    """A decode step of every slot of a `FixedSlots` cache, its shapes fixed: captured once as a CUDA
    graph and replayed at each step (`--compile` on CUDA), while pages join and leave as without it.

    A free slot decodes a pad token at column 0 of its own slot; rows never mix (linears and norms
    work row by row, the attention reads each row's own slot), so what it computes is ignored, and a
    page that takes the slot prefills over that column. Each step copies the rows' last tokens and
    lengths in by slot and reads every slot's next token and probability out. Made while every slot
    is free (its warm-up steps write column 0 of each). Off CUDA it runs the same step eagerly, so
    the tests check its logic on the CPU.
    """

    def __init__(self, runner: KosmosRunner, cache: FixedSlots) -> None:
        import torch

        self._runner, self._cache = runner, cache
        capture = runner.device.startswith("cuda")
        self._host = torch.zeros((2, cache.slots), dtype=torch.long, pin_memory=capture)  # filled each step
        with torch.inference_mode():
            self._inputs = torch.zeros((2, cache.slots), dtype=torch.long, device=runner.device)
            cache.at_every_slot(self._inputs[1])
            self._graph = None
            if not capture:
                return
            warm_up = torch.cuda.Stream(device=runner.device)
            warm_up.wait_stream(torch.cuda.current_stream(runner.device))
            with torch.cuda.stream(warm_up):
                for _ in range(2):  # cuBLAS and Triton set themselves up outside the capture
                    self._forward()
            torch.cuda.current_stream(runner.device).wait_stream(warm_up)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._tokens, self._probs = self._forward()

    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        runner = self._runner
        input_ids, columns = self._inputs[0][:, None], self._inputs[1][:, None]
        position_ids = torch.where(input_ids == runner.pad_id, runner.pad_id, runner.pad_id + 1 + columns)
        output = runner.model(
            input_ids=input_ids,
            **{runner.cache_argument: self._cache},
            position_ids=position_ids,
            use_cache=True,
            slot_cache=self._cache,
        )
        return runner._pick(output.logits[:, -1, :])

    def __call__(self, batch: _Batch) -> tuple[list[int], list[float]]:
        """Run one step for the batch's rows; return each row's next token and its probability."""
        import torch

        self._host[0].fill_(self._runner.pad_id)
        self._host[1].zero_()
        for row in batch.rows:
            self._host[0, row.slot] = row.ids[-1]  # the token it chose last (a running row never ends on EOS)
            self._host[1, row.slot] = row.cached
        with torch.inference_mode():
            self._inputs.copy_(self._host, non_blocking=True)
            if self._graph is not None:
                self._graph.replay()
            else:  # prefills pointed the cache elsewhere since; a graph keeps what it captured
                self._cache.at_every_slot(self._inputs[1])
                self._tokens, self._probs = self._forward()
        tokens, probs = self._tokens.tolist(), self._probs.tolist()
        for row in batch.rows:
            row.cached += 1
        return [tokens[row.slot] for row in batch.rows], [probs[row.slot] for row in batch.rows]


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
        self._fill(wait=False)
        return self._input_done and not self._pending

    def _fill(self, *, wait: bool) -> None:
        """Pull requests up to the depth; from `Arrivals`, wait for one only if `wait` and none is pending."""
        arrivals = self._requests if isinstance(self._requests, Arrivals) else None
        while len(self._pending) < self._depth and not self._input_done:
            if arrivals is not None and not (wait and not self._pending) and not arrivals.ready():
                return
            request = next(self._requests, None)
            if request is None:
                self._input_done = True
                return
            self._pending.append((request, self._pool.submit(self._runner.encode, request)))

    def take(self, count: int, *, wait_for: int) -> list[tuple[Request, _Encoded | GenerationError]]:
        """Return up to `count` encoded requests: wait for the first `wait_for`, take the rest if ready."""
        taken: list[tuple[Request, _Encoded | GenerationError]] = []
        self._fill(wait=wait_for > 0)
        while self._pending and len(taken) < count:
            request, future = self._pending[0]
            if len(taken) >= wait_for and not future.done():
                break
            self._pending.popleft()
            try:
                taken.append((request, future.result()))
            except (ValueError, OSError, RuntimeError) as error:  # an image the processor rejects
                taken.append((request, GenerationError(f"could not prepare the image: {first_line(error)}")))
            self._fill(wait=False)
        return taken

    def close(self) -> None:
        """Drop what is still queued and let the workers go."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def token_probabilities(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Return each row's softmax probability of its token, in float32: `exp(logit - logsumexp)`."""
    import torch

    logits = logits.float()
    return torch.exp(logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))


def _probability_recorder(rows: int) -> Any:
    """A transformers LogitsProcessor that notes the probability of each row's greedy choice, step by step.

    It runs after the generation config's own processors, so the token it sees win is the one
    `generate` picks; the scores are left as they are.
    """
    import torch
    from transformers import LogitsProcessor

    class ProbabilityRecorder(LogitsProcessor):
        def __init__(self) -> None:
            self.steps: list[torch.Tensor] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.steps.append(token_probabilities(scores, scores.argmax(dim=-1)))
            return scores

        def rows(self) -> list[list[float]]:
            """Return each row's probabilities, one per generated token."""
            if not self.steps:
                return [[] for _ in range(rows)]
            return torch.stack(self.steps, dim=1).cpu().tolist()

    return ProbabilityRecorder()


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
    return GenerationError(f"generation failed: {first_line(error)}")


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


def kv_bytes_per_token(model: Any, dtype: Any) -> int:
    """Bytes of KV cache one token of a page takes: layers x (key, value) x embed_dim x the dtype's size."""
    text = model.config.text_config
    return text.layers * 2 * text.embed_dim * dtype.itemsize


def default_batch_size(device: str, kv_bytes_per_page: int) -> int:
    """Pick how many pages decode together: the slots free memory holds (on CPU, at most a measured cap)."""
    if device.startswith("cuda"):
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
        return max(1, int(free_bytes * CUDA_MEMORY_SHARE // kv_bytes_per_page))
    if device == "cpu":
        import psutil

        free_bytes = psutil.virtual_memory().available
        return max(1, min(CPU_BATCH_SIZE, int(free_bytes * CPU_MEMORY_SHARE // kv_bytes_per_page)))
    return 4


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


def _is_out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


def _release_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
