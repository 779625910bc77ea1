"""The HTTP routes of `kosmos serve` (FastAPI), over a `service.Service`.

Every `/v1/` route needs `Authorization: Bearer KEY` when the server has a key (compared in constant
time); `/health`, `/ready`, `/metrics` and the page at `/` do not. Every error is JSON:
`{"error": {"message": ..., "hint": ..., "type": ...}}` with its status (400, 401, 404, 409, 413, 415,
429 with Retry-After, 503). A body past `max_upload` bytes is cut off with 413 as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kosmos_cli.config import DEFAULT_FORMATS
from kosmos_cli.errors import InputError, KosmosError, UsageError
from kosmos_cli.server import chat
from kosmos_cli.server.metrics import Metrics
from kosmos_cli.server.service import Busy, ServedJob, Service, Unsupported, check_format
from kosmos_cli.values import Status, Task
from kosmos_cli.writers import DocumentWriter, WriterOptions, get_writer
from kosmos_cli.writers.text import format_ocr_lines

RETRY_SECONDS = 10  # Retry-After of a 429: about how long a page takes on a busy service
POLL_SECONDS = 0.05  # how often a waiting request looks at its job
STREAM_SECONDS = 0.2  # how often a streamed chat answer looks for new lines
STOP_SECONDS = 30.0  # how long stopping waits for the model thread to end
ERROR_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "busy",
    503: "unavailable",
}


@dataclass(frozen=True)
class Options:
    """How the HTTP side behaves."""

    api_key: str | None = None
    max_upload: int = 100 << 20  # bytes of one request's body
    wait: float = 60.0  # seconds POST /v1/transcribe holds the connection before answering 202


class ApiError(Exception):
    """An answer other than success: its status, message, hint and headers."""

    def __init__(
        self, status: int, message: str, hint: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.hint, self.headers = status, message, hint, headers or {}


def create_app(service: Service, metrics: Metrics, options: Options, load: Callable[..., Any]) -> FastAPI:
    """The application: the service starts (loading the model) in the background when it starts up."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=_start, args=(service, load), name="kosmos-load", daemon=True).start()
        yield
        await run_in_threadpool(service.stop, STOP_SECONDS)

    app = FastAPI(title="kosmos", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    metrics.watch(lambda: service.model.turns.waiting() if service.model else 0, service.unfinished)
    keyed = [Depends(_key_check(options.api_key))]

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return _error(error.status, error.message, error.hint, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), headers=dict(error.headers or {}))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "key_required": options.api_key is not None}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ready", "model": service.settings.model})
        failure = service.failure or (service.model and service.model.failure)
        state = "stopping" if service.stopping else "failed" if failure else "loading"
        return JSONResponse({"status": state, "error": str(failure) if failure else None}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("kosmos_cli.server").joinpath("page.html").read_text("utf-8"))

    @app.post("/v1/transcribe", dependencies=keyed)
    async def transcribe(
        file: Annotated[UploadFile, File()],
        task: Annotated[str, Form()] = "md",
        format: Annotated[str | None, Form()] = None,
        pages: Annotated[str | None, Form()] = None,
        text_layer: Annotated[str, Form()] = "auto",
    ) -> Response:
        format_name = format or _default_format(task)
        _check_format(task, format_name)
        job = await _accept(service, file, task=task, pages=pages, text_layer=text_layer)
        if not await _wait(service, job, options.wait):
            return _accepted(job, f"still running after {options.wait:g} s: follow the job's url")
        try:
            return await _result(service, job, format_name)
        finally:
            await run_in_threadpool(service.delete, job)

    @app.post("/v1/jobs", dependencies=keyed, status_code=202)
    async def new_job(
        file: Annotated[UploadFile, File()],
        task: Annotated[str, Form()] = "md",
        pages: Annotated[str | None, Form()] = None,
        text_layer: Annotated[str, Form()] = "auto",
    ) -> JSONResponse:
        return _accepted(await _accept(service, file, task=task, pages=pages, text_layer=text_layer))

    @app.get("/v1/jobs/{job_id}", dependencies=keyed)
    async def job_state(job_id: str) -> dict[str, Any]:
        job = _job(service, job_id)
        return {**job.describe(), **_links(job)}

    @app.get("/v1/jobs/{job_id}/result", dependencies=keyed)
    async def job_result(job_id: str, format: str | None = None) -> Response:
        job = _job(service, job_id)
        format_name = format or _default_format(job.order.task)
        _check_format(job.order.task, format_name)
        if job.state != "done":
            message = f"the job is {job.state}" + (f": {job.errors[0]}" if job.errors else "")
            raise ApiError(409, message, hint="GET the job for its state; results come once it is done")
        return await _result(service, job, format_name)

    @app.get("/v1/jobs/{job_id}/pages", dependencies=keyed)
    async def job_pages(job_id: str) -> StreamingResponse:
        job = _job(service, job_id)
        writer = get_writer("jsonl", task=job.task, options=WriterOptions(model=service.settings.model))
        assert isinstance(writer, DocumentWriter)

        async def lines() -> AsyncIterator[bytes]:
            sent = 0
            while True:
                results, last = job.finished_pages(sent)
                for result in results:
                    yield writer.stream_page(result)
                sent += len(results)
                if last or service.stopping:
                    return
                await asyncio.sleep(POLL_SECONDS)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/v1/jobs/{job_id}/pages/{number}/image", dependencies=keyed)
    async def page_image(job_id: str, number: int) -> Response:
        job = _job(service, job_id)
        if number - 1 not in job.results:
            raise ApiError(404, f"page {number} of the job has no result yet")
        try:
            png = await run_in_threadpool(service.page_image, job, number - 1)
        except InputError as error:
            raise ApiError(400, error.message, error.hint) from None
        return Response(png, media_type="image/png")

    @app.delete("/v1/jobs/{job_id}", dependencies=keyed)
    async def delete_job(job_id: str) -> dict[str, Any]:
        job = _job(service, job_id)
        await run_in_threadpool(service.delete, job)
        return {"id": job.id, "state": job.state, "deleted": True}

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict[str, Any]:
        return chat.models()

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completion(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        try:
            asked = chat.parse_request(body)
        except UsageError as error:
            raise ApiError(400, error.message, error.hint) from None
        _check_ready(service)
        upload = await run_in_threadpool(service.spool, asked.image)
        job = await _start_job(
            service, upload, chat.UPLOAD_NAME, task=asked.task.value, pages="1", follow=asked.task is Task.MD
        )
        if asked.stream:
            return StreamingResponse(_chat_stream(service, job, asked), media_type="text/event-stream")
        try:
            await _wait(service, job, None)
            text, tokens, truncated = _chat_answer(service, job)
        finally:
            await run_in_threadpool(service.delete, job)
        answer_id = f"chatcmpl-{secrets.token_hex(12)}"
        return JSONResponse(chat.completion(answer_id, asked, text, tokens, truncated))

    app.add_middleware(_BodyLimit, limit=options.max_upload)
    app.add_middleware(_Counted, metrics=metrics)  # outermost: counts the 413s too
    return app


async def _chat_stream(service: Service, job: ServedJob, asked: chat.ChatRequest) -> AsyncIterator[bytes]:
    """A chat answer as server-sent events: markdown's finished lines as the model writes them, the rest
    (OCR text, or what is left) once the page is done; the job is removed at the end, or when the
    client goes away."""
    answer_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    sent = ""
    try:
        yield chat.chunk(answer_id, asked, created, {"role": "assistant", "content": ""})
        while not job.finished and not service.stopping and job.state != "interrupted":
            tokens = job.tokens()
            if tokens and service.model is not None:
                settled = chat.settled_markdown(await run_in_threadpool(service.model.text, tokens))
                if settled.startswith(sent) and len(settled) > len(sent):
                    yield chat.chunk(answer_id, asked, created, {"content": settled[len(sent) :]})
                    sent = settled
            await asyncio.sleep(STREAM_SECONDS)
        try:
            text, _, truncated = _chat_answer(service, job)
        except ApiError as error:
            yield chat.event_bytes(
                {
                    "error": {
                        "message": error.message,
                        "hint": error.hint,
                        "type": ERROR_TYPES.get(error.status, "server_error"),
                    }
                }
            )
            yield chat.event_bytes("[DONE]")
            return
        rest = text[len(sent) :] if text.startswith(sent) else ""
        for line in rest.splitlines(keepends=True):
            yield chat.chunk(answer_id, asked, created, {"content": line})
        yield chat.chunk(answer_id, asked, created, {}, "length" if truncated else "stop")
        yield chat.event_bytes("[DONE]")
    finally:
        await run_in_threadpool(service.delete, job)


def _chat_answer(service: Service, job: ServedJob) -> tuple[str, int, bool]:
    """A chat job's answer once it ended: the page's text, its token count, whether it was cut."""
    if job.state != "done":
        status = 503 if service.stopping or job.state == "interrupted" else 400
        raise ApiError(status, f"the page was not transcribed: {job.state}", _first(job.errors))
    (result,) = job.results.values()
    if result.status is Status.FAILED:
        raise ApiError(400, f"the page was not transcribed: {result.error}", result.hint)
    text = result.text if result.task is Task.MD else format_ocr_lines(result.lines)
    return text, result.token_count or 0, result.status is Status.TRUNCATED


def _start(service: Service, load: Callable[..., Any]) -> None:
    """Load the model and start the service (in a thread: /health answers meanwhile)."""
    try:
        service.start(load)
    except Exception as error:  # /ready says why
        service.failure = error


def _key_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "a valid API key is needed",
                "send `Authorization: Bearer KEY`",
                {"WWW-Authenticate": "Bearer"},
            )

    return check


