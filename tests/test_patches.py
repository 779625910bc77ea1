"""What kosmos does to a loaded model's memory: pages of the memory-mapped checkpoint leave once copied."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from kosmos_cli.model.patches import cast_weights, checkpoint_mappings, release_file_pages

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self; madvise is Linux's here")


def resident_file_bytes() -> int:
    """This process's resident pages that come from files (RssFile), in bytes."""
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^RssFile:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match.group(1)) * 1024


def test_released_pages_of_a_mapped_weight_leave_memory_and_read_back_the_same(tiny_checkpoint: Path) -> None:
    from transformers import Kosmos2_5ForConditionalGeneration

    model = Kosmos2_5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    weight = model.text_model.model.embed_tokens.weight.detach()  # 13.9 MB, pointing into the mapping
    mapped = checkpoint_mappings()
    assert any(low <= weight.data_ptr() < high for low, high in mapped)
    expected = weight.clone()
    before = resident_file_bytes()  # the clone read every page of it
    release_file_pages(weight, mapped)
    assert resident_file_bytes() < before - weight.numel() * weight.element_size() * 0.9
    assert torch.equal(weight, expected)  # read again from the file, unchanged


def test_memory_that_is_not_a_checkpoint_mapping_is_left_alone(tiny_checkpoint: Path) -> None:
    from transformers import Kosmos2_5ForConditionalGeneration

    Kosmos2_5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    anonymous = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB of process memory
    release_file_pages(anonymous, checkpoint_mappings())
    assert torch.equal(anonymous, torch.arange(1 << 20, dtype=torch.float32))


def test_cast_weights_round_as_transformers_does_and_leave_the_float32_pages_behind(
    tiny_checkpoint: Path,
) -> None:
    from transformers import Kosmos2_5ForConditionalGeneration

    expected = Kosmos2_5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    model = Kosmos2_5ForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="auto")  # mapped float32
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    originals = [tensor.data for tensor in model.state_dict().values()]  # the mapping stays, as mid-cast
    before = resident_file_bytes()
    cast_weights(model, torch.bfloat16)
    assert resident_file_bytes() < before + 0.1 * stored, "each float32 tensor's pages left once cast"
    del originals
    got, wanted = model.state_dict(), expected.state_dict()
    assert got.keys() == wanted.keys()
    assert all(got[name].dtype == torch.bfloat16 and torch.equal(got[name], wanted[name]) for name in wanted)
    assert (
        model.config.dtype
        == model.config.text_config.dtype
        == model.config.vision_config.dtype
        == torch.bfloat16
    )
