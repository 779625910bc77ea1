"""Peak memory while loading the model: the model card's `from_pretrained` against kosmos's `load_runner`.

    python benchmarks/loading.py [--model PATH] [--device cpu]

Each load runs in a fresh process (so one cannot profit from another's pages), sampling its RSS every
50 ms: the peak while loading, and what stays once loaded. kosmos's figure includes what it does
after `from_pretrained` on a CPU (oneDNN-packed linears, int8, copying the rest off the checkpoint's
memory map). Without `--model` it uses the random full-size Kosmos-2.5 (`throughput.random_model`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from throughput import machine, random_model

# Run in a child: load one way, print {"peak": bytes, "after": bytes, "seconds": s}.
CHILD = """
import json, sys, threading, time
import psutil
side, model, device, dtype, quantize = sys.argv[1:6]
process, peak, stop = psutil.Process(), [0], threading.Event()
def sample():
    while not stop.wait(0.05):
        peak[0] = max(peak[0], process.memory_info().rss)
threading.Thread(target=sample, daemon=True).start()
started = time.perf_counter()
if side == "card":
    import torch
    from transformers import Kosmos2_5ForConditionalGeneration
    loaded = Kosmos2_5ForConditionalGeneration.from_pretrained(model, dtype=getattr(torch, dtype)).to(device)
else:
    from kosmos_cli.config import Settings
    from kosmos_cli.model.loading import load_runner
    loaded = load_runner(Settings(model=model, device=device, dtype=dtype, quantize=quantize or None))
seconds = time.perf_counter() - started
stop.set()
after = process.memory_info().rss
print(json.dumps({"peak": max(peak[0], after), "after": after, "seconds": seconds}))
"""
CASES = [  # (dtype, quantize): what a CPU user may ask for
    ("float32", ""),
    ("bfloat16", ""),
    ("float32", "int8"),
]


def load(side: str, model: str, device: str, dtype: str, quantize: str) -> dict[str, float]:
    command = [sys.executable, "-c", CHILD, side, model, device, dtype, quantize]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint (default: the random full-size one)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = args.model or str(random_model())
    print(f"machine: {machine(args.device)}")
    print(f"{'dtype':<16} {'side':<28} {'peak':>10} {'after':>10} {'load s':>8}")
    for dtype, quantize in CASES:
        sides = [("kosmos load_runner", "kosmos")]
        if not quantize:  # the model card has no int8
            sides.insert(0, ("model card from_pretrained", "card"))
        for label, side in sides:
            figures = load(side, model, args.device, dtype, quantize)
            name = f"{dtype}{' int8' if quantize else ''}"
            peak, after = figures["peak"] / 2**30, figures["after"] / 2**30
            print(f"{name:<16} {label:<28} {peak:>6.2f} GiB {after:>6.2f} GiB {figures['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
