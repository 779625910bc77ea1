"""The model behind a small protocol: `Runner` turns `Request`s into `Generation`s.

- `loading`: device, dtype and attention choices, the hub and its cache, `load_runner`, `download_model`;
- `batching`: `KosmosRunner`, greedy decoding of many pages at once, with pages joining a running batch;
- `patches`: what kosmos changes in a loaded model for speed: attention kernels, oneDNN linears, int8.

Only this package imports torch and transformers, inside functions, so `kosmos --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kosmos_cli.errors import GenerationError
from kosmos_cli.values import Generation, Task

if TYPE_CHECKING:
    from PIL import Image


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
