"""Outputs on local disks and object stores, and outputs that would overwrite inputs.

Object stores are real ones, offline: moto's S3 server on 127.0.0.1, reached by pyarrow's own S3
client through URIs that carry the endpoint, dummy credentials and region
(`s3://KEY:SECRET@bucket/key?endpoint_override=127.0.0.1:PORT&scheme=http&region=us-east-1`), so
neither this process nor a Ray worker needs any AWS setting. The Ray run over S3 lives in
`test_ray.py`, which starts Ray once for all its runs; it uses `S3Server` from here.
"""

from __future__ import annotations

import io
import logging
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from inputs import MIXED_PAGES, make_image, make_pdf
from recorder import Recorder, counts, tree
from typer.testing import CliRunner

from kosmos_cli.api import transcribe_files
from kosmos_cli.assembly import Assembly
from kosmos_cli.cli import app
from kosmos_cli.config import Settings
from kosmos_cli.errors import KosmosError, UsageError
from kosmos_cli.manifest import progress_name
from kosmos_cli.reporting import Summary
from kosmos_cli.stores import (
    LISTING_THRESHOLD,
    LocalStore,
    ObjectStore,
    OutputStore,
    location_identity,
    output_location,
    output_store,
    public_location,
)
from kosmos_cli.testing import ScriptedRunner
from kosmos_cli.values import Document, PageResult, Task

PROGRESS_SUFFIX = ".progress.jsonl"  # a log name, as the manifest's progress logs end

CREDENTIALS = "kosmos-test:kosmos-test-secret"  # moto takes any
SETTINGS = Settings(model="scripted", device="cpu")  # names the scripted model in fingerprints


# --- an S3 server on 127.0.0.1 ----------------------------------------------------------------------


@dataclass
class S3Server:
    """moto's S3 server, with helpers that speak to it through pyarrow as kosmos does."""

    endpoint: str  # HOST:PORT

    def uri(self, bucket: str, key: str = "", *, create: bool = False) -> str:
        """Return the URI of a key, with what pyarrow needs to reach this server."""
        query = f"endpoint_override={self.endpoint}&scheme=http&region=us-east-1"
        if create:
            query += "&allow_bucket_creation=true"
        return f"s3://{CREDENTIALS}@{bucket}/{key}?{query}"

    def new_bucket(self) -> str:
        """Create an empty bucket and return its name (unique: moto keeps buckets for the whole process)."""
        from pyarrow import fs

        name = f"kosmos-{uuid.uuid4().hex[:16]}"
        filesystem, _ = fs.FileSystem.from_uri(self.uri(name, create=True))
        filesystem.create_dir(name)
        return name

    def upload(self, folder: Path, bucket: str, prefix: str) -> None:
        """Copy a local folder's files under a prefix."""
        from pyarrow import fs

        fs.copy_files(str(folder), f"{bucket}/{prefix}", destination_filesystem=self._filesystem(bucket))

    def tree(self, bucket: str, prefix: str) -> dict[str, bytes]:
        """Return every object below a prefix by its key relative to it (folder markers left out)."""
        from pyarrow import fs

        filesystem = self._filesystem(bucket)
        root = f"{bucket}/{prefix}"
        entries = filesystem.get_file_info(fs.FileSelector(root, recursive=True, allow_not_found=True))
        tree = {}
        for entry in sorted(e.path for e in entries if e.type == fs.FileType.File):
            with filesystem.open_input_stream(entry) as stream:
                tree[entry[len(root) + 1 :]] = stream.read()
        return tree

    def _filesystem(self, bucket: str) -> object:
        from pyarrow import fs

        return fs.FileSystem.from_uri(self.uri(bucket))[0]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """Run moto's S3 server on 127.0.0.1 for the module."""
    yield from run_s3_server()


