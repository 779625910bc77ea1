"""`kosmos serve` over real HTTP on loopback: a server process with the tiny model, clients in threads."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from inputs import PdfPage, make_pdf, sample_image

from kosmos_cli.config import Settings
from kosmos_cli.model import Request
from kosmos_cli.server.run import jobs_folder
from kosmos_cli.server.service import ENDED_FILE, Limits, Service
from kosmos_cli.testing import ScriptedRunner, ServerProcess
from kosmos_cli.values import Generation, Task
from kosmos_cli.writers import WRITERS, formats_for

TOKENS = 12
ONE_AT_A_TIME = ("--batch-size", "1")  # pages finish one by one: a kill lands between two of them


@dataclass
class Server(ServerProcess):
    """A `kosmos serve` process of the tests', with its jobs folder and an HTTP client."""

    jobs: Path

    def client(self, **options: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **options)  # type: ignore[arg-type]

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def stopped_cleanly(self) -> bool:
        """Stop with SIGTERM: uvicorn shuts down, then ends by the signal, as a daemon should."""
        return self.stop() == -signal.SIGTERM


def start_server(checkpoint: Path, jobs: Path, *options: str, tokens: int = TOKENS) -> Server:
    """Start `kosmos serve` with the tiny model on a free port and return once its model is loaded."""
    log = jobs.parent / f"{jobs.name}-{time.monotonic_ns()}.log"
    arguments = ["--model", str(checkpoint), "--dtype", "float32", "--max-new-tokens", str(tokens)]
    started = ServerProcess.start([*arguments, "--jobs-dir", str(jobs), *options], log)
    return Server(started.process, started.url, started.log, jobs)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("serve")
    running = start_server(tiny_checkpoint, folder / "jobs", "--max-upload-mb", "1")
    yield running
    assert running.stopped_cleanly()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("files")
    sample_image(size=(200, 140)).save(folder / "page.png")
    for number in range(16):
        pages = [PdfPage(width=300, height=200, text=f"Client {number} page {n}") for n in (1, 2)]
        make_pdf(folder / f"client{number}.pdf", pages=pages)
    make_pdf(folder / "long.pdf", pages=[PdfPage(width=300, height=200, text=f"Page {n}") for n in range(10)])
    (folder / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj garbage")
    (folder / "notes.txt").write_text("not an image, not a PDF\n")
    (folder / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2 << 20))
    return folder


def post(client: httpx.Client, route: str, path: Path, **fields: str) -> httpx.Response:
    with path.open("rb") as stream:
        return client.post(route, files={"file": (path.name, stream)}, data=fields)


def wait_for(client: httpx.Client, job_id: str, done: int = 0, states: tuple[str, ...] = ("done",)) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = client.get(f"/v1/jobs/{job_id}").json()
        if state["state"] in states or (done and state["pages"]["done"] >= done):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stayed {state}")


def test_health_and_ready_answer_and_metrics_are_prometheus_text(server: Server) -> None:
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "key_required": False}
    assert httpx.get(server.url + "/ready").json()["status"] == "ready"
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("kosmos_http_requests_total", "kosmos_queue_depth", "kosmos_batch_pages", "kosmos_pages_total",
                 "kosmos_generated_tokens_total", "kosmos_page_seconds_bucket", "kosmos_first_page_seconds_bucket"):  # fmt: skip
        assert name in metrics.text


def test_a_page_comes_back_as_kosmos_ocr_prints_it(
    server: Server, files: Path, tiny_checkpoint: Path
) -> None:
    with server.client() as client:
        answer = post(client, "/v1/transcribe", files / "page.png", task="ocr")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    command = [
        sys.executable,
        "-m",
        "kosmos_cli",
        "ocr",
        str(files / "page.png"),
        "--model",
        str(tiny_checkpoint),
    ]
    command += ["--dtype", "float32", "--max-new-tokens", str(TOKENS), "-q"]
    printed = subprocess.run(command, capture_output=True, check=False)
    assert printed.returncode in (0, 1), printed.stderr
    assert answer.content == printed.stdout


