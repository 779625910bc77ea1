"""Kosmos-2.5 inside OCRmyPDF: the real `ocrmypdf` command, Ghostscript and Tesseract, on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pymupdf
import pytest
from PIL import Image, ImageDraw, ImageFont

from kosmos_cli.api import Transcriber, transcribe_files

TESTS = Path(__file__).resolve().parent
FORCED = (
    "<bbox><x_40><y_60><x_700><y_140></bbox>Hello world<bbox><x_40><y_200><x_600><y_280></bbox>Total 12,50"
)
FORCED_TEXT = "Hello world\nTotal 12,50"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


@pytest.fixture(autouse=True)
def tools(ocrmypdf_tools: None) -> None:
    """Every test here runs the real OCRmyPDF."""


def scan_image(words: str, size: tuple[int, int] = (850, 1100)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(FONT, 36) if Path(FONT).exists() else ImageFont.load_default()
    draw.text((60, 80), words, fill="black", font=font)
    draw.text((60, 240), "Total 12,50", fill="black", font=font)
    return image


def mixed_pdf(path: Path) -> Path:
    """Page 1 born-digital; pages 2 and 3 scans (an image each, no text)."""
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    page.insert_text((72, 100), "A born-digital page of its own", fontname="helv", fontsize=14)
    for words in ("Hello world", "Second scan"):
        page = doc.new_page(width=612, height=792)
        image = path.with_suffix(f".{len(doc)}.png")
        scan_image(words).save(image)
        page.insert_image(page.rect, filename=str(image))
    doc.save(path)
    return path


def run_ocrmypdf(
    tmp_path: Path, *args: str, forced: str | None = None, run_id: str = ""
) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"TMPDIR": str(tmp_path), "KOSMOS_TEST_RUN": run_id}
    if forced is not None:
        env |= {
            "PYTHONPATH": f"{TESTS / 'forced_site'}{os.pathsep}{TESTS}",
            "KOSMOS_TEST_FORCED_OUTPUT": forced,
        }
    command = [sys.executable, "-m", "ocrmypdf", "--plugin", "kosmos_cli.ocrmypdf", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def services(run_id: str) -> list[psutil.Process]:
    """The model services of one ocrmypdf run still alive."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.info["cmdline"][-2:] == ["-m", "kosmos_cli.serve"] and (
                process.environ().get("KOSMOS_TEST_RUN") == run_id
            ):
                found.append(process)
        except (psutil.Error, TypeError):
            continue
    return found


