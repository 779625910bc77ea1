"""The tiny random checkpoint loads through the real from_pretrained path and keeps the real token ids."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kosmos_cli import testing as checkpoint
from kosmos_cli.testing import save_random_checkpoint
from kosmos_cli.vocabulary import EOS_ID, VOCAB_SIZE, x_token_id, y_token_id

TINY_PROMPT_LEN = 1 + 1 + checkpoint.TINY_NUM_IMAGE_TOKENS + 1 + 1  # <s> <image> <s>*n </image> <task>


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Any:
    from transformers import Kosmos2_5ForConditionalGeneration

    return Kosmos2_5ForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


def _image(width: int, height: int) -> Any:
    from PIL import Image

    return Image.new("RGB", (width, height), "white")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_folder_has_the_hub_layout(tiny_checkpoint: Path) -> None:
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "processor_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_processor_and_tokenizer_classes(processor: Any) -> None:
    from transformers import Kosmos2_5Processor, PreTrainedTokenizerFast

    assert isinstance(processor, Kosmos2_5Processor)
    assert isinstance(processor.tokenizer, PreTrainedTokenizerFast)
    assert processor.num_image_tokens == checkpoint.TINY_NUM_IMAGE_TOKENS
    assert processor.image_processor.max_patches == checkpoint.TINY_MAX_PATCHES
    tokenizer = processor.tokenizer
    assert (tokenizer.boi_token, tokenizer.eoi_token, tokenizer.image_token) == ("<image>", "</image>", "<s>")
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert (tokenizer.unk_token_id, tokenizer.mask_token_id) == (3, 100281)
    assert len(tokenizer) == VOCAB_SIZE == 108481


@pytest.mark.parametrize(
    ("token", "token_id"),
    [
        ("<s>", 0),
        ("<pad>", 1),
        ("</s>", 2),
        ("<unk>", 3),
        ("<mask>", 100281),
        ("<ocr>", 100282),
        ("<image>", 100283),
        ("</image>", 100284),
        ("</chunk>", 100285),
        ("<bbox>", 100286),
        ("</bbox>", 100287),
        ("<md>", 100288),
        ("<x_0>", 100289),
        ("<y_0>", 100290),
        ("<x_1>", 100291),
        ("<x_12>", 100313),
        ("<y_34>", 100358),
        ("<x_4095>", 108479),
        ("<y_4095>", 108480),
    ],
)
def test_token_ids_match_the_real_checkpoint(processor: Any, token: str, token_id: int) -> None:
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]


def test_coordinate_id_helpers() -> None:
    assert (x_token_id(0), y_token_id(0)) == (100289, 100290)
    assert (x_token_id(4095), y_token_id(4095)) == (108479, 108480)
    with pytest.raises(ValueError, match="outside"):
        x_token_id(4096)


@pytest.mark.parametrize("task, task_id", [("<ocr>", 100282), ("<md>", 100288)])
def test_processor_builds_the_real_prompt(processor: Any, task: str, task_id: int) -> None:
    n = checkpoint.TINY_NUM_IMAGE_TOKENS
    inputs = processor(images=_image(300, 200), text=task)
    assert inputs.input_ids.tolist() == [[0, 100283, *[0] * n, 100284, task_id]]
    assert inputs.image_embeds_position_mask.tolist() == [[0, -1, *[1] * n, -1, 0]]
    assert inputs.attention_mask.tolist() == [[1] * TINY_PROMPT_LEN]


def test_mixed_tasks_batch_without_padding(processor: Any) -> None:
    n = checkpoint.TINY_NUM_IMAGE_TOKENS
    inputs = processor(images=[_image(300, 200), _image(100, 400)], text=["<md>", "<ocr>"])
    assert inputs.input_ids.tolist() == [
        [0, 100283, *[0] * n, 100284, 100288],
        [0, 100283, *[0] * n, 100284, 100282],
    ]
    assert inputs.image_embeds_position_mask.tolist() == [[0, -1, *[1] * n, -1, 0]] * 2


@pytest.mark.parametrize(
    ("max_patches", "expected_width_height"),
    [
        # processor default (4096, whatever preprocessor_config says): cols * 16, rows * 16
        (None, [(1248, 832), (512, 2048), (896, 1152)]),
        (checkpoint.TINY_MAX_PATCHES, [(304, 208), (128, 512), (224, 288)]),
    ],
)
def test_batched_images_keep_their_own_resized_size(
    processor: Any, max_patches: int | None, expected_width_height: list[tuple[int, int]]
) -> None:
    images = [_image(300, 200), _image(100, 400), _image(850, 1100)]
    kwargs = {} if max_patches is None else {"max_patches": max_patches}
    inputs = processor(images=images, text=["<ocr>"] * len(images), **kwargs)
    assert list(zip(inputs.width.tolist(), inputs.height.tolist(), strict=True)) == expected_width_height
    assert tuple(inputs.flattened_patches.shape) == (3, max_patches or 4096, 2 + 16 * 16 * 3)


def test_bbox_tokens_survive_skip_special_tokens(processor: Any) -> None:
    tokenizer = processor.tokenizer
    text = "<bbox><x_12><y_34><x_56><y_78></bbox>hello"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[:6] == [100286, x_token_id(12), y_token_id(34), x_token_id(56), y_token_id(78), 100287]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    prompt = [0, 100283, 0, 0, 100284, 100282]
    assert processor.batch_decode([[*prompt, *ids, 2, 1, 1]], skip_special_tokens=True) == [text]
    assert processor.decode([*prompt, 100288, 100281, 100285, 3]) == (
        "<s><image><s><s></image><ocr><md><mask></chunk><unk>"
    )


@pytest.mark.parametrize(
    "text",
    [
        "# Title\n\n- **bold** item, 45,455\n",
        "  leading spaces and trailing  ",
        "naïve café, Grüße, 日本語, Ελληνικά, 🙂🎉",
        "tab\tand\r\nwindows line",
        "<x_notatoken> <bbox",
    ],
)
def test_any_utf8_text_round_trips(processor: Any, text: str) -> None:
    tokenizer = processor.tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_model_loads_with_no_missing_or_unexpected_weights(tiny_checkpoint: Path) -> None:
    from transformers import Kosmos2_5ForConditionalGeneration

    loaded: Any = Kosmos2_5ForConditionalGeneration.from_pretrained(tiny_checkpoint, output_loading_info=True)
    model, info = loaded
    assert {key: list(value) for key, value in info.items()} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    assert model.config.text_config.vocab_size == VOCAB_SIZE
    assert model.config.latent_query_num == checkpoint.TINY_NUM_IMAGE_TOKENS
    assert model.generation_config.do_sample is False
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (0, 2)
    assert model.generation_config.pad_token_id == 1


@pytest.mark.parametrize("max_patches", [None, checkpoint.TINY_MAX_PATCHES])
def test_generate_returns_new_tokens(processor: Any, model: Any, max_patches: int | None) -> None:
    import torch

    kwargs = {} if max_patches is None else {"max_patches": max_patches}
    inputs = processor(images=_image(300, 200), text="<ocr>", **kwargs)
    inputs.pop("width")
    inputs.pop("height")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new_ids = output[0, TINY_PROMPT_LEN:].tolist()
    assert output[0, :TINY_PROMPT_LEN].tolist() == inputs.input_ids[0].tolist()
    assert len(new_ids) == 5 or (0 < len(new_ids) < 5 and new_ids[-1] == EOS_ID)
    assert all(0 <= i < VOCAB_SIZE for i in new_ids)
    assert isinstance(processor.decode(new_ids, skip_special_tokens=True), str)


def test_same_seed_same_bytes(tmp_path: Path, tiny_checkpoint: Path) -> None:
    again = save_random_checkpoint(tmp_path / "again", size="tiny", seed=0)
    other = save_random_checkpoint(tmp_path / "other", size="tiny", seed=1)
    assert _digests(again) == _digests(tiny_checkpoint)
    changed = {name for name, digest in _digests(other).items() if digest != _digests(again)[name]}
    assert changed == {"model.safetensors", "README.md"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no staging folder left


def test_full_size_matches_the_real_architecture() -> None:
    # Plan the full checkpoint without writing its 5.5 GB.
    config = checkpoint._model_config("full")
    specs = checkpoint._tensor_specs(config, "full")
    assert sum(s.nbytes for s in specs) // 4 == 1_374_646_272  # the tied LM head is stored once
    # The real init scale (the tiny model is drawn wider so that its output depends on the image).
    assert {s.std for s in specs if s.init == "normal"} == {checkpoint.INIT_STD, 1.0}
    assert config.latent_query_num == 2048
    assert config.vision_config.max_num_patches == 4096
    shards = checkpoint._shards(specs, checkpoint.SHARD_BYTES)
    assert len(shards) == 2
    assert all(sum(s.nbytes for s in shard) <= checkpoint.SHARD_BYTES for shard in shards)


def test_refuses_a_file_or_a_non_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NotADirectoryError):
        save_random_checkpoint(target)
    with pytest.raises(FileExistsError):
        save_random_checkpoint(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_the_hub_is_offline_with_an_empty_home(offline_hub: Path) -> None:
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    assert Path(constants.HF_HOME) == offline_hub
