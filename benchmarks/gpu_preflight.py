"""The GPU check's first step: everything it imports is there, at versions that work together, in seconds.

    python benchmarks/gpu_preflight.py [--cuda]

It reads the requirements of kosmos (pyproject.toml) and of the packages the check carries or leans
on, compares them with what is installed, imports torch, transformers' Kosmos-2.5, PyMuPDF and kosmos,
and with `--cuda` asks for a CUDA GPU and Triton. It prints one line, `preflight: ok: VERSIONS`, or
`preflight: PROBLEM` and exits 1: a missing or mismatched carry stops the check at once, before a
minute of GPU time goes to building a model that cannot load.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The distributions whose own requirements must hold: what the check carries, and what they import.
CHECKED = ("transformers", "pymupdf", "huggingface-hub", "tokenizers", "safetensors")


def unmet_requirements() -> list[str]:
    """Return one line for each requirement of kosmos or of a CHECKED package that is not installed."""
    import tomllib
    from packaging.requirements import Requirement

    kosmos = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [("kosmos", Requirement(line)) for line in kosmos]
    for name in CHECKED:
        try:
            needs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # named by kosmos's own requirements if it matters
        wanted += [(f"{name} {importlib.metadata.version(name)}", Requirement(line)) for line in needs]
    problems = []
    for who, requirement in wanted:
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        try:
            found = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{who} needs {requirement}, which is not installed")
            continue
        if not requirement.specifier.contains(found, prereleases=True):
            problems.append(f"{who} needs {requirement}, found {found}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="also require a CUDA GPU and Triton")
    args = parser.parse_args(argv)
    problems = unmet_requirements()
    if problems:
        print(f"preflight: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        for problem in problems[1:]:
            print(f"  also: {problem}", file=sys.stderr)
        return 1
    try:
        import pymupdf
        import torch
        import transformers
        from transformers import Kosmos2_5ForConditionalGeneration  # noqa: F401

        import kosmos_cli
        from kosmos_cli.model.loading import load_runner  # noqa: F401
        from kosmos_cli.model.slots import triton_available
    except Exception as error:  # any import failure is the one line this step exists for
        print(f"preflight: cannot import: {type(error).__name__}: {error}".splitlines()[0])
        return 1
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    if args.cuda and not torch.cuda.is_available():
        print("preflight: torch sees no CUDA GPU")
        return 1
    if args.cuda and not triton_available():
        print("preflight: Triton is not installed (the slot kernel and --cuda-graph need it)")
        return 1
    hub = importlib.metadata.version("huggingface-hub")
    print(
        f"preflight: ok: python {platform.python_version()}, torch {torch.__version__} ({gpu}), "
        f"transformers {transformers.__version__}, huggingface-hub {hub}, "
        f"pymupdf {pymupdf.VersionBind}, triton {'yes' if triton_available() else 'no'}, "
        f"kosmos {kosmos_cli.__version__}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
