"""The Python API the README documents: Transcriber and parse_ocr."""

from __future__ import annotations

from pathlib import Path

import pytest
from inputs import make_image, sample_image

from kosmos_cli import KosmosError, Line, ModelLoadError, PageResult, Status, Task, Transcriber, parse_ocr


def test_transcriber_keeps_input_order_and_sizes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    transcriber = Transcriber.load(model=str(tiny_checkpoint), device="cpu", max_new_tokens=5)
    path = make_image(tmp_path / "page.png", size=(120, 90))
    images = [sample_image(size=(300, 200)), path, sample_image(size=(50, 400))]
    results = transcriber.transcribe(images, task="ocr", batch_size=2)
    assert [type(r) for r in results] == [PageResult] * 3
    assert [(r.info.width, r.info.height) for r in results] == [(300, 200), (120, 90), (50, 400)]
    assert all(r.task is Task.OCR for r in results)
    assert all(r.status in (Status.OK, Status.TRUNCATED) for r in results)
    assert results[1].info.document.path == str(path)
    alone = transcriber.transcribe([images[0]], task=Task.OCR, batch_size=1)
    assert alone[0].raw == results[0].raw  # batching does not change greedy output


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
