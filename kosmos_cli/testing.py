"""Test doubles: a random-weights Kosmos-2.5 checkpoint built offline, and a scripted `Runner`.

`ScriptedRunner` stands in for the model in tests whose subject is not the model (jobs, naming,
writers, CLI messages): its output is a hash of each image, so a page whose text lands in another
page's file shows at once, and the same page always gives the same bytes.

`save_random_checkpoint` writes a folder laid out like `microsoft/kosmos-2.5`: `tiny` for tests (its
weights drawn wide enough that its output depends on the image), `full` at the real size and init
scale for benchmarks. The folder loads through the same calls as the real checkpoint
(`AutoProcessor.from_pretrained`, `Kosmos2_5ForConditionalGeneration.from_pretrained`) with the
hub offline. Its tokenizer carries the real special and added tokens at the real ids, so prompts,
bbox tokens and `skip_special_tokens` behave as with the real model; only the base vocabulary (the
real one is tiktoken cl100k_base) is replaced by a byte-level vocabulary of our own.

Files written (the transformers 4.x layout of hub repos, which transformers 5 still reads; the real
repo's file list could not be checked offline, see the shard sizes in the notes):
`config.json`, `generation_config.json`, `model.safetensors` (tiny) or
`model-0000N-of-00002.safetensors` + `model.safetensors.index.json` (full, 5 GB shards like the
hub's 5 GB + 503 MB), `preprocessor_config.json`, `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`, `README.md`, and for tiny also `processor_config.json` (its
`num_image_tokens`; full relies on the processor default, 2048).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kosmos_cli.errors import GenerationError
from kosmos_cli.model import Request
from kosmos_cli.tiling import MAX_PATCHES
from kosmos_cli.values import Generation, Task
from kosmos_cli.vocabulary import (
    BASE_VOCAB_END,
    BOS_ID,
    EOS_ID,
    NUM_COORDINATE_BINS,
    NUM_IMAGE_TOKENS,
    PAD_ID,
    VOCAB_SIZE,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CheckpointSize = Literal["tiny", "full"]

TINY_NUM_IMAGE_TOKENS = 8  # latent_query_num of the tiny model (and the processor's num_image_tokens)
FULL_MAX_PATCHES = MAX_PATCHES  # image processor max_patches of the real checkpoint
TINY_MAX_PATCHES = 256  # image processor max_patches written for tiny (see _write_preprocessor_config)
MAX_POSITIONS = 4096  # text max_position_embeddings, the real value for both sizes: same context limit
SHARD_BYTES = 5_000_000_000  # transformers 4.x default max_shard_size "5GB", which gave the hub its 2 shards
INIT_STD = 0.02  # init_std / initializer_range of both sub-configs
# The tiny model's weights are drawn wider than the real init so that its output depends on the image:
# at 0.02 every page gives the same ids, and a batch that hands page B's image to page A looks right.
# A wide vision encoder and projection make the image tokens differ from page to page; a moderate text
# model and softer vision attention (query and key) keep bf16 near fp32 (about 2-4% of the vision
# output; tests/test_generation.py). Measured on 8 same-size pages of rendered text: 8 different `<md>`
# and 8 different `<ocr>` outputs.
TINY_INIT_STD = {"text_model": 0.3, "vision_model": 2.0, "image_to_text_projection": 1.0}
TINY_VISION_QUERY_KEY_STD = 1.0

# Fairseq specials and the Kosmos-2.5 symbols, in id order, with whether each one is "special"
# (dropped by decode(..., skip_special_tokens=True)). transformers' integration test decodes the whole
# sequence with skip_special_tokens=True and gets text starting at <bbox>, so <s>, <image>, </image>,
# <ocr> and <md> are special while <bbox>, </bbox> and the coordinate tokens are plain added tokens.
# <mask> is the tokenizer's mask_token; </chunk> is never produced by the transcription prompts and we
# mark it special too (not verifiable without the real tokenizer.json).
_HEAD_TOKENS: tuple[tuple[str, bool], ...] = (("<s>", True), ("<pad>", True), ("</s>", True), ("<unk>", True))
_KOSMOS_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<mask>", True),
    ("<ocr>", True),
    ("<image>", True),
    ("</image>", True),
    ("</chunk>", True),
    ("<bbox>", False),
    ("</bbox>", False),
    ("<md>", True),
)

# Filler words that pad the base vocabulary to the real size. They are never produced by encoding
# (there are no merges), but a random model emits them, and they decode to readable " bako"-like words.
_FILLER_SYLLABLES = tuple(c + v for c in "bcdfghjklmnprstvz" for v in "aeiou")


@dataclass(frozen=True)
class _TensorSpec:
    """One weight to write: its name, shape and how to initialise it."""

    name: str
    shape: tuple[int, ...]
    init: Literal["normal", "zeros", "ones"]
    std: float = INIT_STD
    zero_row: int | None = None  # padding_idx of an embedding, zeroed as transformers does

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)  # float32


def save_random_checkpoint(dest: Path, *, size: CheckpointSize = "tiny", seed: int = 0) -> Path:
    """Write a random-weights Kosmos-2.5 checkpoint into `dest` (new or empty) and return `dest`."""
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"`{dest}` exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        # Files of an earlier build (say full shards under a tiny model.safetensors) would mix in.
        raise FileExistsError(f"`{dest}` is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    # Build next to dest, then move each file in with os.replace, config.json last: a killed build never
    # leaves a half-written file, and a folder with a config.json is complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        config = _model_config(size)
        _write_tokenizer(staging)
        _write_preprocessor_config(staging, size)
        if size == "tiny":
            _write_json(staging / "processor_config.json", _processor_config(TINY_NUM_IMAGE_TOKENS))
        _write_json(staging / "generation_config.json", _generation_config())
        _write_weights(staging, config, size=size, seed=seed)
        (staging / "README.md").write_text(_readme(size, seed), encoding="utf-8")
        config.save_pretrained(staging)
        names = sorted(p.name for p in staging.iterdir())
        for name in [n for n in names if n != "config.json"] + ["config.json"]:
            os.replace(staging / name, dest / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote a %s random Kosmos-2.5 checkpoint (seed %d) to %s", size, seed, dest)
    return dest


# --- config files -------------------------------------------------------------------------------


def _model_config(size: CheckpointSize) -> Any:
    """Return the Kosmos2_5Config for `size` (the real defaults for full)."""
    from transformers import Kosmos2_5Config

    # Text dropout is 0 in the hub config.json (the class default is 0.1); it only matters for training.
    text: dict[str, Any] = {"dropout": 0.0, "max_position_embeddings": MAX_POSITIONS}
    vision: dict[str, Any] = {}
    latent_query_num = NUM_IMAGE_TOKENS
    if size == "tiny":
        text.update(embed_dim=32, layers=2, ffn_dim=64, attention_heads=2)
        # max_num_patches sizes the row/column embedding tables, indexed by 1-based patch row/column ids.
        # Kosmos2_5Processor passes max_patches=4096 to the image processor unless the caller passes
        # max_patches, so the tables must cover 4096 rows even though preprocessor_config says 256.
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            head_dim=16,
            num_attention_heads=2,
            num_hidden_layers=1,  # the vision encoder runs on 4096 patches by default: keep it cheap
            max_num_patches=FULL_MAX_PATCHES,
        )
        latent_query_num = TINY_NUM_IMAGE_TOKENS
    config = Kosmos2_5Config(text_config=text, vision_config=vision, latent_query_num=latent_query_num)
    config.architectures = ["Kosmos2_5ForConditionalGeneration"]
    config.dtype = "float32"
    return config


def _generation_config() -> dict[str, Any]:
    # Greedy, as the hub file (which spells num_beams as "num_beam").
    return {
        "bos_token_id": BOS_ID,
        "do_sample": False,
        "eos_token_id": EOS_ID,
        "num_beams": 1,
        "pad_token_id": PAD_ID,
    }


def _processor_config(num_image_tokens: int) -> dict[str, Any]:
    return {"num_image_tokens": num_image_tokens, "processor_class": "Kosmos2_5Processor"}


def _write_preprocessor_config(folder: Path, size: CheckpointSize) -> None:
    # Kosmos2_5Processor always passes its own default max_patches=4096 to the image processor unless
    # the caller passes max_patches, so TINY_MAX_PATCHES only applies when a caller passes
    # max_patches=processor.image_processor.max_patches (transformers 5.23 processing_utils._merge_kwargs).
    max_patches = TINY_MAX_PATCHES if size == "tiny" else FULL_MAX_PATCHES
    config = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "image_processor_type": "Kosmos2_5ImageProcessor",
        "max_patches": max_patches,
        "patch_size": {"height": 16, "width": 16},
        "processor_class": "Kosmos2_5Processor",
    }
    _write_json(folder / "preprocessor_config.json", config)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _readme(size: CheckpointSize, seed: int) -> str:
    return (
        "# Random-weights Kosmos-2.5 checkpoint\n\n"
        f"Built offline by `kosmos_cli.testing.save_random_checkpoint(size={size!r}, seed={seed})`.\n"
        "It has the file layout, configuration and special-token ids of `microsoft/kosmos-2.5`, but\n"
        "RANDOM weights and a stand-in base vocabulary: it transcribes nothing. For tests and benchmarks.\n"
    )


# --- tokenizer ----------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """Map each byte to the printable character GPT-2 style byte-level BPE uses for it."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _base_vocab() -> dict[str, int]:
    """Return the base vocabulary: fairseq specials, 256 byte tokens, then filler words up to id 100280."""
    vocab = {token: index for index, (token, _) in enumerate(_HEAD_TOKENS)}
    byte_chars = _bytes_to_unicode()
    for b in range(256):
        vocab[byte_chars[b]] = len(vocab)
    space = byte_chars[ord(" ")]
    for index in itertools.count():
        if len(vocab) == BASE_VOCAB_END:
            break
        syllables = []
        rest = index
        while True:
            syllables.append(_FILLER_SYLLABLES[rest % len(_FILLER_SYLLABLES)])
            rest //= len(_FILLER_SYLLABLES)
            if rest == 0:
                break
        vocab.setdefault(space + "".join(syllables), len(vocab))
    return vocab


