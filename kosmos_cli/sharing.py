"""One loaded model shared by many jobs at once (`kosmos serve`): their pages join one running batch,
taken in turn.

    job thread: transcribe_files(..., runner=model.lane())   model thread: runner.generate(turns)
        LaneRunner --request--> Turns (a lane per job, round robin) --> the continuous batch
        LaneRunner <--(request, generation)------------------------------ its lane's events

`Turns` is `model.Arrivals`: the model thread decodes the pages it has while it waits for more, and
takes the next waiting request from the next lane in turn, so a job of 500 pages and a job of one
share the batch page by page. A lane holds at most `WINDOW` requests waiting; its job is told each time
one is taken and offers the next, so one job alone still fills the batch while many jobs interleave.

Cancelling a lane (DELETE of a job) drops its waiting requests and makes its running pages leave the
batch at the next step (`Request.cancelled`); its job thread gets `JobCancelled`. Stopping the model
(SIGTERM) cancels every lane with `ServiceStopping`: a job's finished pages are already in its
progress log, so it resumes where it stopped at the next start.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from kosmos_cli.errors import GenerationError, KosmosError
from kosmos_cli.model import Request, Runner
from kosmos_cli.values import Generation

logger = logging.getLogger(__name__)

WINDOW = 2  # requests a lane may have waiting to be taken


class JobCancelled(KosmosError):
    """The job was cancelled: its pages left the batch."""


class ServiceStopping(JobCancelled):
    """The service is stopping: the job keeps what it finished and resumes at the next start."""


class Watcher:
    """What the service counts as requests move (the server's metrics); the default counts nothing."""

    def taken(self, lanes_running: int) -> None:
        """A request joined the batch; `lanes_running`: how many jobs have a page in it now."""

    def finished(self, seconds: float) -> None:
        """A request left the batch after `seconds` in it."""


@dataclass(eq=False)
class Lane:
    """One job's place in `Turns`: its requests waiting, and the events its job thread reads."""

    name: str
    waiting: deque[Request] = field(default_factory=deque)
    running: int = 0  # its requests in the batch
    stopped: KosmosError | None = None  # why it was cancelled
    events: queue.Queue[object] = field(default_factory=queue.Queue)
    partial: Callable[[list[int]], None] | None = None  # handed its pages' tokens so far (`Request.partial`)

    def cancelled(self) -> bool:
        """Whether the lane was cancelled (asked by the decode loop between steps)."""
        return self.stopped is not None


@dataclass(frozen=True, eq=False)
class _Ticket:
    """The shared runner's key of a request: its lane, the job's own request, when it joined."""

    lane: Lane
    request: Request
    taken_at: float


TAKEN = object()  # a lane's event: one of its requests was taken, so it may offer another


class Turns:
    """The requests of every lane, handed to the model thread one lane at a time (`model.Arrivals`)."""

    def __init__(self, watcher: Watcher | None = None) -> None:
        self._lanes: OrderedDict[int, Lane] = OrderedDict()  # the next lane to take from is first
        self._changed = threading.Condition()
        self._stopped: KosmosError | None = None  # why the iteration ended, once it has
        self._watcher = watcher or Watcher()

    def open(self, lane: Lane) -> None:
        """Add a lane; its requests take turns with every other lane's. After `stop`, the lane is
        stopped at once."""
        with self._changed:
            if self._stopped is not None:
                lane.stopped = lane.stopped or self._stopped
            else:
                self._lanes[id(lane)] = lane

    def close(self, lane: Lane) -> None:
        """Remove a lane and whatever it still has waiting."""
        with self._changed:
            self._lanes.pop(id(lane), None)
            lane.waiting.clear()

    def put(self, lane: Lane, request: Request) -> None:
        """Queue one of a lane's requests; raises the lane's reason if it was cancelled."""
        with self._changed:
            if lane.stopped is not None:
                raise lane.stopped
            lane.waiting.append(request)
            self._changed.notify_all()

    def cancel(self, lane: Lane, reason: KosmosError) -> None:
        """Stop a lane: drop its waiting requests; its running ones leave the batch at the next step."""
        with self._changed:
            if lane.stopped is None:
                lane.stopped = reason
            lane.waiting.clear()
            self._lanes.pop(id(lane), None)
        lane.events.put(reason)

    def stop(self, reason: KosmosError) -> None:
        """Cancel every lane with `reason` and end the iteration: the model thread's `generate` returns."""
        with self._changed:
            self._stopped = reason
            lanes = list(self._lanes.values())
            self._changed.notify_all()
        for lane in lanes:
            self.cancel(lane, reason)

    def waiting(self) -> int:
        """How many requests wait to join the batch, across every lane."""
        with self._changed:
            return sum(len(lane.waiting) for lane in self._lanes.values())

    def ready(self) -> bool:
        """Whether a request is waiting (or the iteration has ended): `next` returns at once."""
        with self._changed:
            return self._stopped is not None or any(lane.waiting for lane in self._lanes.values())

    def __iter__(self) -> Turns:
        return self

    def __next__(self) -> Request:
        """Wait for a request, then take it from the next lane in turn that has one."""
        with self._changed:
            while True:
                if self._stopped is not None:
                    raise StopIteration
                lane = next((lane for lane in self._lanes.values() if lane.waiting), None)
                if lane is not None:
                    break
                self._changed.wait()
            self._lanes.move_to_end(id(lane))  # its turn is over
            request = lane.waiting.popleft()
            lane.running += 1
            running = sum(1 for other in self._lanes.values() if other.running)
        self._watcher.taken(running)
        lane.events.put(TAKEN)
        ticket = _Ticket(lane, request, time.monotonic())
        return Request(ticket, request.image, request.task, cancelled=lane.cancelled, partial=lane.partial)

    def answer(self, shared: Request, outcome: Generation | GenerationError) -> None:
        """Give a request's outcome back to its lane."""
        ticket = shared.key
        assert isinstance(ticket, _Ticket)
        with self._changed:
            ticket.lane.running -= 1
        self._watcher.finished(time.monotonic() - ticket.taken_at)
        ticket.lane.events.put((ticket.request, outcome))


class SharedModel:
    """A runner serving many jobs from one thread: `lane()` gives each job a `Runner` of its own."""

    def __init__(self, runner: Runner, watcher: Watcher | None = None) -> None:
        self.runner = runner
        self.turns = Turns(watcher)
        self.failure: BaseException | None = None  # what ended the model thread, if it crashed
        self._thread = threading.Thread(target=self._run, name="kosmos-model", daemon=True)
        self._count = itertools.count(1)

    def start(self) -> None:
        """Start the model thread."""
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the model thread is taking requests."""
        return self._thread.is_alive()

    def stop(self, reason: KosmosError, *, timeout: float) -> None:
        """Cancel every job with `reason` and wait up to `timeout` seconds for the model thread to end."""
        self.turns.stop(reason)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def text(self, ids: list[int]) -> str:
        """The text of generated ids, before tidying (`KosmosRunner.text`)."""
        return str(self.runner.text(ids))  # type: ignore[attr-defined]

    def lane(self, name: str = "") -> LaneRunner:
        """A `Runner` for one job, whose requests take turns with every other job's."""
        return LaneRunner(self, Lane(name or f"job {next(self._count)}"))

    def _run(self) -> None:
        try:
            for request, outcome in self.runner.generate(self.turns):
                self.turns.answer(request, outcome)
        except BaseException as error:  # a bug or a dead device: every job hears of it, then /ready fails
            logger.exception("the model thread crashed")
            self.failure = error
            self.turns.stop(KosmosError(f"the model failed: {error!r}", hint="see the server's log"))


class LaneRunner:
    """One job's `Runner` over a `SharedModel`: its requests wait in its lane, its answers come back.

    `generate` runs in the job's thread, which also pulls the job's requests (rendering its pages), as
    `jobs.run_job` needs; it offers a request whenever its lane has fewer than `WINDOW` waiting.
    """

    def __init__(self, model: SharedModel, lane: Lane) -> None:
        self._model = model
        self.lane = lane
        self.max_new_tokens = model.runner.max_new_tokens

    def cancel(self, reason: KosmosError) -> None:
        """Cancel this job: its `generate` raises `reason`, its pages leave the batch."""
        self._model.turns.cancel(self.lane, reason)

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation | GenerationError]]:
        """Offer the job's requests to the shared batch as its lane has room; yield each answer.

        Raises the lane's reason (`JobCancelled`, `ServiceStopping`) once it is cancelled.
        """
        turns, lane = self._model.turns, self.lane
        pending = iter(requests)
        more, running = True, 0
        turns.open(lane)
        try:
            while True:
                while more and len(lane.waiting) < WINDOW:
                    request = next(pending, None)
                    if request is None:
                        more = False
                        break
                    turns.put(lane, request)
                    running += 1
                if not running:
                    break
                event = lane.events.get()
                if isinstance(event, KosmosError):
                    raise event
                if event is TAKEN:
                    continue
                assert isinstance(event, tuple)
                running -= 1
                yield event
        finally:
            turns.close(lane)