def run_s3_server() -> Iterator[S3Server]:
    """Start moto's S3 server on a free port of 127.0.0.1, yield it, and stop it."""
    pytest.importorskip("pyarrow.fs", reason="object stores need pyarrow (the ray extra)")
    server_module = pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    requests = logging.getLogger("werkzeug")  # one INFO line per request otherwise
    level = requests.level
    requests.setLevel(logging.WARNING)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(f"{host}:{port}")
    finally:
        server.stop()
        requests.setLevel(level)


# --- the stores ---------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "file-uri", "subtree", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> OutputStore:
    """Each kind of store: a local folder, a file:// URI, a non-S3 pyarrow file system and S3."""
    if request.param == "local":
        return output_store(tmp_path / "out")
    if request.param == "file-uri":
        return output_store(f"file://{tmp_path}/out")
    if request.param == "subtree":
        fs = pytest.importorskip("pyarrow.fs")

        (tmp_path / "root").mkdir()
        filesystem = fs.SubTreeFileSystem(str(tmp_path / "root"), fs.LocalFileSystem())
        return ObjectStore(filesystem, "out", "subtree://out")
    s3: S3Server = request.getfixturevalue("s3")
    return output_store(s3.uri(s3.new_bucket(), "out"))


def test_store_writes_reads_and_removes(store: OutputStore) -> None:
    assert not store.exists("a/b.md")
    assert store.read("a/b.md") is None
    store.write("a/b.md", b"first")
    store.write("a/b.md", b"second, longer")
    store.write("c.json", b"{}")
    assert store.exists("a/b.md") and store.read("a/b.md") == b"second, longer"
    assert store.existing(["a/b.md", "c.json", "d.txt"]) == {"a/b.md", "c.json"}
    many = [
        f"many/{number:02}.txt" for number in range(LISTING_THRESHOLD + 1)
    ]  # one listing, not a call each
    for name in many[::2]:
        store.write(name, name.encode())
    assert store.existing([*many, "a/b.md", "a"]) == {*many[::2], "a/b.md"}
    store.remove("a/b.md")
    store.remove("a/b.md")  # gone already: fine
    assert not store.exists("a/b.md")
    assert store.read("c.json") == b"{}"


def test_store_leaves_no_temporary_files(store: OutputStore, tmp_path: Path) -> None:
    store.write("x/y.md", b"data")
    if isinstance(store, ObjectStore) and store.location.startswith("s3://"):
        from pyarrow import fs

        bucket = store.root.split("/")[0]  # every object in the bucket, not only below the root
        found = store.filesystem.get_file_info(fs.FileSelector(bucket, recursive=True))
        assert [info.path for info in found if info.type == fs.FileType.File] == [f"{store.root}/x/y.md"]
    else:
        assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["y.md"]
    if isinstance(store, LocalStore):
        store.open_for_run()  # from now on temporary files go to .kosmos/tmp, emptied by each run
        store.write("x/z.md", b"data")
        assert list((store.root / ".kosmos/tmp").iterdir()) == []
        store.close()


def test_store_logs_append_and_resume_in_order(store: OutputStore) -> None:
    log = f"sub/doc{PROGRESS_SUFFIX}"
    assert store.read_log(log) == []
    store.append_log(log, '{"header": 1}')
    store.append_log(log, '{"page": "é"}')
    assert store.read_log(log) == ['{"header": 1}', '{"page": "é"}']
    reopened = _reopen(store)  # a later run: appends follow what is there
    reopened.append_log(log, '{"page": 2}')
    assert reopened.read_log(log) == ['{"header": 1}', '{"page": "é"}', '{"page": 2}']
    reopened.remove_log(log)
    reopened.remove_log(log)
    assert reopened.read_log(log) == []
    reopened.append_log(log, "again")
    assert reopened.read_log(log) == ["again"]


