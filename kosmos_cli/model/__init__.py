"""The model behind a small protocol: `Runner` turns `Request`s into `Generation`s.

- `loading`: device, dtype and attention choices, the hub and its cache, `load_runner`, `download_model`;
- `runner`: `KosmosRunner`, a loaded model and processor: requests in, generations out;
- `encoding`: the processor run on upcoming pages in threads while the model decodes;
- `continuous`: the running batch, pages joining and leaving their KV-cache slots (the default);
- `slots`: the KV cache of page slots and its decode attention (a Triton kernel on CUDA);
- `graph`: `--cuda-graph`, the continuous batch's decode step captured as a CUDA graph;
- `fixed`: `--compile`, fixed batches through transformers' `generate` with a static cache;
- `sizing`: pages per batch from free memory, the cores to use; `failures`: what a page can raise;
- `patches`: what kosmos changes in a loaded model for speed: attention kernels, oneDNN linears, int8.

Only this package imports torch and transformers, inside functions, so `kosmos --help` stays fast.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kosmos_cli.errors import GenerationError
from kosmos_cli.values import Generation, Task

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class Request:
    """One image to transcribe; `key` is the caller's handle, returned untouched.

    `cancelled`, where given, is asked between decode steps: a page whose caller gave up on it
    (`kosmos serve`'s DELETE) leaves the running batch with a `GenerationError`. `partial`, where
    given, is handed the page's token ids so far after each decode step (the list the loop appends
    to: read it, do not keep it), for answers streamed as they are written.
    """

    key: object
    image: Image.Image
    task: Task
    cancelled: Callable[[], bool] | None = None
    partial: Callable[[list[int]], None] | None = None


@runtime_checkable
class Arrivals(Protocol):
    """Requests that arrive over time, from other processes (`serve.Inbox`): `next` waits for one.

    A runner pulls from such an iterator only what `ready` says is here while it has pages decoding,
    and waits in `next` only when it has nothing else to do.
    """

    def ready(self) -> bool:
        """Whether `next` would return at once."""
        ...


class Runner(Protocol):
    """Turns requests into generations, in any order, one answer per request."""

    max_new_tokens: int

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Yield each request with its generation, or the error that stopped it."""
        ...


class LazyRunner:
    """A Runner that loads its model when the first request comes: a job whose pages all come from
    their PDF's own text (`--text-layer`) never loads one."""

    def __init__(self, load: Callable[[], Runner], max_new_tokens: int) -> None:
        self._load = load
        self._runner: Runner | None = None
        self.max_new_tokens = max_new_tokens

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Load the model on the first request, then hand every request to it."""
        pending = iter(requests)
        first = next(pending, None)
        if first is None:
            return
        if self._runner is None:
            self._runner = self._load()
            self.max_new_tokens = self._runner.max_new_tokens
        yield from self._runner.generate(itertools.chain([first], pending))