@pytest.mark.parametrize("task", ["md", "ocr"])
def test_a_job_gives_every_format_of_its_task_with_its_media_type(
    server: Server, files: Path, task: str
) -> None:
    with server.client() as client:
        accepted = post(client, "/v1/jobs", files / "client0.pdf", task=task, text_layer="ignore")
        assert accepted.status_code == 202 and accepted.headers["location"] == accepted.json()["url"]
        job = wait_for(client, accepted.json()["id"])
        assert job["pages"] == {"total": 2, "done": 2, "failed": 0, "truncated": job["pages"]["truncated"]}
        for format_name in formats_for(Task(task)):
            answer = client.get(f"/v1/jobs/{job['id']}/result", params={"format": format_name})
            assert answer.status_code == 200, (format_name, answer.text)
            if format_name == "page":  # one file a page: a ZIP of both
                names = zipfile.ZipFile(io.BytesIO(answer.content)).namelist()
                assert answer.headers["content-type"] == "application/zip" and len(names) == 2
            else:
                assert answer.headers["content-type"].startswith(
                    WRITERS[format_name].media_type.split(";")[0]
                )
        assert client.get(f"/v1/jobs/{job['id']}/result", params={"format": "draw"}).status_code == 400
        lines = client.get(f"/v1/jobs/{job['id']}/pages").text.splitlines()
        assert sorted(json.loads(line)["page_number"] for line in lines) == [1, 2]
        assert client.get(f"/v1/jobs/{job['id']}/pages/2/image").headers["content-type"] == "image/png"


def test_sixteen_clients_at_once_each_get_their_document_decoding_together(
    server: Server, files: Path
) -> None:
    with server.client() as client:
        alone = post(
            client, "/v1/transcribe", files / "client3.pdf", task="md", format="json", text_layer="ignore"
        )
        assert alone.status_code == 200, alone.text
        together_before = (
            server.metric('kosmos_batch_jobs_bucket{le="1.0"}'),
            server.metric("kosmos_batch_jobs_count"),
        )

        def one(number: int) -> httpx.Response:
            with server.client() as own:
                return post(
                    own,
                    "/v1/transcribe",
                    files / f"client{number}.pdf",
                    task="md",
                    format="json",
                    text_layer="ignore",
                )

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(16)))
    assert [answer.status_code for answer in answers] == [200] * 16
    documents = [answer.json() for answer in answers]
    assert [document["source"] for document in documents] == [f"client{n}.pdf" for n in range(16)]
    assert all(len(document["pages"]) == 2 for document in documents)
    assert (
        len({page["raw"] for document in documents for page in document["pages"]}) > 16
    )  # each its own pages
    assert answers[3].content == alone.content  # in a batch of many clients, as alone
    alone_only, total = (
        server.metric('kosmos_batch_jobs_bucket{le="1.0"}'),
        server.metric("kosmos_batch_jobs_count"),
    )
    assert total - together_before[1] >= 32
    assert (total - together_before[1]) - (
        alone_only - together_before[0]
    ) > 0  # pages of several jobs at once


@pytest.mark.parametrize(
    ("name", "fields", "status", "message"),
    [
        ("big.png", {}, 413, "larger than the server takes"),
        ("notes.txt", {}, 415, "is not an image or PDF"),
        ("broken.pdf", {}, 400, "`broken.pdf` is truncated"),
        ("client0.pdf", {"pages": "5-"}, 400, "selects none of the document's 2"),
        ("client0.pdf", {"pages": "x"}, 400, "is not a page number"),
        ("client0.pdf", {"task": "summary"}, 400, "is not md or ocr"),
        ("client0.pdf", {"format": "alto"}, 400, "is not one of md's"),
        ("client0.pdf", {"text_layer": "only", "task": "md"}, 400, "only applies to kosmos ocr"),
    ],
)
def test_bad_uploads_get_a_json_error_and_the_server_serves_on(
    server: Server, files: Path, name: str, fields: dict[str, str], status: int, message: str
) -> None:
    with server.client() as client:
        answer = post(client, "/v1/transcribe", files / name, **fields)
        assert answer.status_code == status, answer.text
        assert message in answer.json()["error"]["message"]
        assert post(client, "/v1/transcribe", files / "page.png", task="ocr").status_code == 200


