"""What `GET /metrics` shows, in Prometheus' text format (prometheus-client, a registry of its own)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PrometheusCounter

from kosmos_cli.server.service import Counter, ServedJob
from kosmos_cli.values import PageResult, Status

SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
JOBS = (1, 2, 3, 4, 8, 16, 32, 64)


class Metrics(Counter):
    """The service's counters and histograms; the service and its model thread tell it what happens."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = PrometheusCounter(
            "kosmos_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=registry,
        )
        self.queue_depth = Gauge("kosmos_queue_depth", "Pages waiting to join the batch", registry=registry)
        self.jobs_unfinished = Gauge("kosmos_jobs_unfinished", "Jobs queued or running", registry=registry)
        self.batch_pages = Gauge(
            "kosmos_batch_pages", "Pages (or tiles) decoding in the batch", registry=registry
        )
        self.batch_jobs = Histogram(
            "kosmos_batch_jobs",
            "Jobs with a page in the batch, each time a page joins it",
            buckets=JOBS,
            registry=registry,
        )
        self.pages = PrometheusCounter(
            "kosmos_pages", "Pages finished, by status", ["status"], registry=registry
        )
        self.tokens = PrometheusCounter(
            "kosmos_generated_tokens", "Tokens the model generated", registry=registry
        )
        self.page_seconds = Histogram(
            "kosmos_page_seconds",
            "Seconds a page (or tile) spends in the batch",
            buckets=SECONDS,
            registry=registry,
        )
        self.first_page_seconds = Histogram(
            "kosmos_first_page_seconds",
            "Seconds from a job's acceptance to its first finished page",
            buckets=SECONDS,
            registry=registry,
        )
        self.jobs = PrometheusCounter("kosmos_jobs", "Jobs ended, by state", ["state"], registry=registry)
        for status in ("done", "failed", "truncated"):
            self.pages.labels(status)

    def watch(self, waiting: Callable[[], int], unfinished: Callable[[], int]) -> None:
        """Read the queue's depth and the unfinished jobs when scraped."""
        self.queue_depth.set_function(waiting)
        self.jobs_unfinished.set_function(unfinished)

    def text(self) -> bytes:
        """Everything, in Prometheus' text format."""
        return generate_latest(self.registry)

    def taken(self, lanes_running: int) -> None:
        """A page joined the batch."""
        self.batch_pages.inc()
        self.batch_jobs.observe(lanes_running)

    def finished(self, seconds: float) -> None:
        """A page left the batch."""
        self.batch_pages.dec()
        self.page_seconds.observe(seconds)

    def page_done(self, job: ServedJob, result: PageResult, first: bool) -> None:
        """A job's page finished (or was read back from its progress log)."""
        if result.status is Status.FAILED:
            self.pages.labels("failed").inc()
        else:
            self.pages.labels("done").inc()
            if result.status is Status.TRUNCATED:
                self.pages.labels("truncated").inc()
        self.tokens.inc(result.token_count or 0)
        if first and job.first_page_seconds is not None:
            self.first_page_seconds.observe(job.first_page_seconds)

    def job_ended(self, job: ServedJob) -> None:
        """A job ended."""
        self.jobs.labels(job.state).inc()
