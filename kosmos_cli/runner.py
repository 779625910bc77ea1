"""Load Kosmos-2.5 and generate text for batches of images; the only module that imports torch."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kosmos_cli.document import Finish, Generation, Task
from kosmos_cli.errors import GenerationError, ModelLoadError

if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "microsoft/kosmos-2.5"
MODEL_ENV = "KOSMOS_MODEL"  # overrides DEFAULT_MODEL
MODEL_TYPE = "kosmos-2.5"  # config.json model_type of every Kosmos-2.5 checkpoint
TASK_PROMPTS = {Task.MD: "<md>", Task.OCR: "<ocr>"}
DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")
LOAD_HINT = "download it once with `kosmos download` (needs network), or pass a local folder with --model"


def default_model() -> str:
    """Return the model named by `KOSMOS_MODEL`, else the hub default."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL


@dataclass(frozen=True)
class Request:
    """One image to transcribe; `key` is the caller's handle, returned untouched."""

    key: object
    image: Image.Image
    task: Task


class Runner(Protocol):
    """Turns requests into generations, in any order, one answer per request."""

    max_new_tokens: int

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Yield each request with its generation, or the error that stopped it."""
        ...


@dataclass(frozen=True)
class Settings:
    """How to load the model; every field has a CLI option of the same name."""

    model: str = DEFAULT_MODEL
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "auto"
    batch_size: int | None = None  # None: chosen from the device
    max_new_tokens: int | None = None  # None: what the position table allows after the prompt


class KosmosRunner:
    """A loaded Kosmos-2.5 model and processor with greedy batched generation."""

    def __init__(self, *, model: Any, processor: Any, settings: Settings, device: str, dtype: Any) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings
        self.device = device
        self.dtype = dtype
        self.prompt_length = processor.num_image_tokens + 4  # <s> <image> ... </image> <task>
        self.max_new_tokens = settings.max_new_tokens or max_new_tokens_allowed(model.config, self.prompt_length)
        self.batch_size = settings.batch_size or default_batch_size(device)

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Generate for requests in batches of `batch_size`, halving a batch that runs out of memory."""
        iterator = iter(requests)
        while batch := list(islice(iterator, self.batch_size)):
            yield from self._generate_or_split(batch)

    def _generate_or_split(
        self, batch: list[Request]
    ) -> Iterator[tuple[Request, Generation | GenerationError]]:
        try:
            generations = self.generate_batch(batch)
        except Exception as error:  # one place that turns a failing batch into per-page errors
            if not _is_out_of_memory(error) and len(batch) == 1:
                yield batch[0], GenerationError(f"generation failed: {_describe(error)}")
                return
            if len(batch) == 1:
                yield batch[0], GenerationError("out of memory even alone", hint="try --dtype bfloat16 or --device cpu")
                return
            logger.warning("batch of %d failed (%s); retrying in halves", len(batch), _describe(error))
            _release_memory()
            half = len(batch) // 2
            yield from self._generate_or_split(batch[:half])
            yield from self._generate_or_split(batch[half:])
            return
        yield from zip(batch, generations)

    def generate_batch(self, batch: Sequence[Request]) -> list[Generation]:
        """Run one greedy `generate` call on a batch whose prompts all have the same length."""
        import torch

        inputs = self.processor(
            text=[TASK_PROMPTS[r.task] for r in batch], images=[r.image for r in batch], return_tensors="pt"
        )
        resized = [(int(w), int(h)) for w, h in zip(inputs.pop("width"), inputs.pop("height"))]
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["flattened_patches"] = inputs["flattened_patches"].to(self.dtype)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, generation_config=greedy_config(self.model, self.max_new_tokens)
            )
        new_ids = output[:, inputs["input_ids"].shape[1] :].cpu()
        return [self._to_generation(ids, size) for ids, size in zip(new_ids, resized)]

    def _to_generation(self, ids: torch.Tensor, resized_size: tuple[int, int]) -> Generation:
        eos = self.model.generation_config.eos_token_id
        tokens = ids.tolist()
        if eos in tokens:
            tokens = tokens[: tokens.index(eos)]
            finish = Finish.EOS
        else:
            finish = Finish.LENGTH
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(text=text, resized_size=resized_size, token_count=len(tokens), finish=finish)


def greedy_config(model: Any, max_new_tokens: int) -> Any:
    """Build an explicit greedy generation config, ignoring what the checkpoint ships."""
    from transformers import GenerationConfig

    shipped = model.generation_config
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        bos_token_id=shipped.bos_token_id,
        eos_token_id=shipped.eos_token_id,
        pad_token_id=shipped.pad_token_id,
    )


def max_new_tokens_allowed(config: Any, prompt_length: int) -> int:
    """Return how many tokens fit in the text model's position table after the prompt."""
    return int(config.text_config.max_position_embeddings) - prompt_length


