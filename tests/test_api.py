"""The Python API the README documents: Transcriber and parse_ocr."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from inputs import PdfPage, make_corrupt, make_image, make_pdf, sample_image

from kosmos_cli import (
    InputError,
    KosmosError,
    Line,
    ModelLoadError,
    PageResult,
    Status,
    Task,
    Transcriber,
    parse_ocr,
)
from kosmos_cli.testing import ScriptedRunner


def test_transcriber_keeps_input_order_and_sizes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    transcriber = Transcriber.load(model=str(tiny_checkpoint), device="cpu", max_new_tokens=5, batch_size=2)
    path = make_image(tmp_path / "page.png", size=(120, 90))
    images = [sample_image(size=(300, 200)), path, sample_image(size=(50, 400))]
    results = transcriber.transcribe(images, task="ocr")
    assert [type(r) for r in results] == [PageResult] * 3
    assert [(r.info.width, r.info.height) for r in results] == [(300, 200), (120, 90), (50, 400)]
    assert all(r.task is Task.OCR for r in results)
    assert all(r.status in (Status.OK, Status.TRUNCATED) for r in results)
    assert results[1].info.document.path == str(path)
    assert [r.info.document.name for r in results] == ["image 1", "page.png", "image 3"]
    alone = Transcriber.load(model=str(tiny_checkpoint), device="cpu", max_new_tokens=5, batch_size=1)
    assert (
        alone.transcribe([images[0]], task=Task.OCR)[0].raw == results[0].raw
    )  # batching keeps greedy output
    assert transcriber.runner.batch_size == 2  # type: ignore[attr-defined]  # a call changes nothing shared


def test_loading_through_the_api_draws_no_progress_bar_unless_asked(
    tiny_checkpoint: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from transformers.utils import logging as hf_logging

    # transformers' default, which an in-process CLI test on this worker may have turned off
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        _load_quietly_unless_asked(tiny_checkpoint, capfd, caplog)
        assert hf_logging.is_progress_bar_enabled(), "loading leaves transformers' setting as it was"
    finally:
        if not enabled:
            hf_logging.disable_progress_bar()


def _load_quietly_unless_asked(
    tiny_checkpoint: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    Transcriber.load(model=str(tiny_checkpoint), device="cpu", max_new_tokens=5)
    assert capfd.readouterr().err == "", "a library call prints nothing into its caller's terminal"
    with caplog.at_level(logging.INFO, logger="kosmos_cli"):
        Transcriber.load(model=str(tiny_checkpoint), device="cpu", max_new_tokens=5)
    assert "Loading weights" in capfd.readouterr().err, "asked for kosmos's progress, it shows"


def test_transcriber_reads_every_selected_page_of_a_pdf(tmp_path: Path) -> None:
    pdf = make_pdf(
        tmp_path / "three.pdf", pages=[PdfPage(text="one"), PdfPage(text="two"), PdfPage(text="three")]
    )
    image = sample_image(size=(80, 60))
    runner = ScriptedRunner()
    transcriber = Transcriber(runner)

    results = transcriber.transcribe([pdf, image], task="md")

    assert [(r.info.document.path, r.info.page_number, r.info.page_count) for r in results] == [
        (str(pdf), 1, 3),
        (str(pdf), 2, 3),
        (str(pdf), 3, 3),
        ("image 2", 1, 1),
    ]
    assert [r.text for r in results] == [f"# page {digest}" for digest in runner.seen]
    assert len(set(runner.seen)) == 4  # four different pages, each transcribed once
    selected = transcriber.transcribe([pdf], task="md", pages="3,1")
    assert [r.info.page_number for r in selected] == [1, 3]
    assert [r.text for r in selected] == [results[0].text, results[2].text]


def test_transcriber_raises_for_a_file_it_cannot_open(tmp_path: Path) -> None:
    broken = make_corrupt(tmp_path / "broken.pdf")
    with pytest.raises(InputError, match=r"broken\.pdf"):
        Transcriber(ScriptedRunner()).transcribe([broken])


def test_transcriber_load_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        Transcriber.load(model=str(tmp_path))
    assert isinstance(caught.value, KosmosError)
    assert caught.value.exit_code == 3
    assert caught.value.hint


def test_parse_ocr_is_exported() -> None:
    [line] = parse_ocr(
        "<bbox><x_53><y_573><x_69><y_606></bbox>1", resized_size=(832, 1120), original_size=(864, 1163)
    )
    assert line == Line("1", ((55, 594), (71, 594), (71, 629), (55, 629)))  # int(clip(x / w, 0, 1) * W)
    assert line.bbox == (55, 594, 71, 629)
