"""`-f chunks` (md task): a document's markdown as retrieval chunks, one JSON object per block and line.

Each block (`blocks.markdown_blocks`: heading, paragraph, table, list item, formula, code) becomes

    {"source": "report.pdf", "page_number": 2, "block": 3, "kind": "paragraph", "level": 0,
     "headings": ["Results", "Costs"], "text": "...", "bbox": [x0, y0, x1, y1],
     "pdf_bbox": [x0, y0, x1, y1], "share": 0.71}

`headings` are the headings above the block, outermost first, carried across pages. `bbox` (page
pixels), `pdf_bbox` (PDF points, PDF pages only) and `share` come from the block's region, which only a
run with `--attention` finds (null otherwise); `kosmos convert` remakes chunks from kosmos's JSON, with
the regions recorded there. Failed pages have no chunks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from kosmos_cli.blocks import BlockKind, markdown_blocks
from kosmos_cli.values import PageResult, Status, Task
from kosmos_cli.writers import DocumentWriter, Identity, register
from kosmos_cli.writers.data import pixel_bbox_to_pdf


@register
class ChunksWriter(DocumentWriter):
    """One JSON object per markdown block, with its heading path and region."""

    format = "chunks"
    media_type = "application/x-ndjson"
    tasks = frozenset({Task.MD})
    extension = ".chunks.jsonl"

    def render(
        self, results: Sequence[PageResult], source: bytes | None = None, identity: Identity = None
    ) -> bytes:
        headings: list[tuple[int, str]] = []  # the open headings: (level, text)
        out = []
        for result in self.check(results):
            if result.status is Status.FAILED:
                continue
            info = result.info
            for index, block in enumerate(markdown_blocks(result.text)):
                if block.kind is BlockKind.HEADING:
                    while headings and headings[-1][0] >= block.level:
                        headings.pop()
                region = result.regions[index] if index < len(result.regions) else None
                chunk: dict[str, Any] = {
                    "source": info.document.display_name,
                    "page_number": info.page_number,
                    "block": index + 1,
                    "kind": block.kind.value,
                    "level": block.level,
                    "headings": [text for _, text in headings],
                    "text": block.text,
                    "bbox": None if region is None else list(region.box),
                    "pdf_bbox": None,
                    "share": None if region is None else region.share,
                }
                if region is not None and info.pixel_to_pdf is not None:
                    chunk["pdf_bbox"] = list(pixel_bbox_to_pdf(region.box, info.pixel_to_pdf))
                out.append(json.dumps(chunk, ensure_ascii=False) + "\n")
                if block.kind is BlockKind.HEADING:
                    headings.append((block.level, block.text.lstrip("#").strip()))
        return "".join(out).encode("utf-8")
