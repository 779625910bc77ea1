"""The model service behind the OCRmyPDF plugin: one model, pages from many processes, nothing waits forever."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from inputs import sample_image

from kosmos_cli.api import Transcriber
from kosmos_cli.config import Settings
from kosmos_cli.errors import InputError, KosmosError, ModelLoadError
from kosmos_cli.model.loading import load_runner
from kosmos_cli.serve import Inbox, ModelService, transcribe_image
from kosmos_cli.transcribe import transcribe_pages
from kosmos_cli.values import Document, Page, PageInfo, PageResult, Task

TOKENS = 10


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = []
    for number, size in enumerate([(120, 90), (90, 140), (150, 60), (100, 100)]):
        path = tmp_path / f"page{number}.png"
        sample_image(size=size).save(path)
        paths.append(path)
    return paths


def alone(checkpoint: Path, images: list[Path]) -> list[str]:
    """Each image transcribed by itself, in this process."""
    transcriber = Transcriber.load(
        model=str(checkpoint), dtype="float32", max_new_tokens=TOKENS, batch_size=1
    )
    texts = [result.text for result in transcriber.transcribe([str(path) for path in images], task="ocr")]
    assert len(set(texts)) == len(texts)  # the tiny model reads each page differently
    return texts


def test_pages_arriving_one_after_another_join_the_batch_and_match_one_at_a_time(
    tiny_checkpoint: Path, images: list[Path]
) -> None:
    """As OCRmyPDF's workers do: each sends its next page only once its last one is answered.

    A runner that waited for a full batch, or for the next page while pages were decoding, would hang
    here; the results must be the ones each page gets alone (float32: batching changes no token).
    """
    runner = load_runner(Settings(model=str(tiny_checkpoint), dtype="float32", max_new_tokens=TOKENS))
    inbox = Inbox()
    results: dict[int, str] = {}

    def worker(numbers: list[int]) -> None:
        for number in numbers:
            answer: queue.Queue[PageResult | KosmosError] = queue.Queue()
            inbox.put(read_page(images[number]), answer)  # two threads read at once, as the service's do
            outcome = answer.get(timeout=120)
            assert isinstance(outcome, PageResult)
            results[number] = outcome.text

    def model() -> None:
        for _, answer, result in transcribe_pages(inbox, runner, task=Task.OCR):
            answer.put(result)

    threading.Thread(target=model, daemon=True).start()
    workers = [threading.Thread(target=worker, args=(numbers,)) for numbers in ([0, 2], [1, 3])]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=180)
        assert not thread.is_alive(), "a page waited for ever"
    assert [results[number] for number in range(len(images))] == alone(tiny_checkpoint, images)


def read_page(path: Path) -> Page:
    from kosmos_cli.rasterize import iter_pages

    (page,) = list(iter_pages(Document(str(path), path.name)))
    assert isinstance(page, Page)
    return page


def test_the_service_answers_many_clients_from_one_model(tiny_checkpoint: Path, images: list[Path]) -> None:
    settings = Settings(model=str(tiny_checkpoint), dtype="float32", max_new_tokens=TOKENS)
    service = ModelService.start(settings)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(
                pool.map(lambda path: transcribe_image(service.address, service.authkey, str(path)), images)
            )
        assert [result.text for result in results] == alone(tiny_checkpoint, images)
        assert [result.info.width for result in results] == [120, 90, 150, 100]
        with pytest.raises(InputError, match="does not exist"):
            transcribe_image(service.address, service.authkey, str(images[0].parent / "missing.png"))
        with pytest.raises(ModelLoadError, match="refused this process: wrong key"):
            transcribe_image(service.address, b"not the key", str(images[0]))
    finally:
        service.stop()
    assert service.process.returncode == 0
    assert not Path(service.address).exists()


def test_a_model_that_cannot_load_answers_every_page_with_why(tmp_path: Path, images: list[Path]) -> None:
    service = ModelService.start(Settings(model=str(tmp_path / "no-model")))
    try:
        with pytest.raises(ModelLoadError, match="no-model"):
            transcribe_image(service.address, service.authkey, str(images[0]))
    finally:
        service.stop()


def test_the_service_ends_when_its_parent_does(tiny_checkpoint: Path) -> None:
    """Closing stdin is how a parent's exit reaches it, however the parent ends (SIGKILL included)."""
    service = ModelService.start(Settings(model=str(tiny_checkpoint)))
    assert service.process.stdin is not None
    service.process.stdin.close()
    assert service.process.wait(timeout=30) == 0
    service.stop()


def test_inbox_is_ready_only_with_a_page_waiting() -> None:
    inbox = Inbox()
    assert not inbox.ready()
    page = Page(PageInfo(Document("a", "a"), 0, 1, 1, 1), sample_image(size=(1, 1)))
    inbox.put(page, queue.Queue())
    assert inbox.ready()
    assert next(inbox)[0] is page
    assert not inbox.ready()
