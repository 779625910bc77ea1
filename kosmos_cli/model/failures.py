"""What a page can make the model raise, and what becomes of it: a page's error, memory given back."""

from __future__ import annotations

from kosmos_cli.errors import GenerationError, first_line

# What a page can make the model raise: out of memory (torch.OutOfMemoryError), a CUDA or shape error
# on that input (RuntimeError). Anything else is a bug in kosmos and ends the run with a traceback.
PAGE_ERRORS = (RuntimeError, MemoryError)


def page_error(error: BaseException) -> GenerationError:
    """Turn what stopped a page that ran alone into its error."""
    if is_out_of_memory(error):
        return GenerationError("out of memory even alone", hint="try --dtype bfloat16 or --device cpu")
    return GenerationError(f"generation failed: {first_line(error)}")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the device ran out of memory."""
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


def release_memory() -> None:
    """Hand cached GPU memory back to the driver (after a failure, before trying smaller)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