def default_batch_size(device: str) -> int:
    """Pick a batch size that keeps the device busy without running out of memory."""
    if device.startswith("cuda"):
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
        kv_bytes_per_page = 576 * 2**20  # bf16 KV cache for 4096 tokens (144 KiB per token)
        return max(1, min(64, int(free_bytes * 0.7 // kv_bytes_per_page)))
    return 1 if device == "cpu" else 4


def resolve_device(device: str) -> str:
    """Turn `auto` into the best device present, and check an explicit one exists."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device `{device}` was asked for but CUDA is not available on this machine",
                hint="use --device cpu, or install a CUDA build of torch",
            )
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"device `{device}` does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return device
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device `mps` was asked for but is not available", hint="use --device cpu")
    if device not in ("cpu", "mps"):
        raise ModelLoadError(f"unknown device `{device}`", hint="use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """Turn `auto` into bf16 on GPUs that support it, fp16 on other GPUs and fp32 on CPU."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.float16 if device == "mps" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype `{dtype}`", hint="use auto, bfloat16, float16 or float32")
    return getattr(torch, dtype)  # type: ignore[no-any-return]


def resolve_attn(attn: str, device: str, dtype: torch.dtype) -> str:
    """Pick flash attention 2 when installed and usable, else SDPA."""
    import torch

    flash_usable = device.startswith("cuda") and dtype in (torch.float16, torch.bfloat16)
    if attn == "auto":
        return "flash_attention_2" if flash_usable and _flash_attn_installed() else "sdpa"
    if attn not in ATTENTIONS:
        raise ModelLoadError(f"unknown attention `{attn}`", hint="use auto, sdpa, eager or flash_attention_2")
    if attn == "flash_attention_2" and not (flash_usable and _flash_attn_installed()):
        raise ModelLoadError(
            "flash_attention_2 needs the flash-attn package, a CUDA device and --dtype bfloat16/float16",
            hint="use --attn sdpa",
        )
    return attn


def _flash_attn_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def load_runner(settings: Settings) -> KosmosRunner:
    """Load the processor and model named by `settings`, raising ModelLoadError with a hint on failure."""
    from transformers import AutoConfig, AutoProcessor, Kosmos2_5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    attn = resolve_attn(settings.attn, device, dtype)
    source = settings.model
    if Path(source).exists() and not Path(source, "config.json").is_file():
        raise ModelLoadError(
            f"`{source}` is not a Kosmos-2.5 checkpoint: it has no config.json", hint=LOAD_HINT
        )
    try:
        config = AutoConfig.from_pretrained(source, revision=settings.revision)
        if config.model_type != MODEL_TYPE:
            raise ModelLoadError(
                f"`{source}` is a `{config.model_type}` checkpoint, not Kosmos-2.5",
                hint=f"pass a Kosmos-2.5 checkpoint, e.g. --model {DEFAULT_MODEL}",
            )
        processor = AutoProcessor.from_pretrained(source, revision=settings.revision)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the load report lists nothing actionable for a complete checkpoint
        try:
            model = Kosmos2_5ForConditionalGeneration.from_pretrained(
                source, revision=settings.revision, dtype=dtype, attn_implementation=attn
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as error:
        raise _load_error(source, error) from error
    model.to(device).eval()
    logger.info("loaded %s on %s as %s with %s attention", source, device, dtype, attn)
    return KosmosRunner(model=model, processor=processor, settings=settings, device=device, dtype=dtype)


def _load_error(source: str, error: Exception) -> ModelLoadError:
    """Explain why from_pretrained failed in one line."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, GatedRepoError):
        return ModelLoadError(f"model `{source}` is gated", hint="log in with `hf auth login`")
    if isinstance(error, RepositoryNotFoundError):
        return ModelLoadError(f"model `{source}` was not found on the hub", hint="check the id, or pass a folder")
    if isinstance(error, RevisionNotFoundError):
        return ModelLoadError(f"revision not found for model `{source}`", hint="check --revision")
    if Path(source).exists():
        return ModelLoadError(f"`{source}` is not a usable Kosmos-2.5 checkpoint: {_describe(error)}")
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    where = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the hub could not be reached"
    return ModelLoadError(f"model `{source}` is not in the Hugging Face cache and {where}", hint=LOAD_HINT)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _is_out_of_memory(error: BaseException) -> bool:
    return "out of memory" in str(error).lower() or type(error).__name__ == "OutOfMemoryError"


def _release_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def download_model(model: str, *, revision: str | None = None, to: Path | None = None) -> Path:
    """Fetch a checkpoint into the Hugging Face cache (or a folder) and return where it is."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = snapshot_download(model, revision=revision, local_dir=to)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        raise _load_error(model, error) from error
    return Path(path)


def cached_model_path(model: str, *, revision: str | None = None) -> Path | None:
    """Return the cached snapshot folder of a hub model, or None when it is not fully cached."""
    from huggingface_hub import try_to_load_from_cache

    if Path(model).is_dir():
        return Path(model)
    found = try_to_load_from_cache(model, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None
