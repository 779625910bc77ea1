"""Load Kosmos-2.5: pick the device, dtype and attention, find the weights (hub, cache, folder)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kosmos_cli.config import DEFAULT_MODEL, Settings
from kosmos_cli.errors import ModelLoadError, UsageError, first_line
from kosmos_cli.model.patches import (
    cast_weights,
    fit_positions,
    native_bf16_cpu,
    own_weights,
    quantize_int8,
    trim_heap,
    use_onednn_linears,
    use_sdpa_in_vision,
)
from kosmos_cli.model.runner import KosmosRunner
from kosmos_cli.model.sizing import available_cores
from kosmos_cli.model.slots import fixed_slots, use_slot_attention

if TYPE_CHECKING:
    import torch
logger = logging.getLogger(__name__)

MODEL_TYPE = "kosmos-2.5"  # config.json model_type of every Kosmos-2.5 checkpoint
HUB_CONNECT_TIMEOUT = 5.0  # seconds to open a connection to the hub before calling it unreachable
LOAD_HINT = "download it once with `kosmos download` (needs network), or pass a local folder with --model"
# `kosmos download` itself needs the hub: where there is none, the weights come from another machine.
DOWNLOAD_HINT = (
    "run `kosmos download --to DIR` where the hub can be reached, copy DIR here and pass --model DIR"
)


def output_settings(settings: Settings, *, resolve: bool = True) -> dict[str, Any]:
    """Return every model setting that changes outputs, resolved as `load_runner` resolves it.

    The model is named by what is in it: a hub model by the cached snapshot's commit, a folder by
    its files' names, sizes and modification times, so new weights in the same folder count as a
    change. Resolving the device and dtype imports torch but loads nothing; `resolve=False` keeps
    them as asked (a Ray driver may have no GPU of its own).
    """
    dtype, attn = settings.dtype, settings.attn
    if resolve:
        device = resolve_device(settings.device)
        resolved = resolve_dtype(settings.dtype, device, quantize=settings.quantize)
        dtype, attn = str(resolved).removeprefix("torch."), resolve_attn(settings.attn, device, resolved)
    return {
        "model": model_identity(settings.model, settings.revision),
        "dtype": dtype,
        "attn": attn,
        "quantize": settings.quantize,
        "kv_dtype": settings.kv_dtype,
        "max_new_tokens": settings.max_new_tokens,
        "compile": settings.compile,
        "cuda_graph": settings.cuda_graph,
        "detect_loops": settings.detect_loops,
        **({"attention": True} if settings.attention else {}),  # runs made without it keep their name
    }


def model_identity(model: str, revision: str | None) -> str:
    """Name a checkpoint by its contents where they can be seen without loading it."""
    import hashlib

    folder = Path(model)
    if folder.is_dir():
        files = sorted(path for path in folder.iterdir() if path.is_file())
        listing = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files]
        return "folder:" + hashlib.sha256(repr(listing).encode()).hexdigest()[:32]
    cached = cached_model_path(model, revision=revision)
    return f"{model}@{cached.name if cached is not None else revision or 'main'}"


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
                f"device `{device}` does not exist: "
                f"this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return device
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device `mps` was asked for but is not available", hint="use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str, *, quantize: str | None = None) -> torch.dtype:
    """Turn `auto` into bf16 where the hardware computes in it, else fp16 on GPU and fp32 on CPU.

    On CPU, bf16 needs native instructions (AVX512-BF16 or AMX): with them its oneDNN matmuls run
    about twice as fast as fp32 (BENCHMARKS.md); without them bf16 is emulated and slower.
    `--quantize int8` starts from fp32 weights, so `auto` is fp32 then.
    """
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return (
                torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
            )
        if device == "mps":
            return torch.float16
        return torch.bfloat16 if quantize is None and native_bf16_cpu() else torch.float32
    return getattr(torch, dtype)


def resolve_kv_dtype(kv_dtype: str, device: str, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: the weights' for `auto`; float8 is e4m3, which CUDA GPUs read from 8.9 on."""
    import torch

    if kv_dtype == "auto":
        return dtype
    if kv_dtype == "float8":
        if device.startswith("cuda") and torch.cuda.get_device_capability(torch.device(device)) < (8, 9):
            raise UsageError(
                "--kv-dtype float8 needs a GPU of compute capability 8.9 or later (Ada, Hopper)",
                hint="use --kv-dtype float16 or leave it auto",
            )
        return torch.float8_e4m3fn
    return getattr(torch, kv_dtype)


