"""`--attention`: the maps the decode loop keeps equal a direct eager computation, and a planted model's
map peaks where it was planted, through resizing, padding and tiling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import kosmos_cli
from kosmos_cli.attention import inside, ocr_segments, region
from kosmos_cli.blocks import BlockKind, markdown_blocks
from kosmos_cli.config import Settings
from kosmos_cli.errors import UsageError
from kosmos_cli.model import Request
from kosmos_cli.model.attention import IMAGE_START, Recorder
from kosmos_cli.model.loading import load_runner
from kosmos_cli.model.runner import KosmosRunner
from kosmos_cli.model.slots import FixedSlots, GrowingSlots
from kosmos_cli.parsing import markdown_line_tokens
from kosmos_cli.testing import save_planted_checkpoint
from kosmos_cli.tiling import PATCH_SIZE
from kosmos_cli.values import Document, Generation, Heat, PageInfo, Task
from kosmos_cli.vocabulary import TASK_PROMPTS

BUDGET = 12


def load(checkpoint: Path, **settings: object) -> KosmosRunner:
    options = {"device": "cpu", "dtype": "float32", "max_new_tokens": BUDGET, "threads": 1, "attention": True}
    return load_runner(Settings(model=str(checkpoint), **{**options, **settings}))  # type: ignore[arg-type]


def noisy_page(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def eager_rows(runner: KosmosRunner, request: Request, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the page with its generated tokens fed back, through transformers' eager attention
    with `output_attentions`; each token's row over the image slots (mean over layers and heads) and the
    projection's weights over the real patches (mean over heads)."""
    from transformers import Kosmos2_5ForConditionalGeneration

    model = Kosmos2_5ForConditionalGeneration.from_pretrained(
        runner.settings.model, attn_implementation="eager", dtype=torch.float32
    )
    inputs = runner.processor(text=[TASK_PROMPTS[request.task]], images=[request.image], return_tensors="pt")
    width, height = int(inputs.pop("width")[0]), int(inputs.pop("height")[0])
    fed = torch.tensor([ids[:-1]], dtype=inputs["input_ids"].dtype)
    prompt = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], fed], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    mask = inputs["image_embeds_position_mask"]
    inputs["image_embeds_position_mask"] = torch.cat([mask, torch.zeros_like(fed)], dim=1)
    with torch.no_grad():
        output = model(**inputs, output_attentions=True)
    images = getattr(output, "image_outputs", None)  # transformers >= 5.24 keeps them there
    projection = (images.projection_attentions if images is not None else output.projection_attentions)[0]
    image = slice(IMAGE_START, IMAGE_START + runner.prompt_length - 4)
    rows = torch.stack([layer[0][:, prompt - 1 :, image] for layer in output.attentions]).mean(dim=(0, 1))
    real = (height // PATCH_SIZE) * (width // PATCH_SIZE)
    return rows.numpy(), projection.mean(dim=0)[:, :real].numpy()


@pytest.mark.parametrize("task", [Task.MD, Task.OCR])
def test_the_kept_rows_equal_eager_attention_in_a_batch(tiny_checkpoint: Path, task: Task) -> None:
    runner = load(tiny_checkpoint, batch_size=3, ignore_eos=True)
    requests = [
        Request(index, noisy_page(*size, seed=index), task)
        for index, size in enumerate([(300, 200), (64, 400), (500, 120)])
    ]
    generations = {request.key: generation for request, generation in runner.generate(requests)}
    for request in requests:
        generation = generations[request.key]
        assert isinstance(generation, Generation) and generation.attention is not None
        looked = generation.attention
        rows, projection = eager_rows(runner, request, list(generation.ids))
        assert looked.looks.shape == rows.shape == (BUDGET, 8)
        np.testing.assert_allclose(looked.looks, rows, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(looked.projection, projection, rtol=1e-3, atol=1e-5)  # batched vision
        width, height = generation.resized_size
        assert looked.grid == (height // PATCH_SIZE, width // PATCH_SIZE)
        assert len(looked.pieces) == BUDGET


def test_a_map_has_the_page_size_and_sums_to_its_spatial_share(tiny_checkpoint: Path) -> None:
    from kosmos_cli import Transcriber

    transcriber = Transcriber.load(
        model=str(tiny_checkpoint), device="cpu", dtype="float32", max_new_tokens=BUDGET, attention=True
    )
    for result in transcriber.transcribe([noisy_page(300, 200, 1), noisy_page(90, 700, 2)], task=Task.MD):
        assert result.attention is not None
        for heat in (*result.attention.tiles, *(h for h in result.attention.items if h is not None)):
            page = heat.on_page(result.info.width, result.info.height)
            assert page.shape == (result.info.height, result.info.width)
            assert (page >= 0).all()
            assert 0 < heat.spatial <= 1
            assert page.sum() == pytest.approx(heat.spatial, rel=1e-4)
        assert len(result.regions) == len(markdown_blocks(result.text))


def test_without_attention_nothing_is_kept(tiny_checkpoint: Path) -> None:
    runner = load(tiny_checkpoint, attention=False)
    ((_, generation),) = runner.generate([Request(0, noisy_page(100, 100, 0), Task.OCR)])
    assert isinstance(generation, Generation) and generation.attention is None


@pytest.mark.parametrize("flag", ["compile", "cuda_graph"])
def test_attention_refuses_the_loops_that_keep_no_rows(flag: str) -> None:
    with pytest.raises(UsageError, match="--attention and"):
        Settings(attention=True, **{flag: True})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def planted(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint planted to look at bright patches (`testing.plant_attention`)."""
    folder = tmp_path_factory.mktemp("planted")
    return save_planted_checkpoint(folder, tiny_checkpoint)


def bright_square(size: tuple[int, int], square: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, "black")
    ImageDraw.Draw(image).rectangle([square[0], square[1], square[2] - 1, square[3] - 1], fill="white")
    return image


def near(box: tuple[int, int, int, int], square: tuple[int, int, int, int], slack: float) -> bool:
    return all(abs(a - b) <= slack for a, b in zip(box, square, strict=True))


def grown(box: tuple[int, int, int, int], by: float) -> tuple[int, int, int, int]:
    return (int(box[0] - by), int(box[1] - by), int(box[2] + by + 1), int(box[3] + by + 1))


def contains(outer: tuple[int, int, int, int], inner: tuple[int, int, int, int]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


@pytest.mark.parametrize(
    ("size", "square"),
    [
        ((640, 480), (320, 160, 416, 256)),  # resized, the grid filled
        ((500, 200), (40, 100, 140, 180)),  # resized, padding patches after the real ones
        ((120, 1600), (20, 1300, 100, 1380)),  # tall and thin
    ],
)
def test_a_planted_map_peaks_on_the_planted_patches(
    planted: Path, size: tuple[int, int], square: tuple[int, int, int, int]
) -> None:
    from kosmos_cli import Transcriber

    runner = load(planted)
    (result,) = Transcriber(runner).transcribe([bright_square(size, square)], task=Task.MD)
    assert result.attention is not None
    (whole,) = result.attention.tiles
    # patches mostly bright all score alike: the map covers the square to within a patch
    patch = max(size[0] / whole.grid.shape[1], size[1] / whole.grid.shape[0])
    page = whole.on_page(*size)
    y, x = np.unravel_index(np.argmax(page), page.shape)
    assert near(
        (x, y, x, y), (square[0], square[1], square[0], square[1]), slack=square[2] - square[0] + patch
    )
    assert inside(whole, grown(square, patch)) == pytest.approx(1.0, abs=1e-3)
    assert inside(whole, square) > 0.6
    found = region(whole)
    assert found is not None and found.share >= 0.5
    assert contains(grown(square, patch), found.box), (found.box, square)
    assert result.regions and all(
        r is not None and contains(grown(square, patch), r.box) for r in result.regions
    )


def test_a_planted_map_lands_in_the_right_tile_of_a_tall_page(planted: Path) -> None:
    from kosmos_cli import Transcriber

    runner = load(planted)
    size, square = (600, 3000), (200, 2000, 360, 2160)
    (result,) = Transcriber(runner).transcribe([bright_square(size, square)], task=Task.OCR)
    assert result.attention is not None
    tiles = result.attention.tiles
    assert len(tiles) > 1, "the page was read in tiles"
    holding = [tile for tile in tiles if tile.box[1] <= square[1] and square[3] <= tile.box[3]]
    assert holding and len(holding) < len(tiles)
    for tile in holding:
        x0, y0, x1, y1 = tile.box
        patch = max((x1 - x0) / tile.grid.shape[1], (y1 - y0) / tile.grid.shape[0])
        assert inside(tile, grown(square, patch)) == pytest.approx(1.0, abs=1e-3)
        found = region(tile)
        assert found is not None and contains(grown(square, patch), found.box)
    dark = [tile for tile in tiles if tile.box[3] <= square[1] or square[3] <= tile.box[1]]
    assert dark and all(tile.grid.max() <= 2 * tile.grid.min() for tile in dark), (
        "no bright patch: spread evenly"
    )


def test_the_fixed_slots_weights_equal_the_row_loops() -> None:
    torch.manual_seed(0)
    heads, head_dim, layers = 2, 4, 1
    fixed = FixedSlots(
        3, layers=layers, heads=heads, head_dim=head_dim, capacity=16, dtype=torch.float32, device="cpu"
    )
    growing = GrowingSlots(
        3, layers=layers, heads=heads, head_dim=head_dim, dtype=torch.float32, device="cpu"
    )
    keys, values = torch.randn(2, heads, 10, head_dim), torch.randn(2, heads, 10, head_dim)
    for cache in (fixed, growing):
        cache.at([cache.take(), cache.take()])
        cache.update(keys, values, 0)
    step_keys, step_values = torch.randn(2, heads, 1, head_dim), torch.randn(2, heads, 1, head_dim)
    for cache in (fixed, growing):
        cache.at([0, 1], [10, 10])
        cache.update(step_keys, step_values, 0)
    query = torch.randn(2, heads, 1, head_dim)
    kept: list[Recorder] = []
    for cache in (fixed, growing):
        recorder = Recorder(image_tokens=6, layers=None)
        if cache is fixed:
            recorder.keep(0, fixed._weights(query, 0, torch.tensor([11, 11]), 0.5))
        else:
            cache.attend(query, 0, 0.5, recorder)
        kept.append(recorder)
    torch.testing.assert_close(kept[0].rows(), kept[1].rows())


def test_ocr_segments_group_text_tokens_as_the_probabilities_are() -> None:
    pieces = ["lead", "<bbox>", "<x_1>", "<y_2>", "<x_3>", "<y_4>", "</bbox>", "Hel", "lo", "<bbox>", "x"]
    assert ocr_segments(pieces) == [[0], [7, 8], [10]]


@pytest.mark.parametrize(
    ("pieces", "lines"),
    [
        (["# Ti", "tle", "\n\n", "Some", " text", "\n", "more"], [[0, 1], [3, 4], [6]]),
        (["a", "<br>", "b"], [[0], [2]]),
        (["a", "<", "br", ">", "b"], [[0], [4]]),  # <br> over three tokens
        (["a\n", "\n", " ", "\n", "b"], [[0], [4]]),  # blank lines dropped, as tidy_markdown does
        (["x", "\x1b", "\n", "y"], [[0, 1], [3]]),
    ],
)
def test_markdown_lines_map_to_their_tokens(pieces: list[str], lines: list[list[int]]) -> None:
    assert markdown_line_tokens(pieces) == lines


@pytest.mark.parametrize(
    ("markdown", "kinds"),
    [
        ("# Title\n\nText one\nstill one\n\n## Sub", ["heading", "paragraph", "heading"]),
        ("- a\n- b\n  more b\n1. c", ["list_item", "list_item", "list_item"]),
        ("| a | b |\n|---|---|\n| 1 | 2 |\n\nafter", ["table", "paragraph"]),
        ("<table><tr><td>a</td></tr>\n<tr><td>b</td></tr></table>\ntext", ["table", "paragraph"]),
        ("$$\nx^2\n$$\n\\[ y \\]", ["formula", "formula"]),
        ("```\ncode\n\nmore\n```", ["code"]),
        ("Text\n# Heading right after", ["paragraph", "heading"]),
    ],
)
def test_markdown_splits_into_blocks(markdown: str, kinds: list[str]) -> None:
    blocks = markdown_blocks(markdown)
    assert [block.kind.value for block in blocks] == kinds
    non_blank = [line.strip() for line in markdown.split("\n") if line.strip()]
    assert [line for block in blocks for line in block.text.split("\n") if line] == non_blank
    assert [k for block in blocks for k in block.lines] == list(range(len(non_blank)))


def test_a_heading_knows_its_level() -> None:
    assert [(b.kind, b.level) for b in markdown_blocks("### Three\n\ntext")] == [
        (BlockKind.HEADING, 3),
        (BlockKind.PARAGRAPH, 0),
    ]


@pytest.mark.parametrize(
    ("box", "share"),
    [((0, 0, 100, 100), 1.0), ((0, 0, 50, 100), 0.75), ((25, 0, 75, 100), 0.5), ((0, 0, 50, 50), 0.375)],
)
def test_inside_counts_each_patch_by_its_area_inside(box: tuple[int, int, int, int], share: float) -> None:
    heat = Heat(np.array([[0.3, 0.1], [0.3, 0.1]], dtype=np.float32), (0, 0, 100, 100))
    assert inside(heat, box) == pytest.approx(share)


def test_a_region_holds_half_the_mass_at_least() -> None:
    grid = np.zeros((4, 4), dtype=np.float32)
    grid[1, 2], grid[2, 2], grid[0, 0] = 0.3, 0.25, 0.2  # the first alone holds less than half
    found = region(Heat(grid, (100, 0, 180, 40)))  # patches of 20 x 10 pixels
    assert found is not None
    assert found.box == (140, 10, 160, 30) and found.share == pytest.approx(0.55 / 0.75, abs=1e-4)
    assert found.spatial == pytest.approx(0.75)
    assert region(Heat(np.zeros((2, 2), dtype=np.float32), (0, 0, 2, 2))) is None


def test_regions_travel_through_json(tmp_path: Path) -> None:
    from kosmos_cli.values import PageResult, Region

    info = PageInfo(Document("a.png", "a"), 0, 1, 100, 80)
    result = PageResult(info, Task.MD, "# T\n\ntext", regions=(Region((1, 2, 3, 4), 0.5, 0.25), None))
    assert PageResult.from_dict(result.to_dict(), info.document) == result


MARKDOWN = "# Report\n\nFirst paragraph\n\n## Costs\n\n- one item\n- two item\n\n| a | b |\n|---|---|"


@pytest.fixture
def cli(planted: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`kosmos` on the planted model, its tokens forced to spell `MARKDOWN` (md) or OCR lines."""
    from forced import forcing
    from typer.testing import CliRunner

    from kosmos_cli.cli import app
    from kosmos_cli.model import loading

    def invoke(*args: str, raw: str = MARKDOWN, code: int = 0) -> Any:
        monkeypatch.setattr(loading, "load_runner", forcing(load_runner, raw))
        result = CliRunner().invoke(
            app, [*args, "--model", str(planted), "--device", "cpu", "--dtype", "float32"]
        )
        assert result.exit_code == code, result.stderr
        return result

    return invoke


def test_md_with_attention_writes_regions_chunks_and_pictures(cli: Any, tmp_path: Path) -> None:
    import jsonschema

    square = (320, 160, 416, 256)
    bright_square((640, 480), square).save(tmp_path / "page.png")
    out = tmp_path / "out"
    cli("md", str(tmp_path / "page.png"), "--attention", "-o", str(out), "-f", "json", "-f", "chunks")
    assert sorted(path.name for path in out.iterdir()) == [
        ".kosmos", "page.png.attention.png", "page.png.chunks.jsonl", "page.png.heat.png", "page.png.md.json",
    ]  # fmt: skip
    document = json.loads((out / "page.png.md.json").read_text())
    schema = json.loads((Path(kosmos_cli.__file__).parent / "result.schema.json").read_text())
    jsonschema.Draft202012Validator(schema).validate(document)
    (page,) = document["pages"]
    blocks = markdown_blocks(page["text"])
    assert len(page["regions"]) == len(blocks) == 6
    chunks = [json.loads(line) for line in (out / "page.png.chunks.jsonl").read_text().splitlines()]
    assert [(c["kind"], c["headings"]) for c in chunks] == [
        ("heading", []),
        ("paragraph", ["Report"]),
        ("heading", ["Report"]),
        ("list_item", ["Report", "Costs"]),
        ("list_item", ["Report", "Costs"]),
        ("table", ["Report", "Costs"]),
    ]
    for chunk in chunks:  # every token looked at the square
        assert contains(grown(square, 16), tuple(chunk["bbox"])), chunk
    for name in ("page.png.attention.png", "page.png.heat.png"):
        with Image.open(out / name) as picture:
            assert picture.format == "PNG"
    # kosmos convert makes the same chunks from the JSON
    from typer.testing import CliRunner

    from kosmos_cli.cli import app

    again = tmp_path / "again"
    converted = CliRunner().invoke(
        app, ["convert", str(out / "page.png.md.json"), "-f", "chunks", "-o", str(again)]
    )
    assert converted.exit_code == 0, converted.stderr
    assert (again / "page.png.chunks.jsonl").read_bytes() == (out / "page.png.chunks.jsonl").read_bytes()


def test_ocr_lines_agree_with_their_boxes_where_the_model_looked(cli: Any, tmp_path: Path) -> None:
    # 640 x 480 is read at 1168 x 880: the first box is the square's (patches at its edges are partly
    # outside it), the second a dark corner's
    bright_square((640, 480), (320, 160, 416, 256)).save(tmp_path / "page.png")
    raw = "<bbox><x_584><y_292><x_759><y_467></bbox>Inside<bbox><x_10><y_10><x_100><y_60></bbox>Outside"
    result = cli("ocr", str(tmp_path / "page.png"), "--attention", "-f", "json", raw=raw)
    lines = json.loads(result.stdout)["pages"][0]["lines"]
    assert [line["text"] for line in lines] == ["Inside", "Outside"]
    assert lines[0]["attention_agreement"] > 0.6 and lines[1]["attention_agreement"] < 0.01


def test_chunks_of_a_pdf_carry_pdf_points(cli: Any, tmp_path: Path) -> None:
    from inputs import PdfPage, make_pdf

    pdf = make_pdf(tmp_path / "doc.pdf", pages=[PdfPage(text="one"), PdfPage(text="two")])
    result = cli("md", str(pdf), "--attention", "-f", "chunks")
    chunks = [json.loads(line) for line in result.stdout.splitlines()]
    assert {chunk["page_number"] for chunk in chunks} == {1, 2}
    for chunk in chunks:
        x0, y0, x1, y1 = chunk["pdf_bbox"]
        assert -1 <= x0 < x1 <= 613 and -1 <= y0 < y1 <= 793  # points on the page, to a rendered pixel
    assert [chunk["headings"] for chunk in chunks if chunk["page_number"] == 2][-1] == ["Report", "Costs"]
