"""`POST /v1/chat/completions` in OpenAI's shape, for clients built for vLLM-served OCR models.

A request holds one user message with an image as a data URI (`image_url`; remote URLs are not
fetched) and the text `<md>` or `<ocr>`, or names the model `kosmos-2.5-md` or `kosmos-2.5-ocr`.
The answer is the page's markdown or its OCR text (`kosmos ocr`'s txt: a box and its text a line);
with `stream: true`, server-sent events: markdown line by line as the model finishes each line, OCR
text once the page is done.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from kosmos_cli.errors import UsageError
from kosmos_cli.parsing import tidy_markdown
from kosmos_cli.values import Task
from kosmos_cli.vocabulary import PROMPT_LENGTH

MODELS = {"kosmos-2.5-md": Task.MD, "kosmos-2.5-ocr": Task.OCR}
UPLOAD_NAME = "image"  # what a chat's image is called in its job: its bytes say what kind it is
_DATA_URI = re.compile(r"data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,(.*)", re.DOTALL)


@dataclass(frozen=True)
class ChatRequest:
    """What a chat completion asks for."""

    task: Task
    image: bytes
    model: str
    stream: bool


def parse_request(body: Any) -> ChatRequest:
    """Read a chat completion request; raises UsageError, with what is wrong, for anything else."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise UsageError("a chat completion needs `messages`, a list")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise UsageError("`model` must be a string")
    users = [m for m in body["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise UsageError("no user message", hint="send one user message with an image and `<md>` or `<ocr>`")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise UsageError("the user message's `content` must be a string or a list of parts")
    texts = [p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text"]
    images = [p.get("image_url") for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
    if len(images) != 1:
        raise UsageError(f"the user message has {len(images)} images; send exactly one")
    url = images[0].get("url") if isinstance(images[0], dict) else images[0]
    if not isinstance(url, str):
        raise UsageError("`image_url` needs a `url`")
    match = _DATA_URI.fullmatch(url.strip())
    if match is None:
        raise UsageError(
            "the image must be a base64 data URI",
            hint="fetching remote URLs is not offered: send data:image/...;base64,...",
        )
    try:
        image = base64.b64decode(match.group(3), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError("the image's data URI is not valid base64") from None
    text = " ".join(t for t in texts if isinstance(t, str))
    asked = [task for task in Task if f"<{task.value}>" in text]
    if len(asked) > 1:
        raise UsageError("the text asks for both `<md>` and `<ocr>`")
    task = asked[0] if asked else MODELS.get(model)
    if task is None:
        raise UsageError(
            "say `<md>` or `<ocr>` in the text, or use the model kosmos-2.5-md or kosmos-2.5-ocr",
            hint="GET /v1/models lists them",
        )
    return ChatRequest(task, image, model or f"kosmos-2.5-{task.value}", bool(body.get("stream")))


def models() -> dict[str, Any]:
    """`GET /v1/models`."""
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": 0, "owned_by": "kosmos"} for name in MODELS],
    }


def completion(
    answer_id: str, request: ChatRequest, text: str, tokens: int, truncated: bool
) -> dict[str, Any]:
    """The whole answer, as one `chat.completion`."""
    return {
        "id": answer_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length" if truncated else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": PROMPT_LENGTH,
            "completion_tokens": tokens,
            "total_tokens": PROMPT_LENGTH + tokens,
        },
    }


def chunk(
    answer_id: str, request: ChatRequest, created: int, delta: dict[str, str], finish: str | None = None
) -> bytes:
    """One server-sent event: a `chat.completion.chunk` with `delta`, and why it ended on the last."""
    event = {
        "id": answer_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": request.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return event_bytes(event)


def event_bytes(event: dict[str, Any] | str) -> bytes:
    """A server-sent event carrying `event` (JSON, or a string such as `[DONE]` as it is)."""
    data = event if isinstance(event, str) else json.dumps(event)
    return b"data: " + data.encode() + b"\n\n"


def settled_markdown(raw: str) -> str:
    """The part of a page's markdown being written that will not change: its finished lines, tidied
    as the page's text will be (`parsing.tidy_markdown`), so each streamed piece extends the last."""
    return tidy_markdown(raw[: raw.rfind("\n") + 1])