def test_ocrmypdf_puts_kosmos_lines_and_words_in_its_text_layer(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    pdf = mixed_pdf(tmp_path / "in.pdf")
    run_id = uuid.uuid4().hex
    done = run_ocrmypdf(
        tmp_path,
        "--kosmos-model", str(tiny_checkpoint), "--kosmos-dtype", "float32", "-j", "2",
        "--skip-text", "--sidecar", str(tmp_path / "side.txt"),
        str(pdf), str(tmp_path / "out.pdf"),
        forced=FORCED, run_id=run_id,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not services(run_id), "the model service outlived ocrmypdf"
    # The sidecar: OCRmyPDF's note for the skipped page, then kosmos's lines, pages split by form feeds.
    assert (tmp_path / "side.txt").read_text().split("\f") == [
        "[OCR skipped on page(s) 1]",
        FORCED_TEXT,
        FORCED_TEXT,
    ]
    out = pymupdf.open(tmp_path / "out.pdf")
    assert out[0].get_text().split() == [
        "A",
        "born-digital",
        "page",
        "of",
        "its",
        "own",
    ]  # skipped: as it was
    # Where kosmos itself puts the same lines on the same pages, in PDF points.
    expected = kosmos_boxes(tmp_path, pdf, tiny_checkpoint)
    for number in (1, 2):
        words = out[number].get_text("words")
        assert [word[4] for word in words] == FORCED_TEXT.split(), number
        lines = expected[number]
        for x0, y0, x1, y1, text, *_ in words:
            line = lines[0] if text in ("Hello", "world") else lines[1]
            left, top, right, bottom = line
            assert left - 4 <= x0 and x1 <= right + 4 and top - 4 <= y0 and y1 <= bottom + 4, (text, line)


def kosmos_boxes(tmp_path: Path, pdf: Path, checkpoint: Path) -> dict[int, list[tuple[float, ...]]]:
    """The boxes `kosmos ocr` gives the forced lines on each page (PDF points, y down), by page index."""
    from forced import forcing

    from kosmos_cli.config import Settings
    from kosmos_cli.model import loading

    runner = forcing(loading.load_runner, FORCED)(Settings(model=str(checkpoint), dtype="float32"))
    out = tmp_path / "kosmos"
    transcribe_files([str(pdf)], task="ocr", formats=["json"], output=out, text_layer="ignore", runner=runner)
    data = json.loads((out / "in.pdf.json").read_text())
    height = pymupdf.open(pdf)[0].rect.height  # pdf_bbox is in PDF space (y up); words come y down
    boxes = {}
    for index, page in enumerate(data["pages"]):
        boxes[index] = [
            (x0, height - y1, x1, height - y0)
            for x0, y0, x1, y1 in (line["pdf_bbox"] for line in page["lines"])
        ]
    return boxes


def test_the_model_reads_the_image_ocrmypdf_rasterized(tmp_path: Path, tiny_checkpoint: Path) -> None:
    pdf = mixed_pdf(tmp_path / "in.pdf")
    done = run_ocrmypdf(
        tmp_path,
        "--kosmos-model", str(tiny_checkpoint), "--kosmos-dtype", "float32", "--kosmos-max-new-tokens", "12",
        "--force-ocr", "-k", "--sidecar", str(tmp_path / "side.txt"),
        str(pdf), str(tmp_path / "out.pdf"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # OCRmyPDF's default output, checked by OCRmyPDF. (With --skip-text the first test's born-digital page
    # keeps its unembedded Helvetica, which PDF/A forbids, and OCRmyPDF falls back to a plain PDF.)
    assert "Output file is a PDF/A-2b" in done.stderr
    (kept,) = tmp_path.glob("ocrmypdf.io.*")
    images = sorted(kept.glob("*_ocr.png"))
    assert len(images) == 3
    transcriber = Transcriber.load(model=str(tiny_checkpoint), dtype="float32", max_new_tokens=12)
    expected = [
        result.text for result in transcriber.transcribe([str(image) for image in images], task="ocr")
    ]
    assert len(set(expected)) == 3  # the tiny model reads each page differently
    assert (tmp_path / "side.txt").read_text().split("\f") == expected


def test_rotate_pages_turns_a_sideways_scan_with_tesseract_s_reading(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Kosmos-2.5 cannot tell orientation; the plugin asks Tesseract, as OCRmyPDF's own engine does."""
    font = ImageFont.truetype(FONT, 30) if Path(FONT).exists() else ImageFont.load_default()
    image = Image.new("RGB", (1275, 1650), "white")
    draw = ImageDraw.Draw(image)
    for line in range(14):
        draw.text(
            (90, 120 + 70 * line),
            "The quick brown fox jumps over the lazy dog"[: 30 + line],
            fill="black",
            font=font,
        )
    sideways = tmp_path / "sideways.png"
    image.rotate(90, expand=True).save(sideways)  # fed into the scanner on its side
    doc = pymupdf.open()
    doc.new_page(width=792, height=612).insert_image(pymupdf.Rect(0, 0, 792, 612), filename=str(sideways))
    doc.save(tmp_path / "in.pdf")
    done = run_ocrmypdf(
        tmp_path,
        "--kosmos-model", str(tiny_checkpoint), "--kosmos-max-new-tokens", "4",
        "--rotate-pages", "--rotate-pages-threshold", "5", "--output-type", "pdf",
        str(tmp_path / "in.pdf"), str(tmp_path / "out.pdf"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "will rotate" in done.stderr
    assert pymupdf.open(tmp_path / "out.pdf")[0].rotation == 90


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kosmos-batch-size", "0"], "--kosmos-batch-size must be at least 1, not 0"),
        (["--kosmos-device", "gpu"], "`gpu` is not a device"),
        (["--kosmos-model", "/no/such/model"], "/no/such/model"),
        (["--kosmos-model", "/no/such/model"], "pass a local folder with --kosmos-model"),
        (["-l", "eng+deu"], "Kosmos-2.5 was trained to read English only: `-l eng+deu` asks for deu"),
    ],
)
def test_bad_kosmos_options_stop_ocrmypdf_with_why(
    tmp_path: Path, tiny_checkpoint: Path, args: list[str], message: str
) -> None:
    pdf = mixed_pdf(tmp_path / "in.pdf")
    run_id = uuid.uuid4().hex
    done = run_ocrmypdf(
        tmp_path, "--kosmos-model", str(tiny_checkpoint), *args, "--force-ocr", str(pdf), str(tmp_path / "o.pdf"),
        run_id=run_id,
    )  # fmt: skip
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not services(run_id)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("--batch-size must be at least 1, not 0", "--kosmos-batch-size must be at least 1, not 0"),
        (
            "hint: try --dtype bfloat16 or --device cpu",
            "hint: try --kosmos-dtype bfloat16 or --kosmos-device cpu",
        ),
        ("use --kv-dtype auto", "use --kosmos-kv-dtype auto"),
        ("run `kosmos download --to DIR`", "run `kosmos download --to DIR`"),  # not an option of the plugin
        ("--kosmos-model is named already", "--kosmos-model is named already"),
    ],
)
def test_kosmos_messages_name_the_plugin_s_options(message: str, expected: str) -> None:
    from kosmos_cli.ocrmypdf import plugin_words

    assert plugin_words(message) == expected


def test_the_python_api_takes_the_plugin_and_its_options(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import ocrmypdf

    pdf = mixed_pdf(tmp_path / "in.pdf")
    code = ocrmypdf.ocr(
        pdf,
        tmp_path / "out.pdf",
        plugins=["kosmos_cli.ocrmypdf"],
        kosmos_model=str(tiny_checkpoint),
        kosmos_max_new_tokens=8,
        skip_text=True,
        output_type="pdf",
        progress_bar=False,
    )
    assert code == ocrmypdf.ExitCode.ok
    assert pymupdf.open(tmp_path / "out.pdf").page_count == 3


def test_the_hocr_path_writes_the_page_s_hocr_and_text(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """OCRmyPDF's hOCR pipelines call `generate_hocr`: kosmos's hOCR writer on the service's result."""
    from types import SimpleNamespace

    from kosmos_cli.config import Settings
    from kosmos_cli.ocrmypdf import KosmosEngine, KosmosOptions
    from kosmos_cli.serve import ModelService, transcribe_image

    image = tmp_path / "page.png"
    scan_image("Hello world", size=(425, 550)).save(image)
    service = ModelService.start(Settings(model=str(tiny_checkpoint), dtype="float32", max_new_tokens=8))
    try:
        chosen = KosmosOptions(service=service.address, service_key=service.authkey.hex())
        options = SimpleNamespace(kosmos=chosen)
        KosmosEngine.generate_hocr(image, tmp_path / "page.hocr", tmp_path / "page.txt", options)  # type: ignore[arg-type]
        expected = transcribe_image(service.address, service.authkey, str(image))
    finally:
        service.stop()
    hocr = (tmp_path / "page.hocr").read_text()
    assert "class='ocr_page'" in hocr or 'class="ocr_page"' in hocr
    assert "bbox 0 0 425 550" in hocr
    assert (tmp_path / "page.txt").read_text() == expected.text
