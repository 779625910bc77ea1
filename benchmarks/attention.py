"""One row's decode attention on CPU: the buffers kosmos's slots hand the kernel, against the others.

    python benchmarks/attention.py [--tokens 2100] [--capacity 6052]

A decode step's attention per row and layer: one query over the row's tokens (the full-size model's
16 heads of 96). `GrowingSlots` keeps each slot in one contiguous buffer and runs two matmuls over it
(`slots._row_attention`); the alternatives are the same matmuls over the first columns of a larger
preallocated buffer (a slot of `FixedSlots`, which Triton reads on CUDA), and torch's SDPA. Times are
the median of many calls, in one process, side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from throughput import machine

HEADS, HEAD_DIM = 16, 96


def median_ms(call: Callable[[], Any], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def compare(dtype: Any, tokens: int, capacity: int, repeats: int) -> None:
    """Time the three ways for one row of `tokens` in `dtype`, and print them against kosmos's."""
    import torch

    from kosmos_cli.model.slots import GROW_COLUMNS, _row_attention

    width = -(-tokens // GROW_COLUMNS) * GROW_COLUMNS
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, HEADS, 1, HEAD_DIM, generator=generator).to(dtype)
    grown = torch.zeros(2, HEADS, width, HEAD_DIM, dtype=dtype)
    grown[:, :, :tokens] = torch.randn(2, HEADS, tokens, HEAD_DIM, generator=generator).to(dtype)
    fixed = torch.zeros(2, HEADS, capacity, HEAD_DIM, dtype=dtype)
    fixed[:, :, :tokens] = grown[:, :, :tokens]
    cases = {
        "contiguous slot (GrowingSlots)": lambda: _row_attention(
            query, [grown[0]], [grown[1]], [tokens], None
        ),
        "first columns of a larger slot": lambda: _row_attention(
            query, [fixed[0, :, :tokens]], [fixed[1, :, :tokens]], [tokens], None
        ),
        "SDPA, contiguous": lambda: torch.nn.functional.scaled_dot_product_attention(
            query[0], grown[0, :, :tokens], grown[1, :, :tokens]
        ),
    }
    times = {name: median_ms(call, repeats) for name, call in cases.items()}
    base = times["contiguous slot (GrowingSlots)"]
    for name, ms in times.items():
        print(f"{str(dtype).removeprefix('torch.')} {tokens} tokens, {name}: {ms:.3f} ms ({ms / base:.2f}x)")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2100, help="the row's tokens (a prompt is 2,052)")
    parser.add_argument("--capacity", type=int, default=6052, help="a preallocated slot's columns")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(machine("cpu"))
    for dtype in (torch.bfloat16, torch.float32):
        compare(dtype, args.tokens, args.capacity, args.repeats)


if __name__ == "__main__":
    main()
