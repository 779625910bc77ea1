"""One model shared by many jobs (`sharing`): turns taken page by page, cancelling, stopping."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from inputs import sample_image
from PIL import Image

from kosmos_cli.config import Settings
from kosmos_cli.errors import GenerationError
from kosmos_cli.model import Arrivals, Request
from kosmos_cli.model.continuous import CANCELLED
from kosmos_cli.model.loading import load_runner
from kosmos_cli.sharing import JobCancelled, ServiceStopping, SharedModel, Turns, Watcher
from kosmos_cli.values import Generation, Task


class OneAtATime:
    """A runner that answers each request before it takes the next, noting whose it was."""

    max_new_tokens = 8

    def __init__(self, started: threading.Event) -> None:
        self.order: list[str] = []
        self.started = started

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        assert isinstance(requests, Arrivals)
        self.started.wait(10)  # every lane has its first requests queued before the first is taken
        for request in requests:
            self.order.append(request.key.request.key)  # type: ignore[attr-defined]
            yield request, Generation(str(request.key.request.key), (1, 1), ids=(7,))  # type: ignore[attr-defined]


def going() -> threading.Event:
    """A start signal already given: the runner takes requests as they come."""
    started = threading.Event()
    started.set()
    return started


def requests(name: str, count: int) -> list[Request]:
    image = Image.new("RGB", (4, 4))
    return [Request(f"{name}{number}", image, Task.OCR) for number in range(count)]


def run_lane(model: SharedModel, name: str, count: int, answers: dict[str, list[str]]) -> threading.Thread:
    lane = model.lane(name)

    def work() -> None:
        answers[name] = [str(request.key) for request, _ in lane.generate(requests(name, count))]

    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_a_long_job_and_short_ones_take_turns_page_by_page() -> None:
    """A 12-page job queued first does not hold back the 1-page and 2-page jobs queued behind it."""
    started = threading.Event()
    runner = OneAtATime(started)
    model = SharedModel(runner)  # type: ignore[arg-type]
    model.start()
    answers: dict[str, list[str]] = {}
    threads = [run_lane(model, "long", 12, answers)]
    threads += [run_lane(model, "one", 1, answers), run_lane(model, "two", 2, answers)]
    while model.turns.waiting() < 2 + 1 + 2:
        threading.Event().wait(0.01)
    started.set()
    for thread in threads:
        thread.join(10)
    assert answers["long"] == [f"long{i}" for i in range(12)]
    assert answers["one"] == ["one0"] and answers["two"] == ["two0", "two1"]
    assert runner.order[:5] == ["long0", "one0", "two0", "long1", "two1"]
    model.stop(ServiceStopping("done"), timeout=5)
    assert not model.running


def test_a_cancelled_lane_drops_what_waits_and_its_job_hears_why() -> None:
    turns = Turns()
    model = SharedModel(OneAtATime(threading.Event()))  # type: ignore[arg-type]  # never started
    model.turns = turns
    lane = model.lane("doomed")
    outcome: list[BaseException] = []

    def work() -> None:
        try:
            list(lane.generate(requests("doomed", 5)))
        except JobCancelled as error:
            outcome.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    while turns.waiting() < 2:
        threading.Event().wait(0.01)
    lane.cancel(JobCancelled("the job was cancelled"))
    thread.join(5)
    assert [str(error) for error in outcome] == ["the job was cancelled"]
    assert turns.waiting() == 0 and lane.lane.cancelled()


def test_stopping_ends_the_model_thread_and_every_job() -> None:
    model = SharedModel(OneAtATime(going()))  # type: ignore[arg-type]
    model.start()
    lane = model.lane()
    caught: list[BaseException] = []

    def work() -> None:
        try:
            list(lane.generate(requests("x", 3)))
        except ServiceStopping as error:
            caught.append(error)

    thread = threading.Thread(target=work)
    thread.start()
    model.stop(ServiceStopping("the service is stopping"), timeout=10)
    thread.join(10)
    assert not model.running and len(caught) == 1


class Counting(Watcher):
    def __init__(self) -> None:
        self.together: list[int] = []
        self.left = 0

    def taken(self, lanes_running: int) -> None:
        self.together.append(lanes_running)

    def finished(self, seconds: float) -> None:
        self.left += 1


def test_pages_of_different_jobs_decode_together_and_a_cancelled_one_leaves_the_batch(
    tiny_checkpoint: Path,
) -> None:
    """The real decode loop: two jobs' pages in one batch; a job cancelled mid-page gets CANCELLED for it."""
    runner = load_runner(
        Settings(model=str(tiny_checkpoint), dtype="float32", max_new_tokens=40, batch_size=4)
    )
    runner.loop_rule = None  # the tiny model repeats itself; this test needs pages that keep decoding
    watcher = Counting()
    model = SharedModel(runner, watcher)
    image = sample_image(size=(120, 90))
    kept = model.lane("kept")
    doomed = model.lane("doomed")
    results: dict[str, list[Generation | GenerationError]] = {}

    def work(lane_runner: object, name: str) -> None:
        try:
            results[name] = [outcome for _, outcome in lane_runner.generate([Request(name, image, Task.OCR)])]  # type: ignore[attr-defined]
        except JobCancelled:
            results[name] = []

    threads = [
        threading.Thread(target=work, args=(lane, name))
        for lane, name in ((kept, "kept"), (doomed, "doomed"))
    ]
    for thread in threads:
        thread.start()
    while model.turns.waiting() < 2:  # both pages wait before the model takes any: they join together
        threading.Event().wait(0.01)
    model.start()
    deadline = time.monotonic() + 60
    while watcher.together[-1:] != [2] and time.monotonic() < deadline:
        threading.Event().wait(0.001)
    doomed.cancel(JobCancelled("the job was cancelled"))
    for thread in threads:
        thread.join(60)
    model.stop(ServiceStopping("done"), timeout=10)
    assert max(watcher.together) == 2
    assert results["doomed"] == []
    (generation,) = results["kept"]
    assert isinstance(generation, Generation) and generation.token_count == 40
    assert watcher.left == 2  # the cancelled page left the batch too, with its error


