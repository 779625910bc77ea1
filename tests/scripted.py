"""A scripted Runner for tests whose subject is not the model: its output is a hash of each image.

Two different pages give different text, so a test sees at once when one page's output lands in
another's file; the same page always gives the same text, so reruns compare byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

from kosmos_cli.errors import GenerationError
from kosmos_cli.model import Request
from kosmos_cli.values import Generation, Task

MAX_NEW_TOKENS = 16


class ScriptedRunner:
    """Answer each request with text derived from its pixels: `page <hash>` or one OCR line."""

    max_new_tokens = MAX_NEW_TOKENS

    def __init__(self) -> None:
        self.seen: list[str] = []  # the hash of every image asked for, in order

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        for request in requests:
            digest = hashlib.sha256(request.image.tobytes()).hexdigest()[:12]
            self.seen.append(digest)
            width, height = request.image.size
            if request.task is Task.MD:
                text = f"# page {digest}"
            else:
                text = f"<bbox><x_1><y_1><x_{width - 1}><y_{height - 1}></bbox>page {digest}"
            yield request, Generation(text, (width, height), ids=(7, 7, 7, 7))


def image_hash(image_bytes: bytes) -> str:
    """Return the hash the runner writes for an image's raw RGB bytes."""
    return hashlib.sha256(image_bytes).hexdigest()[:12]
