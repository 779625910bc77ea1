"""The continuous batch: pages decode together, each in a KV-cache slot of its own; a page that finishes
leaves, the next one joins at once, so a short page never waits for a long one."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kosmos_cli.errors import GenerationError, first_line
from kosmos_cli.model import Request
from kosmos_cli.model.attention import Recorder, recording
from kosmos_cli.model.encoding import Encoded, Encoder
from kosmos_cli.model.failures import PAGE_ERRORS, is_out_of_memory, page_error, release_memory
from kosmos_cli.model.graph import CapturedStep
from kosmos_cli.model.slots import FixedSlots, SlotCache
from kosmos_cli.repetition import Loop, LoopDetector
from kosmos_cli.tiling import PATCH_SIZE
from kosmos_cli.values import Finish, Generation, TokenAttention

if TYPE_CHECKING:
    import torch

    from kosmos_cli.model.runner import KosmosRunner

logger = logging.getLogger(__name__)
PREFILL_GROUP = 16  # most pages in one prefill: bounds its activations and how long running rows wait
CANCELLED = "cancelled: its job was cancelled"


class ContinuousDecoder:
    """Greedy decoding of a stream of pages in one running batch of at most `runner.batch_size` slots.

    Its steps (`new_cache`, `join`, `prefill`, `decode_step`, `advance`) are methods so that the
    benchmarks can time and count them.
    """

    def __init__(self, runner: KosmosRunner) -> None:
        self.runner = runner

    def run(self, pages: Encoder) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Keep up to `batch_size` pages decoding; yield each page as soon as it is done."""
        batch = Batch()
        waiting: deque[tuple[Request, Encoded]] = deque()  # pages to (re)start before new ones
        limit = self.runner.batch_size
        while True:
            free = limit - len(batch.rows)  # a free slot is filled at once: joining costs only its prefill
            if free > 0:
                joining = [waiting.popleft() for _ in range(min(free, len(waiting)))]
                wait_for = 0 if batch.rows or joining else 1  # never stall running rows on rendering
                for request, encoded in pages.take(free - len(joining), wait_for=wait_for):
                    if isinstance(encoded, GenerationError):
                        yield request, encoded
                    elif _is_cancelled(request):
                        yield request, GenerationError(CANCELLED)
                    else:
                        joining.append((request, encoded))
                if joining and batch.cache is None:
                    try:
                        batch.cache, limit = self.new_cache(limit)
                    except PAGE_ERRORS as error:  # not even one slot: these pages cannot run
                        for request, _ in joining:
                            yield request, page_error(error)
                        continue
                    batch.step = self.capture_step(batch.cache)
                    waiting.extendleft(reversed(joining[limit:]))
                    joining = joining[:limit]
                for start in range(0, len(joining), PREFILL_GROUP):
                    yield from self.join(batch, joining[start : start + PREFILL_GROUP])
            yield from self.leave_cancelled(batch)
            if not batch.rows:
                if pages.exhausted and not waiting:
                    return
                continue
            try:
                tokens, probs, looks = self.decode_step(batch)
            except PAGE_ERRORS as error:  # a failing step: retried smaller, then per-page errors
                if len(batch.rows) == 1:
                    row = batch.rows[0]
                    batch.clear()
                    yield row.request, page_error(error)
                    continue
                limit = self._restart(batch, waiting, error, limit)
                continue
            yield from self.advance(batch, tokens, probs, looks)

    def new_cache(self, slots: int) -> tuple[SlotCache, int]:
        """Allocate a run's KV cache slots, halving their number while there is no room; return it and
        the number of slots."""
        runner = self.runner
        while True:
            try:
                cache = SlotCache.for_model(
                    runner.model, slots=slots, capacity=runner.capacity, dtype=runner.kv_dtype,
                    device=runner.device,
                )  # fmt: skip
            except PAGE_ERRORS as error:
                if slots == 1 or not is_out_of_memory(error):
                    raise
                release_memory()
                logger.warning(
                    "no room for %d cache slots (%s); trying %d", slots, first_line(error), slots // 2
                )
                slots //= 2
                continue
            return cache, slots

    def capture_step(self, cache: SlotCache) -> CapturedStep | None:
        """Capture the decode step over a new cache's slots (`--cuda-graph`); None if not asked, or if
        capturing fails (then steps run eagerly, and the run says so once)."""
        if not (self.runner.captures_steps and isinstance(cache, FixedSlots)):
            return None
        try:
            return CapturedStep(self.runner, cache)
        except PAGE_ERRORS as error:
            logger.warning(
                "could not capture the decode step as a CUDA graph (%s); running it eagerly",
                first_line(error),
            )
            release_memory()
            return None

    def join(
        self, batch: Batch, joining: list[tuple[Request, Encoded]]
    ) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Prefill new pages into free slots of the running batch, halving the group when it fails."""
        assert batch.cache is not None
        rows = [self.new_row(request, encoded, batch.cache.take()) for request, encoded in joining]
        try:
            first, first_probs, looks = self.prefill(batch.cache, rows)
        except PAGE_ERRORS as error:  # a failing prefill: retried in halves, then per-page errors
            for row in rows:
                batch.cache.release(row.slot)
            if len(joining) == 1:
                yield joining[0][0], page_error(error)
                return
            logger.warning(
                "prefill of %d pages failed (%s); retrying in halves", len(joining), first_line(error)
            )
            release_memory()
            half = len(joining) // 2
            yield from self.join(batch, joining[:half])
            yield from self.join(batch, joining[half:])
            return
        batch.add(rows, first)
        yield from self.advance(
            batch, first.tolist(), first_probs.tolist(), looks, rows_from=len(batch.rows) - len(rows)
        )

    def prefill(
        self, cache: SlotCache, rows: Sequence[Row]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Run the vision encoder and the prompt of new pages into their slots; return their first tokens.

        The first tokens come with their probabilities (`KosmosRunner.pick`) and, with `--attention`,
        where each looked (the rows give each their projection weights over their real patches).
        """
        import torch

        runner = self.runner
        encoded = [row.encoded for row in rows]
        inputs = {
            key: torch.cat([e.inputs[key] for e in encoded]).to(runner.device) for key in encoded[0].inputs
        }
        cache.at([row.slot for row in rows])
        with torch.inference_mode(), recording(runner) as looking:
            output = runner.model(
                **inputs, **{runner.cache_argument: cache}, use_cache=True, logits_to_keep=1
            )
        if looking is not None:
            _give_projections(rows, looking)
        return *runner.pick(output.logits[:, -1, :]), _looks(looking)

    def decode_step(self, batch: Batch) -> tuple[list[int], list[float], torch.Tensor | None]:
        """Feed every row its last token; return the next token of each row, its probability and, with
        `--attention`, where each row looked for it."""
        import torch

        assert batch.tokens is not None and batch.cache is not None
        if batch.step is not None:
            return *batch.step(batch), None
        runner = self.runner
        input_ids = batch.tokens[:, None]
        lengths = [row.cached for row in batch.rows]
        columns = torch.tensor(lengths, device=input_ids.device)[:, None]
        # Kosmos' sinusoidal positions count from padding_idx + 1 over the row's own tokens, as
        # transformers computes them for a page alone (a pad token keeps the padding position).
        position_ids = torch.where(input_ids == runner.pad_id, runner.pad_id, runner.pad_id + 1 + columns)
        batch.cache.at([row.slot for row in batch.rows], lengths)
        with torch.inference_mode(), recording(runner) as looking:
            output = runner.model(
                input_ids=input_ids,
                **{runner.cache_argument: batch.cache},
                position_ids=position_ids,
                use_cache=True,
                slot_cache=batch.cache,
            )
        for row in batch.rows:
            row.cached += 1
        batch.tokens, probs = runner.pick(output.logits[:, -1, :])
        return batch.tokens.tolist(), probs.tolist(), _looks(looking)

    def advance(
        self,
        batch: Batch,
        tokens: list[int],
        probs: list[float],
        looks: torch.Tensor | None = None,
        rows_from: int = 0,
    ) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Record each row's new token, its probability and where it looked (`--attention`); yield and
        drop the rows that finished."""
        runner = self.runner
        finished = [
            i
            for i, (token, prob) in enumerate(zip(tokens, probs, strict=True), start=rows_from)
            if batch.rows[i].add(token, prob, runner.eos_id, None if looks is None else looks[i - rows_from])
        ]
        for row in batch.rows[rows_from:]:
            if row.request.partial is not None:
                row.request.partial(row.ids)
        if not finished:
            return
        done = [batch.rows[i] for i in finished]
        batch.drop(finished)
        for row in done:
            yield (
                row.request,
                runner.to_generation(
                    row.ids, row.probs, row.resized_size, row.finish, row.loop, row.looking()
                ),
            )

    def leave_cancelled(self, batch: Batch) -> Iterator[tuple[Request, GenerationError]]:
        """Drop the rows whose caller gave up on them (`Request.cancelled`), freeing their slots."""
        gone = [i for i, row in enumerate(batch.rows) if _is_cancelled(row.request)]
        if not gone:
            return
        rows = [batch.rows[i] for i in gone]
        batch.drop(gone)
        for row in rows:
            yield row.request, GenerationError(CANCELLED)

    def new_row(self, request: Request, encoded: Encoded, slot: int) -> Row:
        """A page about to join, in `slot`, with the runner's budget and loop rule."""
        runner = self.runner
        detector = LoopDetector(runner.loop_rule, runner.decode_raw) if runner.loop_rule is not None else None
        cached = int(encoded.inputs["input_ids"].shape[1])
        return Row(request, encoded, runner.max_new_tokens, detector, slot, cached)

    def _restart(
        self, batch: Batch, waiting: deque[tuple[Request, Encoded]], error: BaseException, limit: int
    ) -> int:
        """Put every running page back in line to start again, and return a halved batch limit.

        The cache is freed too: the next pages get one of the smaller size.
        """
        restart = [(row.request, row.encoded) for row in batch.rows]
        batch.clear()
        batch.cache, batch.step = None, None
        release_memory()
        waiting.extendleft(reversed(restart))
        smaller = max(1, min(limit, len(restart)) // 2)
        logger.warning(
            "a batch of %d pages failed (%s); restarting them in batches of %d",
            len(restart),
            first_line(error),
            smaller,
        )
        return smaller


@dataclass
class Row:
    """One page in the running batch."""

    request: Request
    encoded: Encoded  # kept so the page can restart after a failed step
    budget: int
    detector: LoopDetector | None
    slot: int  # its slot in the run's SlotCache
    cached: int  # tokens of this page in its slot
    ids: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)  # the probability of each of `ids`
    finish: Finish = Finish.LENGTH
    loop: Loop | None = None  # the loop that stopped the page, if one did
    # --attention: the projection's weights over the page's real patches, [image tokens, patches], and
    # each of `ids`' attention over the image tokens
    projection: torch.Tensor | None = None
    looks: list[torch.Tensor] = field(default_factory=list)

    @property
    def resized_size(self) -> tuple[int, int]:
        """The (width, height) the model saw."""
        return self.encoded.resized_size

    @property
    def grid(self) -> tuple[int, int]:
        """The (rows, columns) of real patches the model saw; padding patches follow them."""
        width, height = self.resized_size
        return height // PATCH_SIZE, width // PATCH_SIZE

    def add(self, token: int, prob: float, eos_id: int, look: torch.Tensor | None = None) -> bool:
        """Record the next token, its probability and where it looked; return True when the page is
        finished."""
        if token == eos_id:
            self.finish = Finish.EOS
            return True
        self.ids.append(token)
        self.probs.append(prob)
        if look is not None:
            self.looks.append(look)
        if self.detector is not None and (loop := self.detector.push(token)) is not None:
            del self.ids[loop.keep :], self.probs[loop.keep :], self.looks[loop.keep :]
            self.finish, self.loop = Finish.LOOP, loop
            return True
        return len(self.ids) >= self.budget

    def looking(self) -> TokenAttention | None:
        """Where the page's tokens looked, for its `Generation` (None without `--attention`)."""
        if self.projection is None:
            return None
        import torch

        empty = self.projection.new_zeros((0, self.projection.shape[0]))
        looks = torch.stack(self.looks) if self.looks else empty
        return TokenAttention(looks.cpu().numpy(), self.projection.cpu().numpy(), self.grid)


def _is_cancelled(request: Request) -> bool:
    return request.cancelled is not None and request.cancelled()


def _looks(looking: Recorder | None) -> torch.Tensor | None:
    return None if looking is None else looking.rows()


def _give_projections(rows: Sequence[Row], looking: Recorder) -> None:
    """Keep each new page's projection weights over its own real patches (padding patches follow them)."""
    assert looking.projection is not None, "the prefill ran the image-to-text projection"
    for index, row in enumerate(rows):
        grid_rows, columns = row.grid
        row.projection = looking.projection[index, :, : grid_rows * columns]


@dataclass
class Batch:
    """Rows decoding together, each in its own slot of `cache`."""

    rows: list[Row] = field(default_factory=list)
    cache: SlotCache | None = None  # allocated when the first page joins, freed after a failed step
    tokens: torch.Tensor | None = None  # [rows]: the token each row feeds next
    step: CapturedStep | None = None  # the decode step as a CUDA graph (--cuda-graph), made with `cache`

    def clear(self) -> None:
        """Forget every row, freeing their slots."""
        if self.cache is not None:
            for row in self.rows:
                self.cache.release(row.slot)
        self.rows, self.tokens = [], None

    def add(self, rows: list[Row], tokens: torch.Tensor) -> None:
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