def _error(
    status: int, message: str, hint: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error")
    body = {"error": {"message": message, "hint": hint, "type": kind}}
    return JSONResponse(body, status_code=status, headers=headers)


def _default_format(task: str) -> str:
    return DEFAULT_FORMATS[Task(task)] if task in (Task.MD.value, Task.OCR.value) else "md"


def _check_format(task: str, format_name: str) -> None:
    try:
        check_format(task, format_name)
    except UsageError as error:
        raise ApiError(400, error.message, error.hint) from None


def _job(service: Service, job_id: str) -> ServedJob:
    job = service.job(job_id)
    if job is None:
        raise ApiError(
            404, f"no job `{job_id[:64]}`", "it never existed, was deleted, or its results expired"
        )
    return job


def _links(job: ServedJob) -> dict[str, str]:
    url = f"/v1/jobs/{job.id}"
    return {"url": url, "result_url": f"{url}/result", "pages_url": f"{url}/pages"}


def _accepted(job: ServedJob, message: str | None = None) -> JSONResponse:
    body = {**job.describe(), **_links(job), **({"message": message} if message else {})}
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


def _first(errors: list[str]) -> str | None:
    return errors[0] if errors else None


async def _accept(
    service: Service, file: UploadFile, *, task: str, pages: str | None, text_layer: str
) -> ServedJob:
    """Spool an upload beside the jobs and hand it to the service."""
    _check_ready(service)
    upload = await run_in_threadpool(service.spool, file.file)
    return await _start_job(
        service, upload, file.filename or "upload", task=task, pages=pages, text_layer=text_layer
    )


def _check_ready(service: Service) -> None:
    if not service.ready:
        raise ApiError(
            503, "the model is not ready", "GET /ready says when it is", {"Retry-After": str(RETRY_SECONDS)}
        )


async def _start_job(
    service: Service,
    upload: Path,
    name: str,
    *,
    task: str,
    pages: str | None,
    text_layer: str = "auto",
    follow: bool = False,
) -> ServedJob:
    try:
        _check_ready(service)
        return await run_in_threadpool(
            service.accept, upload, name, task=task, pages=pages, text_layer=text_layer, follow=follow
        )
    except Busy as error:
        raise ApiError(429, error.message, "retry later", {"Retry-After": str(RETRY_SECONDS)}) from None
    except Unsupported as error:
        raise ApiError(415, error.message, error.hint) from None
    except KosmosError as error:  # UsageError, InputError: the request's fault
        raise ApiError(400, error.message, error.hint) from None
    finally:
        upload.unlink(missing_ok=True)


async def _wait(service: Service, job: ServedJob, limit: float | None) -> bool:
    """Wait for a job to end, up to `limit` seconds (None: for ever); whether it ended."""
    loop = asyncio.get_running_loop()
    deadline = None if limit is None else loop.time() + limit
    while not job.finished:
        if (
            service.stopping
            or job.state == "interrupted"
            or (deadline is not None and loop.time() >= deadline)
        ):
            return False
        await asyncio.sleep(POLL_SECONDS)
    return True


async def _result(service: Service, job: ServedJob, format_name: str) -> Response:
    if job.state != "done":
        raise ApiError(400, f"the document was not transcribed: {_first(job.errors) or job.state}")
    try:
        data, media_type, name = await run_in_threadpool(service.render, job, format_name)
    except KosmosError as error:
        raise ApiError(400, error.message, error.hint) from None
    disposition = f"inline; filename*=UTF-8''{_quote(name)}"
    return Response(
        data, media_type=media_type, headers={"Content-Disposition": disposition, "X-Kosmos-Job": job.id}
    )


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


class _BodyLimit:
    """Answer 413 to a body larger than `limit` bytes: at once when its Content-Length says so, else as
    soon as that many bytes have arrived."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _error(413, self._message())(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"the upload is larger than the server takes ({self.limit / (1 << 20):g} MiB, --max-upload-mb)"


class _Counted:
    """Count every request by its route's pattern and its status (`kosmos_http_requests_total`)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "other"), str(status)).inc()
