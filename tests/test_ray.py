"""The Ray path (`kosmos ... --ray`) against the single-machine path: same bytes, same failures, resumable.

Everything runs on one local Ray instance with 2 CPUs, started once for the module, and the tiny
random checkpoint on CPU actors. Both paths go through the front door, `transcribe_files`, the
Ray runs with `ray=RayOptions(...)`. `make test-ray` runs these; the default `make test` does not.
Object-store inputs and outputs go to moto's S3 server on 127.0.0.1 (`test_outputs.S3Server`).
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from inputs import MIXED_PAGES, PdfPage, make_corrupt, make_image, make_pdf
from ray_crash import CRASH_DIR_ENV
from recorder import Recorder, counts, tree
from test_outputs import S3Server, run_s3_server

from kosmos_cli.api import transcribe_files
from kosmos_cli.assembly import Assembly, Outputs
from kosmos_cli.config import Job, RayOptions, Settings
from kosmos_cli.discovery import discover, discover_uris
from kosmos_cli.distributed import INSTALL_HINT, WorkerPlan, plan_workers, require_ray
from kosmos_cli.errors import ModelLoadError, UsageError
from kosmos_cli.jobs import job_fingerprint
from kosmos_cli.manifest import progress_name
from kosmos_cli.reporting import Summary
from kosmos_cli.values import Document, Line, PageInfo, PageResult, Task

FORMATS = {Task.MD: ("md", "json", "jsonl"), Task.OCR: ("txt", "json", "jsonl", "hocr", "pdf")}
PAGES = 5  # readable pages in the corpus
BROKEN = "broken.png"


# --- without a cluster ------------------------------------------------------------------------------


def test_without_ray_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets when Ray is not installed
    with pytest.raises(UsageError) as caught:
        require_ray()
    assert caught.value.message == "--ray needs Ray, which is not installed"
    assert caught.value.hint == INSTALL_HINT == "pip install 'kosmos-transcribe[ray]'"
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("resources", "device", "workers", "gpus_per_worker", "expected"),
    [
        ({"CPU": 16, "GPU": 4}, "auto", None, 1.0, WorkerPlan(4, False, 1.0, None, "cuda")),
        ({"CPU": 16, "GPU": 4}, "auto", None, 0.5, WorkerPlan(8, False, 0.5, None, "cuda")),
        ({"CPU": 16, "GPU": 4}, "cuda:3", 2, 1.0, WorkerPlan(2, True, 1.0, None, "cuda")),
        ({"CPU": 16, "GPU": 3}, "auto", None, 2.0, WorkerPlan(1, False, 2.0, None, "cuda")),
        ({"CPU": 16, "GPU": 4}, "cpu", None, 1.0, WorkerPlan(8, False, 0.0, 1.0, "cpu")),
        ({"CPU": 16, "GPU": 4}, "auto", None, 0.0, WorkerPlan(8, False, 0.0, 1.0, "cpu")),
        ({"CPU": 16}, "auto", None, 1.0, WorkerPlan(8, False, 0.0, 1.0, "cpu")),
        ({"CPU": 2}, "auto", 3, 1.0, WorkerPlan(3, True, 0.0, 1.0, "cpu")),
        ({"CPU": 1}, "auto", None, 1.0, WorkerPlan(1, False, 0.0, 1.0, "cpu")),
    ],
)
def test_plan_workers(
    resources: dict[str, float],
    device: str,
    workers: int | None,
    gpus_per_worker: float,
    expected: WorkerPlan,
) -> None:
    options = RayOptions(workers=workers, gpus_per_worker=gpus_per_worker)
    assert plan_workers(resources, Settings(device=device), options) == expected


@pytest.mark.parametrize(
    ("resources", "device", "workers", "gpus_per_worker", "message"),
    [
        ({"CPU": 8}, "cuda", None, 1.0, "--device cuda asks for GPUs, but the Ray cluster has none"),
        ({"CPU": 8, "GPU": 2}, "auto", None, 4.0, "--gpus-per-worker 4 is more than the cluster's 2 GPUs"),
    ],
)
def test_plan_workers_refuses(
    resources: dict[str, float], device: str, workers: int | None, gpus_per_worker: float, message: str
) -> None:
    options = RayOptions(workers=workers, gpus_per_worker=gpus_per_worker)
    with pytest.raises(UsageError) as caught:
        plan_workers(resources, Settings(device=device), options)
    assert caught.value.message == message


def test_discover_uris_names_documents_as_sources_does(corpus: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(corpus, folder)
    (folder / "notes.txt").write_text("not a document\n")
    (folder / ".hidden.png").write_bytes((folder / "a.png").read_bytes())
    local = discover([str(folder)])
    remote = discover_uris([f"file://{folder}", f"file://{folder}/b.pdf", f"file://{tmp_path}/missing"])
    assert [d.name for d in remote.documents] == [d.name for d in local.documents]  # b.pdf read once
    assert [d.path for d in remote.documents] == [f"file://{d.path}" for d in local.documents]
    assert [d.name for d in discover_uris([f"file://{folder}/sub/c.pdf"]).documents] == ["c.pdf"]
    assert remote.unsupported == [f"file://{folder}/notes.txt"]
    assert [e.message for e in remote.errors] == [f"`file://{tmp_path}/missing` does not exist"]


def test_discover_takes_paths_or_uris_not_both(corpus: Path) -> None:
    assert discover([corpus.name], uris=True) == discover([corpus.name])
    assert discover([f"file://{corpus}"], uris=True) == discover_uris([f"file://{corpus}"])
    with pytest.raises(UsageError) as caught:
        discover([corpus.name, f"file://{corpus}"], uris=True)
    assert caught.value.message.startswith("inputs must be all local paths or all URIs")
    with pytest.raises(UsageError) as caught:
        discover([f"file://{corpus}"])
    assert caught.value.message == f"`file://{corpus}` is an object-store URI, which only --ray reads"


def test_driver_writes_each_document_once_whatever_order_and_repeats_rows_come_in(tmp_path: Path) -> None:
    from kosmos_cli.distributed import _LISTED, _RESULT, _collect, _row

    documents = [
        Document(str(make_pdf(tmp_path / "in/a.pdf")), "a"),
        Document(str(make_image(tmp_path / "in/b.png")), "b"),
    ]

    def result(number: int, page_index: int, count: int) -> dict[str, object]:
        info = PageInfo(documents[number], page_index, count, 10, 10)
        payload = (PageResult(info, Task.MD, f"page {page_index + 1}").to_dict(), {})
        return _row(number, _RESULT, page_index, payload)

    rows = [
        result(0, 1, 2),  # before its document is listed
        _row(0, _LISTED, -1, [0, 1]),
        result(0, 1, 2),  # redone by a restarted worker
        _row(1, _LISTED, -1, [0]),
        _row(0, _LISTED, -1, [0, 1]),  # a listing task that ran twice
        result(1, 0, 1),
        result(0, 0, 2),
        result(0, 0, 2),
    ]
    job = Job(task=Task.MD, formats=("md",), output_dir=tmp_path / "out")
    summary, recorder = Summary(), Recorder()
    with Outputs(job, io.BytesIO()) as outputs:
        assembly = Assembly(documents, outputs, recorder, summary)
        for document in documents:
            assembly.start(document)

        _collect(rows, documents, assembly, recorder)

    assert tree(tmp_path / "out") == {
        "a.md": b"<!-- kosmos: page 1 -->\n\npage 1\n\n<!-- kosmos: page 2 -->\n\npage 2\n",
        "b.md": b"page 1\n",
    }
    assert counts(summary) == (2, 0, 0, 3, 0, 0)
    assert recorder.total == 3


def test_driver_writes_the_searchable_pdf_when_the_document_bytes_come_last(tmp_path: Path) -> None:
    from kosmos_cli.distributed import _LISTED, _RESULT, _SOURCE, _collect, _row

    pdf = make_pdf(tmp_path / "in/a.pdf", pages=[PdfPage(text="Hello")])
    (document,) = discover([str(tmp_path / "in")]).documents  # named `a.pdf`, below the folder
    info = PageInfo(document, 0, 1, 612, 792, 72.0, (1.0, 0.0, 0.0, -1.0, 0.0, 792.0))
    line = Line("Hello", ((72, 80), (200, 80), (200, 110), (72, 110)))
    result = PageResult(info, Task.OCR, "Hello", lines=(line,))
    rows = [
        _row(0, _LISTED, -1, [0]),
        _row(0, _RESULT, 0, (result.to_dict(), {})),
        _row(0, _SOURCE, -1, pdf.read_bytes()),  # after the last page: the document is written now
        _row(0, _SOURCE, -1, pdf.read_bytes()),  # a listing task that ran twice
    ]
    job = Job(task=Task.OCR, formats=("txt", "pdf"), output_dir=tmp_path / "out")
    summary, recorder = Summary(), Recorder()
    with Outputs(job, io.BytesIO()) as outputs:
        assembly = Assembly([document], outputs, recorder, summary)
        assembly.start(document)
        _collect(rows, [document], assembly, recorder)

    written = tree(tmp_path / "out")
    assert sorted(written) == ["a.pdf.pdf", "a.pdf.txt"]
    assert counts(summary) == (1, 0, 0, 1, 0, 0) and recorder.errors == []


def test_outputs_over_inputs_are_refused_before_ray_starts(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kosmos_cli.distributed

    def no_ray(address: str | None, **options: object) -> bool:
        raise AssertionError("Ray was started for nothing")

    monkeypatch.setattr(kosmos_cli.distributed, "_connect", no_ray)
    folder = tmp_path / "in"
    folder.mkdir()
    monkeypatch.chdir(folder)  # the files below are named by their paths from here: their file names
    make_image(folder / "scan.png")  # its searchable PDF would be scan.png.pdf, another input
    make_pdf(folder / "scan.png.pdf")
    (folder / "scan.png.pdf.txt").write_text("notes\n")  # the other input's txt, not kosmos's: refused too
    recorder = Recorder()

    summary = transcribe_files(
        [str(folder / "scan.png"), str(folder / "scan.png.pdf")],
        task=Task.OCR,
        formats=("txt", "pdf"),
        output=folder,
        settings=settings,
        ray=RayOptions(),
        reporter=recorder,
    )

    assert recorder.errors == [
        f"`{folder}/scan.png.pdf` would overwrite the input `{folder}/scan.png.pdf`\nhint: choose another -o",
        f"`{folder}/scan.png.pdf.txt` exists and kosmos did not write it; `{folder}/scan.png.pdf` is not "
        "transcribed\nhint: choose another -o, or pass --overwrite to replace it",
    ]
    assert counts(summary) == (0, 0, 2, 0, 0, 0)
    assert sorted(p.name for p in folder.iterdir()) == [
        ".kosmos",
        "scan.png",
        "scan.png.pdf",
        "scan.png.pdf.txt",
    ]


# --- on a local Ray instance ------------------------------------------------------------------------


@dataclass
class Run:
    summary: Summary
    recorder: Recorder
    stdout: bytes
    output_dir: Path | None


@pytest.fixture(scope="module")
def crash_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a test arms `ray_crash` to lose one model actor."""
    return tmp_path_factory.mktemp("ray-crash")


