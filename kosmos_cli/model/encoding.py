"""The processor's side of decoding: each page's model inputs, prepared in threads while the model decodes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kosmos_cli.errors import GenerationError, first_line
from kosmos_cli.model import Arrivals, Request

if TYPE_CHECKING:
    import torch

ENCODE_WORKERS = 4  # processor threads on GPU machines (one on CPU, where cores are busy decoding)


@dataclass(frozen=True)
class Encoded:
    """A request after the processor: model inputs for one page (batch dim 1) and the resized size."""

    inputs: dict[str, torch.Tensor]
    resized_size: tuple[int, int]


class Encoder:
    """Run the processor on upcoming requests in worker threads while the model decodes.

    Requests are pulled from the caller's iterator in the caller's thread (callers such as
    `jobs.run_job` do bookkeeping inside that iterator, which must stay on one thread); only the
    processor call (`encode`), pure CPU work on the image, runs in the workers.
    """

    def __init__(
        self,
        encode: Callable[[Request], Encoded],
        requests: Iterable[Request],
        *,
        depth: int,
        workers: int,
    ) -> None:
        self._encode = encode
        self._requests = iter(requests)
        self._depth = max(1, depth)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kosmos-encode")
        self._pending: deque[tuple[Request, Future[Encoded]]] = deque()
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
            self._pending.append((request, self._pool.submit(self._encode, request)))

    def take(self, count: int, *, wait_for: int) -> list[tuple[Request, Encoded | GenerationError]]:
        """Return up to `count` encoded requests: wait for the first `wait_for`, take the rest if ready."""
        taken: list[tuple[Request, Encoded | GenerationError]] = []
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
