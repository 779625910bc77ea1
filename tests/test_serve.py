"""The model service behind the OCRmyPDF plugin: one model, pages from many processes, nothing waits forever."""

from __future__ import annotations

import atexit
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from multiprocessing.connection import Client
from pathlib import Path

import pytest
from inputs import sample_image

from kosmos_cli.api import Transcriber
from kosmos_cli.config import Settings
from kosmos_cli.errors import InputError, KosmosError, ModelLoadError
from kosmos_cli.model.loading import load_runner
from kosmos_cli.serve import OWNER_FILE, Inbox, ModelService, transcribe_image
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


def _raw_client(address: str) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(address)
    return client


def _answered(call: Callable[[], object]) -> object:
    """Run `call` in a thread; return what it returned, failing if it is still waiting after a minute."""
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(call()), daemon=True)
    thread.start()
    thread.join(timeout=60)  # a bound for a deaf service only: a sound one answers in seconds
    assert outcome, "the service did not answer a good client"
    return outcome[0]


def test_bad_clients_cost_only_themselves(tiny_checkpoint: Path, images: list[Path]) -> None:
    settings = Settings(model=str(tiny_checkpoint), dtype="float32", max_new_tokens=TOKENS)
    service = ModelService.start(settings)
    good = partial(transcribe_image, service.address, service.authkey, str(images[0]))
    held = []
    try:
        with pytest.raises(ModelLoadError, match="wrong key"):  # once killed the accepting thread for good
            transcribe_image(service.address, b"not the key", str(images[0]))
        assert isinstance(_answered(good), PageResult)
        held.append(_raw_client(service.address))  # connects and never speaks: once blocked every client
        assert isinstance(_answered(good), PageResult)
        garbage = _raw_client(service.address)
        garbage.sendall(b"\xff" * 64)
        held.append(garbage)
        half = _raw_client(service.address)
        half.recv(1024)  # the service's challenge
        half.sendall(struct.pack("!i", 200) + b"only part of it")
        held.append(half)
        assert isinstance(_answered(good), PageResult)
        with Client(service.address, family="AF_UNIX", authkey=service.authkey) as client:
            client.send({"no": "image"})  # the right key, a malformed request: an error answer
            reply = client.recv()
        assert reply["error"].message == "a malformed request: it names no image"
        assert isinstance(_answered(good), PageResult)
    finally:
        for client in held:
            client.close()
        service.stop()
    assert service.process.returncode == 0


def test_a_killed_starter_leaves_no_socket_folder_behind(tiny_checkpoint: Path, tmp_path: Path) -> None:
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tiny_checkpoint)], stdout=subprocess.PIPE, text=True
    )
    assert starter.stdout is not None
    folder, service_pid = starter.stdout.readline().split()
    assert Path(folder).is_dir()
    starter.send_signal(signal.SIGKILL)  # as OCRmyPDF killed: the service sees its stdin close
    starter.wait()
    _gone(int(service_pid))
    assert not Path(folder).exists()


def test_a_killed_service_s_folder_is_removed_when_the_next_one_starts(tiny_checkpoint: Path) -> None:
    first = ModelService.start(Settings(model=str(tiny_checkpoint)))
    first.process.kill()  # SIGKILL: it cannot clean up
    first.process.wait()
    atexit.unregister(first.stop)
    # Stale once its starter is gone too: as if started by a process that ended (this one lives on).
    (Path(first.folder) / OWNER_FILE).write_text(f"{first.process.pid}\n")
    second = ModelService.start(Settings(model=str(tiny_checkpoint)))
    try:
        assert not Path(first.folder).exists()
        assert Path(second.folder).is_dir()
    finally:
        second.stop()


def test_sigterm_ends_the_service_and_removes_its_folder(tiny_checkpoint: Path) -> None:
    service = ModelService.start(Settings(model=str(tiny_checkpoint)))
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=60) == 128 + signal.SIGTERM
    assert not Path(service.folder).exists()
    service.stop()


STARTER = """
import sys
from kosmos_cli.config import Settings
from kosmos_cli.serve import ModelService
service = ModelService.start(Settings(model=sys.argv[1]))
print(service.folder, service.process.pid, flush=True)
__import__("time").sleep(600)
"""


def _gone(pid: int) -> None:
    """Wait until process `pid` has ended (a bound of a minute, for a service that never would)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still running")
