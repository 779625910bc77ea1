"""`--attention`: keep, while pages decode, the attention rows that say where on the page each token
looked.

Kosmos-2.5 reaches the page through one cross-attention (`x_attn` of the image-to-text projection):
each of its latent queries (the prompt's image slots) is a weighted mix of the patch features, with
no feed-forward after it. So a generated token's attention over the image slots, composed with the
projection's attention over the patches, is a map over the patch grid (`kosmos_cli.attention`).

A `Recorder` collects, during one forward, the softmax rows the attention kernels hand it:
- the projection's weights over the real and padding patches, head-averaged, once per page at prefill;
- each page's newest token's row over the image slots, head-averaged, summed over the decoder layers
  asked for (`ATTENTION_LAYERS`): the last prompt row at prefill (the first token), the step's query in
  a decode step (the next token).
The kernels compute their outputs as before; the rows are computed beside them (the CPU's row loop
keeps the softmax it computed anyway). The decode loop records only where `recording` is on.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import TYPE_CHECKING

from kosmos_cli.vocabulary import PROMPT_EXTRA_TOKENS

if TYPE_CHECKING:
    import torch

    from kosmos_cli.model.runner import KosmosRunner

# The decoder layers whose attention is averaged (None: every layer), with every head of each. Nothing
# about the real weights was measured here, so no layer is preferred; a measurement on real pages (the
# share of each OCR line's attention inside its own box, `Line.attention_agreement`) can pick others.
ATTENTION_LAYERS: frozenset[int] | None = None
IMAGE_START = PROMPT_EXTRA_TOKENS - 2  # `<s><image>` come before the image slots in the prompt

_RECORDING: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("kosmos_recording", default=None)


class Recorder:
    """The attention rows one forward was asked to keep, per batch row."""

    def __init__(self, image_tokens: int, layers: frozenset[int] | None) -> None:
        self.image = slice(IMAGE_START, IMAGE_START + image_tokens)
        self.layers = layers
        self.projection: torch.Tensor | None = None  # [rows, image tokens, patches], float32
        self._rows: torch.Tensor | None = None  # [rows, image tokens]: summed over layers
        self._layers_seen = 0

    def wants(self, layer: int | None) -> bool:
        """Whether the rows of decoder `layer` are kept (None: the projection's, always)."""
        return layer is None or self.layers is None or layer in self.layers

    def see(self, layer: int | None, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """Keep what a prompt-sized forward's attention says: the projection's weights over the patches
        (`layer` None), or a decoder layer's last query row over the image slots.

        `query` [rows, heads, queries, head_dim] and `key` [rows, heads, keys, head_dim], as the
        attention kernel got them.
        """
        if not self.wants(layer):
            return
        if layer is None:
            self._see_projection(query, key, scaling)
        else:
            self.keep(layer, _softmax(query[:, :, -1:], key, scaling)[:, :, 0])

    def keep(self, layer: int, weights: torch.Tensor) -> None:
        """Add one decoder layer's rows: [rows, heads, keys] float32 softmax weights, over the image slots."""
        if not self.wants(layer):
            return
        rows = weights[:, :, self.image].mean(dim=1)
        self._rows = rows if self._rows is None else self._rows + rows
        self._layers_seen += 1

    def rows(self) -> torch.Tensor | None:
        """Each row's attention over the image slots, averaged over the layers kept; None if none ran."""
        if self._rows is None:
            return None
        return self._rows / self._layers_seen

    def _see_projection(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        # Keys are the patch features, then the latent queries themselves; a head at a time bounds the
        # memory to one [rows, latents, keys] block.
        patches = key.shape[2] - query.shape[2]
        total = None
        for head in range(query.shape[1]):
            weights = _softmax(query[:, head : head + 1], key[:, head : head + 1], scaling)[:, 0, :, :patches]
            total = weights if total is None else total + weights
        assert total is not None
        self.projection = total / query.shape[1]


def _softmax(query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """softmax(q k^T * scaling): [rows, heads, queries, keys], the scores in the model's dtype and the
    softmax in float32, as transformers' eager attention computes them (float32 scores made the
    projection's weights cost 26% of a bf16 prefill on the CPU, BENCHMARKS.md)."""
    import torch

    scores = torch.matmul(query, key.transpose(-1, -2)).float()
    if scaling is not None:
        scores *= scaling
    return scores.softmax(dim=-1)


def recorder() -> Recorder | None:
    """The recorder of the forward running in this thread, if its rows are wanted."""
    return _RECORDING.get()


@contextlib.contextmanager
def recording(runner: KosmosRunner) -> Iterator[Recorder | None]:
    """Record the attention of the forward run inside, where the runner was asked to (`--attention`)."""
    if not runner.settings.attention:
        yield None
        return
    current = Recorder(runner.prompt_length - PROMPT_EXTRA_TOKENS, ATTENTION_LAYERS)
    token = _RECORDING.set(current)
    try:
        yield current
    finally:
        _RECORDING.reset(token)
