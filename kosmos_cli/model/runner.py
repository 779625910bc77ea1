"""`KosmosRunner`: a loaded Kosmos-2.5 and its processor, turning requests into generations.

It encodes pages (`encoding`), decodes them in a continuous batch of KV-cache slots (`continuous`,
the default; `graph` with `--cuda-graph`) or in fixed batches through transformers' `generate`
(`fixed`, with `--compile`), and turns token ids into `Generation`s.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from kosmos_cli.config import DEFAULT_MAX_NEW_TOKENS, Settings
from kosmos_cli.errors import GenerationError
from kosmos_cli.model import Request
from kosmos_cli.model.continuous import ContinuousDecoder
from kosmos_cli.model.encoding import ENCODE_WORKERS, Encoded, Encoder
from kosmos_cli.model.fixed import generate_fixed, generate_static
from kosmos_cli.model.sizing import available_cores, default_batch_size, kv_bytes_per_token
from kosmos_cli.repetition import Loop, LoopRule
from kosmos_cli.values import Finish, Generation, TokenAttention
from kosmos_cli.vocabulary import BOX_TOKEN, TASK_PROMPTS, prompt_length

if TYPE_CHECKING:
    import torch


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
        self.prompt_length = prompt_length(processor.num_image_tokens)
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
        self.box_ids = frozenset(i for token, i in added.items() if BOX_TOKEN.fullmatch(token))
        self.cache_argument = cache_argument(model)
        self.captures_steps = settings.cuda_graph  # loading checked that the device can capture
        self.decoder = ContinuousDecoder(self)

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Yield each request with its generation (or error) as soon as its page is done."""
        workers = 1 if self.device == "cpu" else min(ENCODE_WORKERS, available_cores())
        pages = Encoder(self.encode, requests, depth=self.batch_size + 1, workers=workers)
        try:
            if self.settings.compile:
                yield from generate_fixed(self, pages)
            else:
                yield from self.decoder.run(pages)
        finally:
            pages.close()

    def generate_batch(self, batch: Iterable[Request]) -> list[Generation]:
        """Run one fixed batch through `model.generate` (static cache when `compile`); raises on failure."""
        return generate_static(self, [self.encode(request) for request in batch])

    def encode(self, request: Request) -> Encoded:
        """Run the processor on one request: flattened patches, prompt ids and the resized size."""
        inputs = self.processor(
            text=[TASK_PROMPTS[request.task]], images=[request.image], return_tensors="pt"
        )
        resized = (int(inputs.pop("width")[0]), int(inputs.pop("height")[0]))
        inputs["flattened_patches"] = inputs["flattened_patches"].to(self.dtype)
        return Encoded(dict(inputs), resized)

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def to_generation(
        self,
        ids: list[int],
        probs: list[float],
        resized_size: tuple[int, int],
        finish: Finish,
        loop: Loop | None = None,
        attention: TokenAttention | None = None,
    ) -> Generation:
        """Turn a finished page's ids and probabilities (and where they looked) into its `Generation`."""
        tokenizer = self.processor.tokenizer
        text = self.text(ids)
        if attention is not None:  # each token's own text, to tell which tokens make which line
            pieces = tokenizer.batch_decode([[token] for token in ids], skip_special_tokens=True)
            attention = replace(attention, pieces=tuple(pieces))
        return Generation(
            text=text,
            resized_size=resized_size,
            ids=tuple(ids),
            probs=tuple(probs),
            segments=self._segments(ids, probs),
            finish=finish,
            loop=loop,
            attention=attention,
        )

    def text(self, ids: Sequence[int]) -> str:
        """The text of generated ids, as a page's `Generation` has it (markdown before tidying)."""
        return str(self.processor.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _segments(self, ids: list[int], probs: list[float]) -> tuple[tuple[float, ...], ...]:
        """Split the text tokens' probabilities at each `<bbox>`: a group per line, one before the first."""
        segments: list[list[float]] = [[]]
        for token, prob in zip(ids, probs, strict=True):
            if token == self.bbox_id:
                segments.append([])
            elif token not in self.box_ids:
                segments[-1].append(prob)
        return tuple(tuple(segment) for segment in segments)


def cache_argument(model: Any) -> str:
    """Name the forward argument that takes the KV cache: `cache` from transformers 5.24 on.

    5.24 renamed `past_key_values` and warns on every call that passes it (removal in 5.40); the
    oldest transformers kosmos supports (5.20) knows only the old name.
    """
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def token_probabilities(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Return each row's softmax probability of its token, in float32: `exp(logit - logsumexp)`."""
    import torch

    logits = logits.float()
    return torch.exp(logits.gather(-1, tokens[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))
