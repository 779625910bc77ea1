"""What kosmos does to a loaded model's memory: pages of the memory-mapped checkpoint leave once copied."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from kosmos_cli.model.patches import checkpoint_mappings, release_file_pages

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
