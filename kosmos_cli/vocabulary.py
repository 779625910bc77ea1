"""The facts of Kosmos-2.5's vocabulary and prompt that decoding, parsing and the test checkpoints share.

Token ids of the real checkpoint: fairseq specials, then cl100k_base (100,277 tokens), then the
Kosmos-2.5 symbols and 2 x 4096 coordinate tokens (microsoft/unilm kosmos-2.5/kosmos2_5/data/utils.py;
the ids of <ocr>, <image>, </image> and <md> are asserted by transformers' processor test).
Pure values: no torch, no transformers.
"""

from __future__ import annotations

import re

from kosmos_cli.values import Task

BOS_ID = 0  # <s>; also the image placeholder token inside <image> ... </image>
PAD_ID = 1  # <pad>
EOS_ID = 2  # </s>
UNK_ID = 3  # <unk>
BASE_VOCAB_END = 100281  # first id after the base vocabulary
MASK_ID = 100281  # <mask>
OCR_ID = 100282  # <ocr>
IMAGE_START_ID = 100283  # <image>
IMAGE_END_ID = 100284  # </image>
CHUNK_END_ID = 100285  # </chunk>
BBOX_START_ID = 100286  # <bbox>
BBOX_END_ID = 100287  # </bbox>
MD_ID = 100288  # <md>
FIRST_COORDINATE_ID = 100289  # <x_0>; then <y_0>, <x_1>, <y_1>, ...
NUM_COORDINATE_BINS = 4096  # <x_0> ... <x_4095>, same for y
VOCAB_SIZE = FIRST_COORDINATE_ID + 2 * NUM_COORDINATE_BINS  # 108,481, the real text_config.vocab_size

NUM_IMAGE_TOKENS = 2048  # latent_query_num of the real model: image slots in the prompt
PROMPT_EXTRA_TOKENS = 4  # <s> <image> ... </image> <task> around the image slots
PROMPT_LENGTH = NUM_IMAGE_TOKENS + PROMPT_EXTRA_TOKENS  # 2,052 for both tasks: mixed batches need no padding
TASK_PROMPTS = {Task.MD: "<md>", Task.OCR: "<ocr>"}  # the text the processor puts after </image>

BOX_TOKEN = re.compile(r"</?bbox>|<[xy]_\d+>")  # the tokens of a line's box, not of its text


def prompt_length(num_image_tokens: int) -> int:
    """Return the prompt's length in tokens for a checkpoint with `num_image_tokens` image slots."""
    return num_image_tokens + PROMPT_EXTRA_TOKENS


def x_token_id(value: int) -> int:
    """Return the id of `<x_value>`."""
    return FIRST_COORDINATE_ID + 2 * _check_bin(value)


def y_token_id(value: int) -> int:
    """Return the id of `<y_value>`."""
    return FIRST_COORDINATE_ID + 2 * _check_bin(value) + 1


def _check_bin(value: int) -> int:
    if not 0 <= value < NUM_COORDINATE_BINS:
        raise ValueError(f"coordinate {value} is outside 0..{NUM_COORDINATE_BINS - 1}")
    return value