def test_a_body_trickling_in_does_not_hold_up_other_clients(server: Server, files: Path) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    slow = socket.create_connection((host, int(port)))
    try:
        body = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        slow.sendall(
            b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            + f"Content-Length: {len(body) + 100000}\r\n\r\n".encode()
            + body
        )
        with server.client() as client:  # were it held up, this would wait for the slow body, for ever
            assert post(client, "/v1/transcribe", files / "page.png", task="ocr").status_code == 200
        slow.sendall(b"\x00" * 10)  # still open, still trickling
    finally:
        slow.close()


def test_chat_completions_answer_as_openai_does(server: Server, files: Path) -> None:
    image = base64.b64encode((files / "page.png").read_bytes()).decode()
    with server.client() as client:
        assert [model["id"] for model in client.get("/v1/models").json()["data"]] == [
            "kosmos-2.5-md",
            "kosmos-2.5-ocr",
        ]
        message = {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}],
        }
        answer = client.post(
            "/v1/chat/completions", json={"model": "kosmos-2.5-ocr", "messages": [message]}
        ).json()
        assert answer["object"] == "chat.completion" and answer["model"] == "kosmos-2.5-ocr"
        ocr = post(client, "/v1/transcribe", files / "page.png", task="ocr").text
        content = answer["choices"][0]["message"]["content"]
        assert content and content in ocr  # the lines, without the file's truncation note
        assert answer["usage"]["completion_tokens"] == TOKENS
        asked = {"role": "user", "content": [{"type": "text", "text": "<md>"}, *message["content"]]}
        streamed = client.post("/v1/chat/completions", json={"messages": [asked], "stream": True})
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in streamed.text.split("\n\n") if line]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
        markdown = post(client, "/v1/transcribe", files / "page.png", task="md", format="json").json()
        assert text == markdown["pages"][0]["text"]
        remote = {
            "role": "user",
            "content": [
                {"type": "text", "text": "<md>"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        }
        refused = client.post("/v1/chat/completions", json={"messages": [remote]})
        assert refused.status_code == 400 and "remote URLs" in refused.json()["error"]["hint"]
        untold = client.post("/v1/chat/completions", json={"messages": [message]})
        assert untold.status_code == 400 and "<md>" in untold.json()["error"]["message"]


def test_deleting_a_running_job_takes_its_pages_out_of_the_batch(
    tiny_checkpoint: Path, files: Path, tmp_path: Path
) -> None:
    server = start_server(tiny_checkpoint, tmp_path / "jobs", tokens=400)
    try:
        with server.client() as client:
            job = post(client, "/v1/jobs", files / "long.pdf", task="md", text_layer="ignore").json()
            wait_for(client, job["id"], states=("running",))
            deadline = time.monotonic() + 60
            while server.metric("kosmos_batch_pages") == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            deleted = client.delete(f"/v1/jobs/{job['id']}")
            assert deleted.status_code == 200 and deleted.json()["state"] == "cancelled"
            assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
            assert not (server.jobs / job["id"]).exists()
            deadline = time.monotonic() + 20
            while server.metric("kosmos_batch_pages") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert server.metric("kosmos_batch_pages") == 0
            assert server.metric("kosmos_pages_total") < 10
    finally:
        assert server.stopped_cleanly()


def test_a_long_request_becomes_a_job_and_a_full_service_answers_429(
    tiny_checkpoint: Path, files: Path, tmp_path: Path
) -> None:
    server = start_server(tiny_checkpoint, tmp_path / "jobs", "--max-jobs", "1", "--wait", "0.3", tokens=200)
    try:
        with server.client() as client:
            first = post(client, "/v1/transcribe", files / "long.pdf", task="md", text_layer="ignore")
            assert first.status_code == 202 and first.headers["location"] == first.json()["url"]
            assert "still running after 0.3 s" in first.json()["message"]
            refused = post(client, "/v1/jobs", files / "page.png")
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
            client.delete(f"/v1/jobs/{first.json()['id']}")
            assert post(client, "/v1/jobs", files / "page.png").status_code == 202
    finally:
        assert server.stopped_cleanly()


def test_a_key_guards_every_v1_route(tiny_checkpoint: Path, files: Path, tmp_path: Path) -> None:
    server = start_server(tiny_checkpoint, tmp_path / "jobs", "--api-key", "s3cret")
    try:
        with server.client() as client:
            assert client.get("/health").json()["key_required"] is True
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                answer = client.get("/v1/models", headers=headers)
                assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
                assert post(client, "/v1/transcribe", files / "page.png").status_code == 401
            assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        assert server.stopped_cleanly()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--host", "0.0.0.0"], "error: --host 0.0.0.0 lets other machines in, and there is no key"),
        (["--host", "::", "--api-key", " "], "error: --api-key is empty"),
        (["--max-jobs", "0"], "error: --max-jobs must be 1 or more, not 0"),
        (["--wait", "-1"], "error: --wait must be a positive number, not -1"),
        (["--keep-hours", "inf"], "error: --keep-hours must be a positive number, not inf"),
        (["--device", "gpu7"], "error: `gpu7` is not a device"),
        (["--jobs-dir", "/proc/kosmos-jobs"], "error: cannot keep jobs in `/proc/kosmos-jobs`: "),
    ],
)
def test_serve_refuses_what_it_cannot_do_before_loading_anything(
    tiny_checkpoint: Path, options: list[str], message: str
) -> None:
    environment = {key: value for key, value in os.environ.items() if key != "KOSMOS_API_KEY"}
    refused = subprocess.run(
        [sys.executable, "-m", "kosmos_cli", "serve", "--model", str(tiny_checkpoint), *options],
        capture_output=True, text=True, timeout=60, check=False, env=environment,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines()[0].startswith(message)


def test_a_job_killed_with_the_server_finishes_after_a_restart_with_the_same_bytes(
    tiny_checkpoint: Path, files: Path, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs"
    server = start_server(tiny_checkpoint, jobs, *ONE_AT_A_TIME, tokens=150)
    with server.client() as client:
        job = post(client, "/v1/jobs", files / "long.pdf", task="ocr", text_layer="ignore").json()
        wait_for(client, job["id"], done=3)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    assert not (jobs / job["id"] / ENDED_FILE).exists()
    server = start_server(tiny_checkpoint, jobs, *ONE_AT_A_TIME, tokens=150)
    try:
        with server.client() as client:
            state = wait_for(client, job["id"])
            assert state["pages"]["done"] == 10
            resumed = client.get(f"/v1/jobs/{job['id']}/result", params={"format": "json"})
            again = post(
                client, "/v1/transcribe", files / "long.pdf", task="ocr", format="json", text_layer="ignore"
            )
            assert again.status_code == 200 and resumed.content == again.content
            lines = client.get(f"/v1/jobs/{job['id']}/pages").text.splitlines()
            assert len(lines) == 10
    finally:
        assert server.stopped_cleanly()


def test_sigterm_stops_taking_work_and_the_job_resumes_at_the_next_start(
    tiny_checkpoint: Path, files: Path, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs"
    server = start_server(tiny_checkpoint, jobs, *ONE_AT_A_TIME, tokens=150)
    with server.client() as client:
        job = post(client, "/v1/jobs", files / "long.pdf", task="md", text_layer="ignore").json()
        wait_for(client, job["id"], done=1)
    assert server.stopped_cleanly()  # within `stop`'s 60 s, or it raises
    assert not (jobs / job["id"] / ENDED_FILE).exists()
    server = start_server(tiny_checkpoint, jobs, *ONE_AT_A_TIME, tokens=150)
    try:
        with server.client() as client:
            assert wait_for(client, job["id"])["pages"]["done"] == 10
    finally:
        assert server.stopped_cleanly()


def test_results_expire_after_their_keep_time(tmp_path: Path, files: Path) -> None:
    service = Service(Settings(model="scripted"), jobs_folder(tmp_path / "jobs"), Limits(keep=60.0))
    service.start(lambda settings: ScriptedRunner())
    try:
        upload = tmp_path / "upload"
        upload.write_bytes((files / "page.png").read_bytes())
        job = service.accept(upload, "page.png", task="ocr", pages=None, text_layer="auto")
        deadline = time.monotonic() + 60
        while not job.finished and time.monotonic() < deadline:
            job.wait(0.1)
        assert job.state == "done" and service.render(job, "txt")[0]
        service.expire(time.time() + 30)
        assert service.job(job.id) is job
        service.expire(time.time() + 61)
        assert service.job(job.id) is None and not job.folder.exists()
    finally:
        service.stop(10)


def test_a_second_server_finds_no_job_it_cannot_read(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    (jobs / ("0" * 32)).mkdir(parents=True)
    (jobs / ("0" * 32) / "order.json").write_text("{not json")
    (jobs / "unrelated").mkdir()
    service = Service(Settings(model="scripted"), jobs, Limits())
    service.start(lambda settings: ScriptedRunner())
    try:
        assert service.unfinished() == 0
        assert not (jobs / ("0" * 32)).exists() and (jobs / "unrelated").exists()
    finally:
        service.stop(10)


@pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("jq") is None,
    reason="needs curl and jq (make debian-packages)",
)
def test_the_readme_examples_of_the_server_run_against_one(
    server: Server,
    files: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from test_readme import CONSOLE, EXAMPLES, SERVER

    address = server.url.removeprefix("http://")
    (tmp_path / "page.png").write_bytes((files / "page.png").read_bytes())
    (tmp_path / "scan.pdf").write_bytes((files / "client2.pdf").read_bytes())
    shell = [
        line[2:].split("  #")[0].strip()
        for block in CONSOLE
        if SERVER in block
        for line in block.splitlines()
    ]
    commands = [line.replace(SERVER, address) for line in shell if line and SERVER in line]
    assert len(commands) >= 3
    for command in commands:
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, capture_output=True, timeout=300, check=False
        )
        assert done.returncode == 0, (command, done.stderr.decode())
    assert json.loads((tmp_path / "scan.json").read_bytes())["source"] == "scan.pdf"
    monkeypatch.chdir(tmp_path)
    examples = [block.replace(SERVER, address) for block in EXAMPLES if SERVER in block]
    assert examples
    for number, code in enumerate(examples):
        exec(compile(code, f"README.md server example {number + 1}", "exec"), {})
    assert "application/xml" in capsys.readouterr().out


def test_serve_without_its_packages_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from kosmos_cli.errors import UsageError
    from kosmos_cli.server.run import missing_packages

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "uvicorn" else found(name))
    with pytest.raises(UsageError) as raised:
        missing_packages()
    assert raised.value.message == "kosmos serve needs uvicorn"
    assert raised.value.hint == "pip install 'kosmos-transcribe[serve]'"


class WritingRunner:
    """A runner that writes each page's markdown a line at a time, telling `Request.partial` as it goes,
    and holds after its first two lines until the test has seen them arrive."""

    max_new_tokens = 50
    LINES = ("# Title\n", "First line\n", "Second line\n", "Last line")

    def __init__(self) -> None:
        self.hold = threading.Event()

    def text(self, ids: list[int]) -> str:
        return "".join(self.LINES[i] for i in ids)

    def generate(self, requests: Iterable[Request]) -> Iterator[tuple[Request, Generation]]:
        for request in requests:
            ids: list[int] = []
            for number in range(len(self.LINES)):
                ids.append(number)
                assert request.partial is not None
                request.partial(ids)
                if number == 2:
                    self.hold.wait(30)
            yield request, Generation(self.text(ids), request.image.size, ids=tuple(ids))


def test_a_streamed_markdown_answer_sends_each_line_as_the_model_finishes_it(
    tmp_path: Path, files: Path
) -> None:
    import uvicorn

    from kosmos_cli.server.app import Options, create_app
    from kosmos_cli.server.metrics import Metrics

    runner = WritingRunner()
    metrics = Metrics()
    service = Service(Settings(model="writing"), jobs_folder(tmp_path / "jobs"), Limits(), metrics)
    app = create_app(service, metrics, Options(), lambda settings: runner)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not (server.started and service.ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        image = base64.b64encode((files / "page.png").read_bytes()).decode()
        message = {
            "role": "user",
            "content": [
                {"type": "text", "text": "<md>"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            ],
        }
        pieces: list[str] = []
        with (
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
            client.stream(
                "POST", "/v1/chat/completions", json={"messages": [message], "stream": True}
            ) as answer,
        ):
            for line in answer.iter_lines():
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
                if delta.get("content"):
                    pieces.append(delta["content"])
                    runner.hold.set()  # the first lines came while the model was still writing
        assert pieces[0] == "# Title\nFirst line\nSecond line"  # written before the model went on
        assert "".join(pieces) == "# Title\nFirst line\nSecond line\nLast line"
        assert len(pieces) >= 2
    finally:
        runner.hold.set()
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize(
    ("raw", "settled"),
    [
        ("", ""),
        ("# Tit", ""),  # a line being written is held back
        ("# Title\nFirst", "# Title"),
        ("# Title\n\n\n\nFirst line\n", "# Title\n\nFirst line"),  # blank runs collapse, as in the page
        ("a<br>b\nc", "a\nb"),  # <br> is a line break once its line is finished
        ("  indented  \nnext", "indented"),
    ],
)
def test_only_finished_markdown_lines_are_streamed(raw: str, settled: str) -> None:
    from kosmos_cli.server.chat import settled_markdown

    assert settled_markdown(raw) == settled


def test_openai_s_own_client_talks_to_it(server: Server, files: Path) -> None:
    """The official client, as a program built for a vLLM-served OCR model would use it."""
    from openai import OpenAI

    image = base64.b64encode((files / "page.png").read_bytes()).decode()
    content = [
        {"type": "text", "text": "<md>"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
    ]
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == ["kosmos-2.5-md", "kosmos-2.5-ocr"]
    answer = client.chat.completions.create(
        model="kosmos-2.5-md", messages=[{"role": "user", "content": content}]
    )
    text = answer.choices[0].message.content
    assert text and answer.usage is not None and answer.usage.completion_tokens == TOKENS
    stream = client.chat.completions.create(
        model="kosmos-2.5-md", messages=[{"role": "user", "content": content}], stream=True
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream]
    assert "".join(pieces) == text


def test_a_model_that_cannot_load_stops_the_server_with_its_error(model_folder: Path, tmp_path: Path) -> None:
    ended = subprocess.run(
        [sys.executable, "-m", "kosmos_cli", "serve", "--model", str(model_folder), "--port", "0",
         "--jobs-dir", str(tmp_path / "jobs")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert ended.returncode == 3, ended.stderr
    errors = [line for line in ended.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(model_folder) in errors[0]