def _added_tokens() -> list[tuple[str, bool]]:
    """Return the added tokens from id 100281 on, in id order, with their "special" flag."""
    tokens = list(_KOSMOS_TOKENS)
    for value in range(NUM_COORDINATE_BINS):
        tokens += [(f"<x_{value}>", False), (f"<y_{value}>", False)]
    return tokens


def _build_tokenizer() -> Any:
    """Build the fast tokenizer (a `tokenizers.Tokenizer`) with the real checkpoint's token ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE(vocab=_base_vocab(), merges=[], unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in _HEAD_TOKENS])
    # Added tokens take the next free id in the order they are added; add runs of equal "special"
    # flag in one call each (one call per token is quadratic).
    for special, run in itertools.groupby(_added_tokens(), key=lambda item: item[1]):
        batch = [AddedToken(token, special=special, normalized=False) for token, _ in run]
        if special:
            tokenizer.add_special_tokens(batch)
        else:
            tokenizer.add_tokens(batch)
    if tokenizer.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    return tokenizer


def _write_tokenizer(folder: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    _build_tokenizer().save(str(folder / "tokenizer.json"))
    named = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    }
    # Kosmos2_5Processor reads tokenizer.boi_token, eoi_token and image_token (the <s> placeholder
    # repeated num_image_tokens times); transformers sets such named extras from this dict.
    extra = {"boi_token": "<image>", "eoi_token": "</image>", "image_token": "<s>"}
    config = {
        **named,
        "extra_special_tokens": extra,
        "clean_up_tokenization_spaces": False,  # would rewrite " ." and " '" in transcriptions
        "processor_class": "Kosmos2_5Processor",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", named)


# --- weights ------------------------------------------------------------------------------------


def _tensor_specs(config: Any, size: CheckpointSize) -> list[_TensorSpec]:
    """List the weights a checkpoint for `config` holds, in state-dict order, with their init."""
    import torch
    from torch import nn
    from transformers import Kosmos2_5ForConditionalGeneration

    with torch.device("meta"):
        model = Kosmos2_5ForConditionalGeneration(config)
    # Tied weights (the LM head) are not stored, as save_pretrained does.
    stored = {name for name in model.state_dict() if name != "text_model.lm_head.weight"}
    specs: list[_TensorSpec] = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            if name not in stored:
                continue
            stored.discard(name)
            spec = _init_rule(name, module, param_name, tuple(param.shape), nn)
            if size == "tiny" and spec.init == "normal" and spec.std == INIT_STD:
                spec = replace(spec, std=_tiny_std(name))
            specs.append(spec)
    if stored:
        raise RuntimeError(f"no init rule for weights {sorted(stored)}")
    return specs


def _tiny_std(name: str) -> float:
    if name.startswith("vision_model.") and name.endswith(
        (".attention.query.weight", ".attention.key.weight")
    ):
        return TINY_VISION_QUERY_KEY_STD
    return TINY_INIT_STD[name.split(".")[0]]


def _init_rule(name: str, module: Any, param_name: str, shape: tuple[int, ...], nn: Any) -> _TensorSpec:
    """Return how transformers' _init_weights initialises one parameter (normal(0, 0.02) init)."""
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        return _TensorSpec(name, shape, "normal" if param_name == "weight" else "zeros")
    if isinstance(module, nn.Embedding):
        return _TensorSpec(name, shape, "normal", zero_row=module.padding_idx)
    if "LayerNorm" in kind or "RMSNorm" in kind:
        return _TensorSpec(name, shape, "ones" if param_name == "weight" else "zeros")
    if param_name == "latent_query":
        return _TensorSpec(name, shape, "normal", std=1.0)  # the model's own init: torch.randn
    raise RuntimeError(f"no init rule for {name} ({kind})")


