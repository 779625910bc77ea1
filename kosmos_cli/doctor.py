"""Collect what a bug report needs: versions, the device and dtype kosmos would pick, and a smoke run."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import tempfile
import time
from pathlib import Path

from kosmos_cli.config import Settings, default_model
from kosmos_cli.model.loading import (
    cached_model_path,
    hub_offline,
    load_runner,
    resolve_device,
    resolve_dtype,
)

PACKAGES = (
    "kosmos-transcribe",
    "torch",
    "transformers",
    "tokenizers",
    "pillow",
    "pymupdf",
    "typer",
    "rich",
)
OPTIONAL_PACKAGES = ("flash-attn", "ray")


def diagnose(*, smoke: bool = True) -> list[tuple[str, str]]:
    """Return (name, value) rows describing this installation; `smoke` runs a tiny random model once."""
    import torch

    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    for name in PACKAGES + OPTIONAL_PACKAGES:
        rows.append((name, _version(name)))
    device = resolve_device("auto")
    rows.append(("device", _describe_device(device)))
    rows.append(("dtype", str(resolve_dtype("auto", device)).removeprefix("torch.")))
    rows.append(("torch threads", str(torch.get_num_threads())))
    attention = ["sdpa", "eager"] + (
        ["flash_attention_2"] if _version("flash-attn") != "not installed" else []
    )
    rows.append(("attention", ", ".join(attention)))
    rows.append(("HF cache", os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")))
    rows.append(("offline", "yes (HF_HUB_OFFLINE)" if hub_offline() else "no"))
    model = default_model()
    cached = cached_model_path(model)
    rows.append((f"model {model}", f"cached at {cached}" if cached else "not cached (run `kosmos download`)"))
    if smoke:
        rows.append(("smoke run", _smoke_run(device)))
    return rows


def _smoke_run(device: str) -> str:
    """Build a tiny random Kosmos-2.5, load it the way real checkpoints load, and generate one page."""
    from PIL import Image

    from kosmos_cli.model import Request
    from kosmos_cli.testing import save_random_checkpoint
    from kosmos_cli.values import Task

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kosmos-doctor-") as folder:
        path = save_random_checkpoint(Path(folder), size="tiny")
        runner = load_runner(Settings(model=str(path), device=device, max_new_tokens=4))
        image = Image.new("RGB", (64, 48), "white")
        [(_, outcome)] = list(runner.generate([Request(0, image, Task.OCR)]))
    elapsed = time.monotonic() - started
    if isinstance(outcome, Exception):
        return f"failed: {outcome}"
    return f"ok: {outcome.token_count} tokens on {device} in {elapsed:.1f}s"


def _describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    return f"{device} ({os.cpu_count()} cores)" if device == "cpu" else device


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