def resolve_attn(attn: str, device: str, dtype: torch.dtype) -> str:
    """Pick flash attention 2 when installed and usable, else SDPA."""
    import torch

    flash_usable = device.startswith("cuda") and dtype in (torch.float16, torch.bfloat16)
    if attn == "auto":
        return "flash_attention_2" if flash_usable and _flash_attn_installed() else "sdpa"
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
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, quantize=settings.quantize)
    attn = resolve_attn(settings.attn, device, dtype)
    check_speed_settings(settings, device, dtype)
    kv_dtype = resolve_kv_dtype(settings.kv_dtype, device, dtype)
    from safetensors import SafetensorError

    source = settings.model
    if Path(source).exists() and not Path(source, "config.json").is_file():
        raise ModelLoadError(
            f"`{source}` is not a Kosmos-2.5 checkpoint: it has no config.json", hint=LOAD_HINT
        )
    # A cached model loads without touching the network: no hub round trip on every run, and no
    # retries that stall an offline machine. Only a model that is not (fully) cached is fetched.
    cached = cached_model_path(source, revision=settings.revision) is not None
    if not cached and not hub_offline():
        if not Path(source).exists():
            require_hub(source)
        logger.warning("model `%s` is not cached; fetching it from the hub (about 5.5 GB)", source)
    # On CPU the checkpoint loads as stored, memory-mapped, and is cast tensor by tensor
    # (`cast_weights`): transformers' own conversion keeps every page it read (bf16 peaked at 7.9 GiB).
    load_dtype = "auto" if device == "cpu" else dtype
    try:
        try:
            processor, model = _load_parts(settings, load_dtype, attn, local_only=cached)
        except OSError:
            if not cached or Path(source).is_dir():
                raise
            processor, model = _load_parts(settings, load_dtype, attn, local_only=False)  # a partial cache
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        # A damaged folder raises whatever its reader raises: a truncated safetensors file, a bad pickle.
        raise _load_error(source, error) from error
    if device == "cpu":
        cast_weights(model, dtype)
    model.to(device).eval()
    logger.info("loaded %s on %s as %s with %s attention", source, device, dtype, attn)
    runner = KosmosRunner(
        model=model, processor=processor, settings=settings, device=device, dtype=dtype, kv_dtype=kv_dtype
    )
    prepare_for_speed(runner)
    return runner