def test_store_reads_many_logs_after_one_lookup(store: OutputStore) -> None:
    logs = [f"d{number:02}{PROGRESS_SUFFIX}" for number in range(LISTING_THRESHOLD + 2)]
    for log in logs[::2]:
        store.append_log(log, log)
        store.append_log(log, "2")
    reopened = _reopen(store)
    reopened.expect_logs(logs)  # an object store lists its root once here
    for log in logs:
        assert reopened.read_log(log) == ([log, "2"] if log in logs[::2] else [])
    reopened.append_log(logs[0], "3")  # appends follow what the listing found
    reopened.append_log(logs[1], "1")
    assert _reopen(store).read_log(logs[0]) == [logs[0], "2", "3"]
    assert _reopen(store).read_log(logs[1]) == ["1"]


def _reopen(store: OutputStore) -> OutputStore:
    if isinstance(store, LocalStore):
        return LocalStore(store.root)
    assert isinstance(store, ObjectStore)
    return ObjectStore(store.filesystem, store.root, store.location)


def test_store_moves_outputs_and_removes_folders(store: OutputStore) -> None:
    store.write("stage/x/1.png", b"one")
    store.write("stage/x/2.png", b"two")
    assert store.move("stage/x/1.png", "final/a.png") is True
    assert store.move("stage/x/9.png", "final/b.png") is False  # nothing to move
    assert store.read("final/a.png") == b"one" and not store.exists("stage/x/1.png")
    store.remove_folder("stage")
    store.remove_folder("stage")  # gone already: fine
    assert not store.exists("stage/x/2.png") and store.exists("final/a.png")


