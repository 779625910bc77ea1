"""Settings and defaults: the one place each option's choices, default and unit are stated."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_MODEL = "microsoft/kosmos-2.5"
MODEL_ENV = "KOSMOS_MODEL"  # overrides DEFAULT_MODEL
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")
QUANTIZATIONS = ("int8",)
# The reference's budget: microsoft/unilm kosmos-2.5/inference.py generates up to max_len_b=4000 new
# tokens. A dense OCR page costs about 24 tokens a line, so 2,044 (what the 4096-row position table
# leaves after the 2052-token prompt) cut pages of more than about 85 lines; the sinusoidal table is
# grown to fit instead (`fit_positions`).
DEFAULT_MAX_NEW_TOKENS = 4000


def default_model() -> str:
    """Return the model named by `KOSMOS_MODEL`, else the hub default."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


@dataclass(frozen=True)
class Settings:
    """How to load the model and generate; fields have a CLI option of the same name unless noted."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"
    batch_size: int | None = None  # None: chosen from the device and its free memory
    max_new_tokens: int | None = None  # None: what the position table allows after the prompt
    compile: bool = False  # static KV cache + torch.compile'd decode, in fixed batches (GPU)
    quantize: str | None = None  # "int8": dynamic int8 nn.Linear layers (CPU only)
    threads: int | None = None  # CPU threads; None: the cores this process may run on
    detect_loops: bool = True  # stop a page whose output repeats itself (no CLI option)
    ignore_eos: bool = False  # benchmarks only: always generate max_new_tokens (no CLI option)