def test_the_decode_loop_drops_a_request_cancelled_between_steps(tiny_checkpoint: Path) -> None:
    runner = load_runner(Settings(model=str(tiny_checkpoint), dtype="float32", max_new_tokens=30))
    runner.loop_rule = None
    steps = iter(range(1000))
    image = sample_image(size=(120, 90))
    cancelled = Request("gone", image, Task.OCR, cancelled=lambda: next(steps) >= 5)
    kept = Request("kept", image, Task.OCR)
    outcomes = dict((request.key, outcome) for request, outcome in runner.generate([cancelled, kept]))
    assert isinstance(outcomes["gone"], GenerationError) and outcomes["gone"].message == CANCELLED
    assert isinstance(outcomes["kept"], Generation) and outcomes["kept"].token_count == 30


@pytest.mark.parametrize("count", [0, 1, 5])
def test_a_lane_with_no_more_requests_ends_without_waiting(count: int) -> None:
    model = SharedModel(OneAtATime(going()))  # type: ignore[arg-type]
    model.start()
    answers = [str(request.key) for request, _ in model.lane().generate(requests("p", count))]
    assert answers == [f"p{i}" for i in range(count)]
    model.stop(ServiceStopping("done"), timeout=5)


def test_a_job_that_starts_after_the_model_stopped_hears_so_at_once() -> None:
    """A job thread that was reading its document when SIGTERM came must not wait for a model thread that ended."""
    model = SharedModel(OneAtATime(going()))  # type: ignore[arg-type]
    model.start()
    model.stop(ServiceStopping("the service is stopping"), timeout=5)
    with pytest.raises(ServiceStopping):
        list(model.lane().generate(requests("late", 2)))


def test_the_decode_loop_hands_each_page_its_tokens_so_far(tiny_checkpoint: Path) -> None:
    runner = load_runner(Settings(model=str(tiny_checkpoint), dtype="float32", max_new_tokens=20))
    runner.loop_rule = None
    seen: list[list[int]] = []
    request = Request(
        "page", sample_image(size=(120, 90)), Task.MD, partial=lambda ids: seen.append(list(ids))
    )
    ((_, generation),) = list(runner.generate([request]))
    assert isinstance(generation, Generation)
    assert [len(ids) for ids in seen] == list(range(1, 21))
    assert tuple(seen[-1]) == generation.ids and runner.text(seen[-1]) == generation.text