def _load_parts(settings: Settings, dtype: Any, attn: str, *, local_only: bool) -> tuple[Any, Any]:
    """Load and check the config, then the processor and the model, from the cache only if asked."""
    from transformers import AutoConfig, AutoProcessor, Kosmos2_5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    source, revision = settings.model, settings.revision
    config = AutoConfig.from_pretrained(source, revision=revision, local_files_only=local_only)
    if config.model_type != MODEL_TYPE:
        raise ModelLoadError(
            f"`{source}` is a `{config.model_type}` checkpoint, not Kosmos-2.5",
            hint=f"pass a Kosmos-2.5 checkpoint, e.g. --model {DEFAULT_MODEL}",
        )
    processor = AutoProcessor.from_pretrained(source, revision=revision, local_files_only=local_only)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report lists nothing actionable for a complete checkpoint
    # transformers draws a "Loading weights" bar into the caller's terminal: a library stays quiet
    # unless its caller asked kosmos for its progress (INFO on the `kosmos_cli` logger, as -v does).
    progress = hf_logging.is_progress_bar_enabled()
    if not logger.isEnabledFor(logging.INFO):
        hf_logging.disable_progress_bar()
    try:
        model = Kosmos2_5ForConditionalGeneration.from_pretrained(
            source,
            revision=revision,  # type: ignore[arg-type]
            dtype=dtype,
            attn_implementation=attn,
            local_files_only=local_only,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    return processor, model


def check_speed_settings(settings: Settings, device: str, dtype: Any) -> None:
    """Reject --quantize and --cuda-graph where `auto` chose a device they cannot use (`Settings`
    checks the rest)."""
    import torch

    if settings.quantize is not None and (device != "cpu" or dtype != torch.float32):
        raise UsageError(
            f"--quantize int8 runs on CPU in float32, and --device auto chose {device}",
            hint="add --device cpu",
        )
    if settings.cuda_graph and not fixed_slots(device):
        reason = "Triton is not installed" if device.startswith("cuda") else f"--device auto chose {device}"
        raise UsageError(f"--cuda-graph needs a CUDA GPU with Triton, and {reason}", hint="drop --cuda-graph")


def prepare_for_speed(runner: KosmosRunner) -> None:
    """Set CPU threads, quantize, and size the position table for a loaded runner, as its settings ask."""
    import torch

    settings = runner.settings
    if runner.device == "cpu":
        threads = settings.threads or available_cores()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    fit_positions(runner.model, runner.prompt_length + runner.max_new_tokens)
    if runner.model.config.vision_config._attn_implementation != "eager":
        use_sdpa_in_vision(runner.model)
    if not settings.compile:
        use_slot_attention(runner.model)
    changed = False
    if settings.quantize == "int8":
        quantize_int8(runner.model)
        changed = True
    if runner.device == "cpu" and not settings.compile:
        changed = use_onednn_linears(runner.model) > 0 or changed  # what int8 left in float too
    if changed:
        own_weights(runner.model)
    if runner.device == "cpu":
        trim_heap()
    logger.info("batch size %d, %d CPU threads", runner.batch_size, torch.get_num_threads())


def _load_error(source: str, error: Exception) -> ModelLoadError:
    """Explain why from_pretrained failed in one line."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    cause: BaseException | None = error
    while cause is not None:  # transformers wraps hub errors in an OSError
        if isinstance(cause, GatedRepoError):
            return ModelLoadError(f"model `{source}` is gated", hint="log in with `hf auth login`")
        if isinstance(cause, RepositoryNotFoundError):
            return ModelLoadError(
                f"model `{source}` was not found on the hub", hint="check the id, or pass a folder"
            )
        if isinstance(cause, RevisionNotFoundError):
            return ModelLoadError(f"revision not found for model `{source}`", hint="check --revision")
        cause = cause.__cause__ or cause.__context__
    if Path(source).exists():
        damaged = _damaged_weights(Path(source))
        if damaged is not None:
            return ModelLoadError(
                f"`{damaged}` is damaged: {first_line(error)}",
                hint="download the checkpoint again (`kosmos download --to DIR`)",
            )
        return ModelLoadError(f"`{source}` is not a usable Kosmos-2.5 checkpoint: {first_line(error)}")
    where = "offline mode is on (HF_HUB_OFFLINE)" if hub_offline() else "the hub could not be reached"
    return ModelLoadError(f"model `{source}` is not in the Hugging Face cache and {where}", hint=LOAD_HINT)


def _damaged_weights(folder: Path) -> Path | None:
    """Return the first weights file in a checkpoint folder that does not open, if any."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as weights:
                weights.keys()
        except (SafetensorError, OSError):
            return path
    return next(iter(sorted(folder.glob("*.bin"))), None)


def download_model(model: str, *, revision: str | None = None, to: Path | None = None) -> Path:
    """Fetch a checkpoint into the Hugging Face cache (or a folder) and return where it is."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if not hub_offline():
        require_hub(model, downloading=True)
    try:
        path = snapshot_download(model, revision=revision, local_dir=to)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as error:
        raise _load_error(model, error) from error
    return Path(path)


def require_hub(model: str, *, downloading: bool = False) -> None:
    """Fail at once when the hub cannot be reached, not after huggingface_hub's 23 s of retries.

    One TCP connection to the hub's endpoint, unless a proxy is configured (then the proxy decides,
    and huggingface_hub's own retries apply, as they do once the hub has answered).
    """
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    if urllib.request.getproxies():
        return
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError as error:
        where = f"({constants.ENDPOINT}: {first_line(error)})"
        if downloading:
            raise ModelLoadError(
                f"cannot download `{model}`: the hub could not be reached {where}", hint=DOWNLOAD_HINT
            ) from error
        raise ModelLoadError(
            f"model `{model}` is not in the Hugging Face cache and the hub could not be reached {where}",
            hint=LOAD_HINT,
        ) from error


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (HF_HUB_OFFLINE, read once when it was imported)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_model_path(model: str, *, revision: str | None = None) -> Path | None:
    """Return the cached snapshot folder of a hub model, or None when it is not fully cached."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if Path(model).is_dir():
        return Path(model)
    try:
        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except HFValidationError:  # neither a folder nor a valid hub id, e.g. a path that does not exist
        return None
    return Path(found).parent if isinstance(found, str) else None