@pytest.fixture(scope="module")
def ray_instance(crash_folder: Path) -> Iterator[None]:
    """Start one local Ray instance for the module: 2 CPUs, no GPU, quiet, `ray_crash` in every worker."""
    ray = pytest.importorskip("ray")
    tests = str(Path(__file__).parent)
    path = os.pathsep.join([tests, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        runtime_env={
            "worker_process_setup_hook": "ray_crash.install",
            "env_vars": {"PYTHONPATH": path, CRASH_DIR_ENV: str(crash_folder)},
        },
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """Run moto's S3 server on 127.0.0.1 for the module."""
    yield from run_s3_server()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of an image, two multi-page PDFs (one scanned) in a subfolder tree, and a broken file."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "sub").mkdir()
    make_image(folder / "a.png")
    make_pdf(folder / "b.pdf", pages=MIXED_PAGES[:2])
    make_pdf(folder / "sub" / "c.pdf", pages=(PdfPage(rotate=90, text="Rotated"), PdfPage(scan=True)))
    make_corrupt(folder / BROKEN)
    return folder


@pytest.fixture(scope="module", autouse=True)
def beside_corpus(corpus: Path) -> Iterator[None]:
    """Work from the corpus's parent folder, so inputs are named by relative paths as users type them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(corpus.parent)
        yield


@pytest.fixture(scope="module")
def settings(tiny_checkpoint: Path) -> Settings:
    # One page per generate call on both paths, so batching cannot change a float and a token; float32
    # so that the bytes compare. (A Ray run records `auto` as its workers resolve it: below.)
    return Settings(
        model=str(tiny_checkpoint), device="cpu", dtype="float32", attn="sdpa", batch_size=1, max_new_tokens=6
    )


def job_options(
    task: Task, output: Path | str | None, *, formats: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """The options of a run over the corpus: every format of the task, and --draw into a folder."""
    return {
        "task": task,
        "formats": formats or FORMATS[task],
        "output": output,
        "draw": task is Task.OCR and output is not None,
    }


def run(
    inputs: list[str], options: dict[str, Any], settings: Settings, *, ray: RayOptions | None = None
) -> Run:
    """Transcribe as the CLI does, on one machine or on Ray."""
    recorder, stdout = Recorder(), io.BytesIO()
    summary = transcribe_files(
        inputs, **options, settings=settings, ray=ray, reporter=recorder, stdout=stdout
    )
    output = options["output"]
    return Run(summary, recorder, stdout.getvalue(), Path(output) if isinstance(output, Path) else None)


def run_single(corpus: Path, options: dict[str, Any], settings: Settings) -> Run:
    """Run on one machine, on the corpus named as a relative path."""
    return run([corpus.name], options, settings)


def run_ray(corpus: Path, options: dict[str, Any], settings: Settings) -> Run:
    """Run with --ray --workers 1, on the corpus named as a relative path."""
    return run([corpus.name], options, settings, ray=RayOptions(workers=1))


class References:
    """Single-machine runs, each done once for the module when a test first needs it."""

    def __init__(self, corpus: Path, settings: Settings, folders: pytest.TempPathFactory) -> None:
        self.corpus = corpus
        self.settings = settings
        self.folders = folders
        self.runs: dict[tuple[Task, bool], Run] = {}

    def get(self, task: Task, *, to_folder: bool = True) -> Run:
        key = (task, to_folder)
        if key not in self.runs:
            output_dir = self.folders.mktemp(f"single-{task.value}") if to_folder else None
            formats = None if to_folder else (FORMATS[task][0],)
            self.runs[key] = run_single(
                self.corpus, job_options(task, output_dir, formats=formats), self.settings
            )
        return self.runs[key]


@pytest.fixture(scope="module")
def references(corpus: Path, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(corpus, settings, tmp_path_factory)


class TestOnRay:
    pytestmark = [  # noqa: RUF012 - pytest reads it as is
        pytest.mark.ray,
        pytest.mark.usefixtures("ray_instance"),
        # Ray Data's context warns about its own deprecated settings whenever it is copied.
        pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
    ]

    @pytest.mark.parametrize("task", [Task.MD, Task.OCR], ids=["md", "ocr"])
    def test_same_bytes_and_failures_as_one_machine(
        self, task: Task, references: References, settings: Settings, corpus: Path, tmp_path: Path
    ) -> None:
        reference = references.get(task)
        assert reference.output_dir is not None
        expected = tree(reference.output_dir)
        ray_run = run_ray(corpus, job_options(task, tmp_path), settings)
        assert {name.rsplit(".", 1)[1] for name in expected} >= set(FORMATS[task])  # every format is compared
        assert tree(tmp_path) == expected
        assert counts(ray_run.summary) == counts(reference.summary) == (3, 0, 1, PAGES, 0, 0)
        assert ray_run.recorder.errors == reference.recorder.errors
        assert len(ray_run.recorder.errors) == 1 and BROKEN in ray_run.recorder.errors[0]
        assert ray_run.summary.failed  # the CLI exits 1 on this, as on one machine
        assert ray_run.recorder.total == reference.recorder.total == PAGES

    def test_a_page_that_spins_fails_alone_within_the_page_timeout(
        self, settings: Settings, tmp_path: Path
    ) -> None:
        from test_nothing_lost import _laughs_pdf

        folder = tmp_path / "in"
        folder.mkdir()
        _laughs_pdf(folder / "laughs.pdf")
        make_image(folder / "fine.png")
        options = {**job_options(Task.MD, tmp_path / "out"), "page_timeout": 10.0}  # spins for ever, so any

        ray_run = run([str(folder)], options, settings, ray=RayOptions(workers=1))

        summary, recorder = ray_run.summary, ray_run.recorder
        assert [error.split("\n")[0] for error in recorder.errors] == [
            f"`{folder}/laughs.pdf` took longer than 10 s"
        ]
        assert counts(summary) == (1, 0, 1, 1, 0, 0)
        assert (tmp_path / "out" / "fine.png.md").exists()

    def test_a_run_here_and_a_run_on_ray_skip_each_other_s_documents_with_auto_settings(
        self, tiny_checkpoint: Path, corpus: Path, tmp_path: Path
    ) -> None:
        auto = Settings(
            model=str(tiny_checkpoint), device="cpu", batch_size=1, max_new_tokens=6
        )  # dtype, attn
        options = job_options(Task.MD, tmp_path, formats=("md",))
        assert run_single(corpus, options, auto).summary.documents_done == 3
        on_ray = run_ray(corpus, options, auto)  # its workers resolve `auto` as this machine did
        assert (on_ray.summary.documents_done, on_ray.summary.documents_skipped) == (0, 3)
        assert run_single(corpus, options, auto).summary.documents_skipped == 3

    def test_rerun_skips_finished_documents_and_resumes_pages(
        self, references: References, settings: Settings, corpus: Path, tmp_path: Path
    ) -> None:
        reference = references.get(Task.OCR)
        assert reference.output_dir is not None
        expected = tree(reference.output_dir)
        options = job_options(Task.OCR, tmp_path)
        for name, data in expected.items():  # a run that stopped inside sub/c.pdf, after its first page
            if not name.startswith("sub/c") or name == "sub/c.pdf-p001.boxes.png":
                (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / name).write_bytes(data)
        shutil.copytree(reference.output_dir / ".kosmos", tmp_path / ".kosmos")  # what was recorded as done
        first_page = next(
            r
            for r in reference.recorder.results
            if r.info.document.name == "sub/c.pdf" and r.info.page_index == 0
        )
        document = first_page.info.document
        job = Job(task=Task.OCR, formats=(*FORMATS[Task.OCR], "draw"), output_dir=tmp_path)
        job = replace(job, fingerprint=job_fingerprint(job, settings, resolve=False))
        with Outputs(job, io.BytesIO()) as outputs:
            interrupted = Assembly([document], outputs, Recorder(), Summary())
            interrupted.start(document)
            interrupted.expect(document, [0, 1])
            interrupted.page_done(first_page)
        assert (tmp_path / progress_name(document, Task.OCR)).exists()

        ray_run = run_ray(corpus, options, settings)

        assert tree(tmp_path) == expected  # the progress file is gone too
        # done, skipped, failed documents; pages done, resumed, failed
        assert counts(ray_run.summary) == (1, 2, 1, 1, 1, 0)

    def test_lost_worker_is_replaced_without_losing_or_repeating_pages(
        self, references: References, settings: Settings, corpus: Path, crash_folder: Path
    ) -> None:
        reference = references.get(Task.MD, to_folder=False)
        (crash_folder / "armed").touch()  # one model actor exits after its second page, once
        try:
            ray_run = run_ray(corpus, job_options(Task.MD, None, formats=("md",)), settings)
        finally:
            (crash_folder / "armed").unlink()

        assert (crash_folder / "crashed").exists()
        assert ray_run.stdout == reference.stdout  # every page once, documents in input order
        assert ray_run.stdout.count(b"<!-- kosmos: document ") == 3
        assert counts(ray_run.summary) == counts(reference.summary) == (3, 0, 1, PAGES, 0, 0)

    def test_model_that_cannot_load_stops_the_run(
        self, settings: Settings, corpus: Path, tmp_path: Path
    ) -> None:
        missing = tmp_path / "no-such-model"
        with pytest.raises(ModelLoadError) as caught:
            run_ray(corpus, job_options(Task.MD, tmp_path / "out"), replace(settings, model=str(missing)))
        assert str(missing) in caught.value.message
        assert caught.value.exit_code == 3
        assert tree(tmp_path / "out") == {}  # nothing but the run records

    @pytest.mark.parametrize("task", [Task.MD, Task.OCR], ids=["md", "ocr"])  # ocr: the searchable PDF too
    def test_inputs_and_outputs_on_s3(
        self, task: Task, references: References, settings: Settings, corpus: Path, s3: S3Server
    ) -> None:
        reference = references.get(task)
        assert reference.output_dir is not None
        bucket = s3.new_bucket()
        s3.upload(corpus, bucket, "in")
        source = f"s3://{bucket}/in"  # what outputs and messages call the inputs: no credentials, no query
        # The same objects as the local files, naming their sources by URI where a format names them.
        # (hOCR names a URI input's image only when the URI carries no credentials: left out here.)
        formats = tuple(name for name in FORMATS[task] if name != "hocr")

        # (JSON records no path for an input whose URI carries credentials: it would leak them; the
        # local run recorded each input's absolute path. Nor the hash of an object the driver never
        # fetches: its size only.)
        def as_on_s3(data: bytes) -> bytes:
            data = data.replace(corpus.name.encode(), source.encode())
            data = re.sub(rb'"path": "[^"]*"', b'"path": null', data)
            return re.sub(rb'"sha256": "[0-9a-f]{64}"', b'"sha256": null', data)

        expected = {
            name: as_on_s3(data)
            for name, data in tree(reference.output_dir).items()
            if not name.endswith(".hocr")
        }
        options = job_options(task, s3.uri(bucket, "out"), formats=formats)

        ray_run = run([s3.uri(bucket, "in")], options, settings, ray=RayOptions(workers=1))

        assert {k: v for k, v in s3.tree(bucket, "out").items() if not k.startswith(".kosmos/")} == expected
        assert counts(ray_run.summary) == counts(reference.summary)
        assert ray_run.recorder.errors == [e.replace(corpus.name, source) for e in reference.recorder.errors]
        again = run([s3.uri(bucket, "in")], options, settings, ray=RayOptions(workers=1))
        assert counts(again.summary) == (0, 3, 1, 0, 0, 0)  # the rest are done; the broken file fails again


@pytest.mark.ray
@pytest.mark.usefixtures("ray_instance")
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")
def test_the_cli_runs_on_ray_with_the_same_exit_code_and_outputs(
    references: References, tiny_checkpoint: Path, corpus: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from kosmos_cli.cli import app

    reference = references.get(Task.OCR)
    assert reference.output_dir is not None
    args = ["ocr", corpus.name, "-o", str(tmp_path), "--draw", "--model", str(tiny_checkpoint)]
    args += [arg for name in FORMATS[Task.OCR] for arg in ("-f", name)]
    args += [
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--attn",
        "sdpa",
        "--batch-size",
        "1",
        "--max-new-tokens",
        "6",
    ]
    args += ["--ray", "--workers", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.stderr  # the broken file, as on one machine
    assert f"error: `{corpus.name}/{BROKEN}`" in result.stderr
    assert f"3 done, 0 skipped (done before), 1 failed; {PAGES} pages" in result.stderr
    assert tree(tmp_path) == tree(reference.output_dir)
