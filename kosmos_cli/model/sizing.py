"""How much decodes at once: pages per batch from free memory, the KV bytes of a token, the cores to use."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

CPU_BATCH_SIZE = 4  # pages decoding together on CPU: a step of 4 costs 1.8x a step of 1 (BENCHMARKS.md)
CPU_MEMORY_SHARE = 0.5  # of available RAM given to the KV cache
CUDA_MEMORY_SHARE = 0.7  # of free GPU memory given to the KV cache (the rest: weights' activations, prefill)


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