def _random_tensor(spec: _TensorSpec, generator: torch.Generator) -> torch.Tensor:
    import torch

    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=torch.float32)
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=torch.float32)
    tensor = torch.empty(spec.shape, dtype=torch.float32).normal_(0.0, spec.std, generator=generator)
    if spec.zero_row is not None:
        tensor[spec.zero_row].zero_()
    return tensor


def _shards(specs: list[_TensorSpec], shard_bytes: int | None) -> list[list[_TensorSpec]]:
    """Split the weights into consecutive shards of at most `shard_bytes` (one shard when None)."""
    if shard_bytes is None:
        return [specs]
    shards: list[list[_TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _write_weights(folder: Path, config: Any, *, size: CheckpointSize, seed: int) -> None:
    """Write random weights as safetensors, one tensor in memory at a time."""
    import torch

    specs = _tensor_specs(config, size)
    shards = _shards(specs, None if size == "tiny" else SHARD_BYTES)
    generator = torch.Generator().manual_seed(seed)
    if len(shards) == 1:
        _write_safetensors(folder / "model.safetensors", shards[0], generator)
        return
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(folder / file_name, shard, generator)
        weight_map.update({spec.name: file_name for spec in shard})
    index = {"metadata": {"total_size": sum(spec.nbytes for spec in specs)}, "weight_map": weight_map}
    _write_json(folder / "model.safetensors.index.json", index)


def _write_safetensors(path: Path, specs: list[_TensorSpec], generator: torch.Generator) -> None:
    """Stream tensors into a safetensors file: header first, then each tensor as it is generated."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": "F32",
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to 8-byte alignment
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for spec in specs:
            tensor = _random_tensor(spec, generator)
            file.write(tensor.numpy().data)  # a view: no copy of the tensor
            del tensor


# --- a scripted runner -----------------------------------------------------------------------------

SCRIPTED_MAX_NEW_TOKENS = 16


class ScriptedRunner:
    """A `Runner` that answers each request with text derived from its pixels: `page <hash>` or one OCR line.

    `fail` names image hashes to answer with a GenerationError instead, as the model does for a page
    that fails even alone (e.g. out of memory).
    """

    max_new_tokens = SCRIPTED_MAX_NEW_TOKENS

    def __init__(self, *, fail: dict[str, GenerationError] | None = None) -> None:
        self.seen: list[str] = []  # the hash of every image asked for, in order
        self.fail = fail or {}

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Answer every request at once, in order."""
        for request in requests:
            digest = image_hash(request.image.tobytes())
            self.seen.append(digest)
            if digest in self.fail:
                yield request, self.fail[digest]
                continue
            width, height = request.image.size
            if request.task is Task.MD:
                text = f"# page {digest}"
            else:
                text = f"<bbox><x_1><y_1><x_{width - 1}><y_{height - 1}></bbox>page {digest}"
            yield request, Generation(text, (width, height), ids=(7, 7, 7, 7))


def image_hash(image_bytes: bytes) -> str:
    """Return the hash `ScriptedRunner` writes for an image's raw RGB bytes."""
    return hashlib.sha256(image_bytes).hexdigest()[:12]


def save_planted_checkpoint(dest: Path, source: Path) -> Path:
    """Save `source` (a tiny checkpoint) with its attention planted (`plant_attention`) to `dest`."""
    import torch
    from transformers import AutoProcessor, Kosmos2_5ForConditionalGeneration

    model = Kosmos2_5ForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    plant_attention(model)
    model.save_pretrained(dest)
    AutoProcessor.from_pretrained(source).save_pretrained(dest)
    return dest


def plant_attention(model: Any) -> None:
    """Make every image slot attend to the bright patches alone, whatever the decoder does.

    The vision encoder's layers pass their input through (zero output weights), the patch projection
    sums a patch's normalised pixels into two features (one per head of the projection), and every
    latent query asks for that feature strongly: bright patches score high, dark ones low, padding
    patches and the latents themselves zero.
    """
    import torch

    with torch.no_grad():
        embeddings = model.vision_model.embeddings
        embeddings.patch_projection.weight.zero_()
        embeddings.patch_projection.bias.zero_()
        embeddings.row_embedder.weight.zero_()
        embeddings.column_embedder.weight.zero_()
        width = embeddings.patch_projection.weight.shape[0]
        head_dim = width // model.config.text_config.attention_heads
        features = list(range(0, width, head_dim))  # one feature in each head's dimensions
        embeddings.patch_projection.weight[features] = 1.0
        for layer in model.vision_model.encoder.layer:
            layer.attention.output.weight.zero_()
            layer.mlp.wo.weight.zero_()
        projection = model.image_to_text_projection
        projection.dense.weight.copy_(torch.eye(width))
        projection.dense.bias.zero_()
        projection.latent_query.zero_()
        attention = projection.x_attn
        attention.k_proj.weight.copy_(torch.eye(width))
        attention.k_proj.bias.zero_()
        attention.q_proj.weight.zero_()
        attention.q_proj.bias.zero_()
        attention.q_proj.bias[features] = 400.0


@dataclass
class ServerProcess:
    """A `kosmos serve` process on a free loopback port (`start`), for tests and benchmarks."""

    process: Any  # subprocess.Popen[bytes]
    url: str
    log: Path

    @classmethod
    def start(cls, arguments: Iterable[str], log: Path, *, timeout: float = 120.0) -> ServerProcess:
        """Run `kosmos serve --port 0 ARGUMENTS`, its output into `log`; return once /ready says so."""
        import re
        import subprocess
        import sys
        import time
        import urllib.error
        import urllib.request

        command = [sys.executable, "-m", "kosmos_cli", "serve", "--port", "0", *arguments]
        with log.open("wb") as stream:
            process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"kosmos serve ended with {process.returncode}:\n{log.read_text()}")
            found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())
            url = found.group(1) if found else None
            if url is not None:
                try:
                    with urllib.request.urlopen(url + "/ready", timeout=5) as answer:
                        if answer.status == 200:
                            return cls(process, url, log)
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.2)
        process.kill()
        raise RuntimeError(f"kosmos serve did not get ready in {timeout:g} s:\n{log.read_text()}")

    def stop(self, sig: int | None = None) -> int:
        """Send `sig` (default SIGTERM) unless it has ended; return its exit status."""
        import signal

        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM if sig is None else sig)
        return int(self.process.wait(60))