def test_local_log_after_a_torn_line_keeps_new_lines_whole(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    (tmp_path / "doc.log").write_bytes(b'{"header": 1}\n{"page": "\xc3')  # killed mid-character
    assert store.read_log("doc.log") == ['{"header": 1}', '{"page": "\ufffd']
    store.append_log("doc.log", '{"page": 2}')
    assert store.read_log("doc.log") == ['{"header": 1}', '{"page": "\ufffd', '{"page": 2}']


def test_s3_objects_and_messages(s3: S3Server) -> None:
    bucket = s3.new_bucket()
    store = output_store(s3.uri(bucket, "out/"))
    assert isinstance(store, ObjectStore)
    assert store.describe("a/b.md") == f"s3://{bucket}/out/a/b.md"  # no credentials, no endpoint
    store.append_log(f"doc{PROGRESS_SUFFIX}", "line")
    assert set(s3.tree(bucket, "out")) == {"doc.progress/00000000.json"}
    store.remove_log(f"doc{PROGRESS_SUFFIX}")
    assert s3.tree(bucket, "out") == {}
    missing = output_store(s3.uri("no-such-bucket", "out"))
    with pytest.raises(KosmosError) as caught:
        missing.write("a.md", b"x")
    assert caught.value.message.startswith("cannot write `s3://no-such-bucket/out/a.md`: ")


@pytest.mark.parametrize(
    ("location", "public"),
    [
        ("out/a.md", "out/a.md"),
        ("s3://bucket/key.md", "s3://bucket/key.md"),
        ("s3://KEY:SECRET@bucket/in/a.png?endpoint_override=h:1&scheme=http", "s3://bucket/in/a.png"),
        ("hdfs://user@namenode:8020/data/a.pdf", "hdfs://namenode:8020/data/a.pdf"),
    ],
)
def test_public_location_drops_credentials_and_query(location: str, public: str) -> None:
    assert public_location(location) == public


def test_location_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    same = [
        "in/a.pdf",
        str(tmp_path / "in" / "a.pdf"),
        "link/a.pdf",
        f"file://{tmp_path}/in/a.pdf",
        "in/./a.pdf",
    ]
    assert len({location_identity(location) for location in same}) == 1
    assert location_identity("s3://K:S@b/in/a.pdf?x=1") == location_identity("S3://b/in//a.pdf")
    assert location_identity("s3://b/in/a.pdf") != location_identity("gs://b/in/a.pdf")
    assert location_identity("s3://b/in/a.pdf") != location_identity(str(tmp_path / "in" / "a.pdf"))


@pytest.mark.parametrize(
    ("location", "expected"),
    [("out", Path("out")), ("/data/out", Path("/data/out")), ("file:///data/out", Path("/data/out"))],
)
def test_output_location_of_local_folders(location: str, expected: Path) -> None:
    assert output_location(location) == expected


def test_output_location_of_object_stores(s3: S3Server) -> None:
    uri = s3.uri(s3.new_bucket(), "out")
    assert output_location(uri) == uri
    with pytest.raises(UsageError) as caught:
        output_location("nosuch://bucket/out")
    assert caught.value.message.startswith("-o `nosuch://bucket/out` cannot be opened: ")
    assert caught.value.exit_code == 2


def test_object_stores_without_pyarrow_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what `import pyarrow` meets when it is not installed
    with pytest.raises(UsageError) as caught:
        output_location("s3://KEY:SECRET@bucket/out")
    assert caught.value.message == "-o `s3://bucket/out` needs pyarrow, which is not installed"
    assert output_location("file:///data/out") == Path("/data/out")  # local folders do not need it


# --- jobs writing to S3 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image and a two-page PDF, one level down."""
    folder = tmp_path_factory.mktemp("scans")
    (folder / "sub").mkdir()
    make_image(folder / "a.png")
    make_pdf(folder / "sub" / "b.pdf", pages=MIXED_PAGES[:2])
    return folder


OCR_FORMATS = ("txt", "json", "hocr", "pdf")


def run(
    folder: Path, output: Path | str, *, formats: tuple[str, ...] = OCR_FORMATS
) -> tuple[Summary, Recorder]:
    """Transcribe a folder with the scripted model, as the CLI does on one machine, with --draw."""
    recorder = Recorder()
    summary = transcribe_files(
        [str(folder)],
        task=Task.OCR,
        formats=formats,
        output=output,
        draw=True,
        settings=SETTINGS,
        runner=ScriptedRunner(),
        reporter=recorder,
        stdout=io.BytesIO(),
    )
    return summary, recorder


@pytest.fixture(scope="module")
def local_reference(scans: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("local-out")
    summary, recorder = run(scans, out)
    assert counts(summary) == (2, 0, 0, 3, 0, 0) and recorder.errors == []
    return _outputs(tree(out))


def _outputs(files: dict[str, bytes]) -> dict[str, bytes]:
    """The outputs among files, without the run records in .kosmos/."""
    return {name: data for name, data in files.items() if not name.startswith(".kosmos/")}


def test_job_writes_to_s3_what_it_writes_locally_and_skips_it_after(
    s3: S3Server, scans: Path, local_reference: dict[str, bytes]
) -> None:
    bucket = s3.new_bucket()

    summary, recorder = run(scans, s3.uri(bucket, "out"))

    assert set(local_reference) == {  # every format and the --draw images, compared byte for byte
        "a.png.txt", "a.png.json", "a.png.hocr", "a.png.pdf", "a.png.boxes.png",
        "sub/b.pdf.txt", "sub/b.pdf.json", "sub/b.pdf.hocr", "sub/b.pdf.pdf",
        "sub/b.pdf-p001.boxes.png", "sub/b.pdf-p002.boxes.png",
    }  # fmt: skip
    assert _outputs(s3.tree(bucket, "out")) == local_reference  # and no progress objects left
    assert not [name for name in s3.tree(bucket, "out") if "/progress/" in name]
    assert counts(summary) == (2, 0, 0, 3, 0, 0) and recorder.errors == []

    again, _ = run(scans, s3.uri(bucket, "out"))
    assert counts(again) == (0, 2, 0, 0, 0, 0)


def test_job_on_s3_resumes_a_half_done_document(
    s3: S3Server, scans: Path, local_reference: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3.new_bucket()
    page_done = Assembly.page_done
    calls: list[int] = []

    def stop_inside_b(self: Assembly, result: PageResult, *args: object) -> bool:
        calls.append(result.info.page_index)
        if len(calls) == 3:  # a.png and sub/b.pdf's page 1 are done
            raise KeyboardInterrupt
        return page_done(self, result, *args)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(Assembly, "page_done", stop_inside_b)
        with pytest.raises(KeyboardInterrupt):
            run(scans, s3.uri(bucket, "out"))
    progress = progress_name(Document(str(scans / "sub/b.pdf"), "sub/b.pdf"), Task.OCR).removesuffix(".jsonl")
    assert set(_outputs(s3.tree(bucket, "out"))) == {
        "a.png.txt",
        "a.png.json",
        "a.png.hocr",
        "a.png.pdf",
        "a.png.boxes.png",
    }
    assert {f"{progress}/00000000.json", f"{progress}/00000001.json"} <= set(s3.tree(bucket, "out"))

    summary, recorder = run(scans, s3.uri(bucket, "out"))

    assert recorder.errors == []
    assert counts(summary) == (1, 1, 0, 1, 1, 0)
    assert _outputs(s3.tree(bucket, "out")) == local_reference  # the resumed page's drawing was staged
    assert not [name for name in s3.tree(bucket, "out") if "/progress/" in name or "/staging/" in name]


# --- never overwrite an input -------------------------------------------------------------------------


def test_outputs_that_would_overwrite_inputs_fail_their_document(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    make_image(folder / "scan.png")  # its searchable PDF would be scan.png.pdf, another input
    make_pdf(folder / "scan.png.pdf", pages=MIXED_PAGES[:2])
    make_image(folder / "photo.jpg", fmt="JPEG")
    before = tree(folder)

    summary, recorder = run(folder, folder, formats=("txt", "pdf"))

    assert recorder.errors == [
        f"`{folder}/scan.png.pdf` would overwrite the input `{folder}/scan.png.pdf`\nhint: choose another -o",
    ]
    assert counts(summary)[:3] == (2, 0, 1) and summary.failed
    after = _outputs(tree(folder))
    assert {name: after[name] for name in before} == before  # every input as it was
    assert sorted(set(after) - set(before)) == [
        "photo.jpg.boxes.png", "photo.jpg.pdf", "photo.jpg.txt",
        "scan.png.pdf-p001.boxes.png", "scan.png.pdf-p002.boxes.png", "scan.png.pdf.pdf", "scan.png.pdf.txt",
    ]  # fmt: skip


def test_cli_refuses_to_overwrite_an_input_and_goes_on(
    scripted: list[ScriptedRunner], model_folder: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    make_image(folder / "scan.pdf")  # an image despite its name: its searchable PDF is scan.pdf.pdf
    make_pdf(folder / "scan.pdf.pdf", pages=MIXED_PAGES[:1])
    scan = (folder / "scan.pdf.pdf").read_bytes()
    args = ["ocr", str(folder), "-o", str(folder), "-f", "pdf"]

    result = CliRunner().invoke(app, [*args, "--model", str(model_folder)])

    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[:2] == [
        f"error: `{folder}/scan.pdf.pdf` would overwrite the input `{folder}/scan.pdf.pdf`",
        "hint: choose another -o",
    ]
    assert "1 done, 0 skipped (done before), 1 failed" in lines[-1]
    assert (folder / "scan.pdf.pdf").read_bytes() == scan
    assert sorted(p.name for p in folder.iterdir()) == [
        ".kosmos",
        "scan.pdf",
        "scan.pdf.pdf",
        "scan.pdf.pdf.pdf",
    ]


def test_cli_writes_to_s3(
    s3: S3Server,
    scripted: list[ScriptedRunner],
    scans: Path,
    local_reference: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # a URI taken for a local path would land here
    bucket = s3.new_bucket()
    args = ["ocr", str(scans / "a.png"), "-o", s3.uri(bucket, "out"), "-f", "txt", "-f", "json"]
    result = CliRunner().invoke(app, [*args, "--model", SETTINGS.model])

    assert result.exit_code == 0, result.stderr
    assert _outputs(s3.tree(bucket, "out")) == {
        name: local_reference[name] for name in ("a.png.json", "a.png.txt")
    }
    assert CREDENTIALS not in result.stderr
    assert list(tmp_path.iterdir()) == []
