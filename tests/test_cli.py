"""The `kosmos` command end to end: help, version, usage errors and every model-loading error."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from inputs import make_image
from typer.testing import CliRunner

from kosmos_cli import __version__
from kosmos_cli.cli import EXIT_CRASH, app
from kosmos_cli.errors import ModelLoadError
from kosmos_cli.model.loading import require_hub

runner = CliRunner()


@pytest.fixture
def png(tmp_path: Path) -> Path:
    return make_image(tmp_path / "page.png", fmt="PNG")


def test_help_lists_the_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("md", "ocr", "download", "doctor"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["md", "ocr"])
def test_command_help_names_the_shared_options(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    for option in (
        "--model",
        "--revision",
        "--device",
        "--dtype",
        "--attn",
        "--batch-size",
        "--max-new-tokens",
    ):
        assert option in result.stdout


def test_help_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys\n"
        "from kosmos_cli.cli import main\n"
        "sys.argv = ['kosmos', 'ocr', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(name for name in ('torch', 'transformers', 'ray') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[-1] == "[]", result.stderr


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"kosmos {__version__}\n"


ADD_OUTPUT = "hint: add -o DIR"
HELP_MD = "hint: see `kosmos md --help`"


@pytest.mark.parametrize(
    ("args", "stderr"),
    [
        (
            ["md"],
            ["error: no inputs given", "hint: name files or folders, `-` for stdin, or --from-list FILE"],
        ),
        (
            ["ocr", "{png}", "--draw"],
            ["error: --draw writes PNG files and needs an output folder", ADD_OUTPUT],
        ),
        (
            ["ocr", "{png}", "-f", "pdf"],
            ["error: --format pdf writes a PDF file and needs an output folder", ADD_OUTPUT],
        ),
        (
            ["ocr", "{png}", "-f", "txt", "-f", "json"],
            ["error: several formats need an output folder; stdout takes one", ADD_OUTPUT],
        ),
        (
            ["md", "{png}", "--pages", "3-1"],
            [
                "error: --pages `3-1`: the range `3-1` runs backwards",
                "hint: use 1-based page numbers and ranges, e.g. 1-3,7,10- (10- runs to the last page)",
            ],
        ),
        (
            ["md", "{png}", "--device", "tpu"],
            ["error: `tpu` is not a device", "hint: use one of: auto, cpu, cuda, cuda:N, mps"],
        ),
        (["md", "{png}", "--dpi", "5"], ["error: --dpi must be at least 10, not 5"]),
        (["md", "{png}", "--batch-size", "0"], ["error: --batch-size must be at least 1, not 0"]),
        (["md", "{png}", "--ray", "--workers", "0"], ["error: --workers must be at least 1, not 0"]),
        (
            ["md", "{png}", "--quantize", "int8", "--device", "cuda"],
            ["error: --quantize int8 runs on CPU only", "hint: drop --quantize, or use --device cpu"],
        ),
        (
            ["md", "{png}", "-f", "hocr"],
            [
                "error: invalid value for '--format' / '-f': 'hocr' is not one of 'md', 'json', 'jsonl', 'chunks'.",
                HELP_MD,
            ],
        ),
        (
            ["md", "{png}", "--dtype", "float8"],
            [
                "error: invalid value for '--dtype': 'float8' is not one of 'auto', 'bfloat16', 'float16', 'float32'.",
                HELP_MD,
            ],
        ),
        (["md", "{png}", "--colour"], ["error: no such option: --colour", HELP_MD]),
    ],
)
def test_usage_errors_exit_2_with_one_error_line_and_a_hint(
    args: list[str], stderr: list[str], png: Path
) -> None:
    result = runner.invoke(app, [a.format(png=png) for a in args])
    assert result.exit_code == 2, result.stderr
    assert result.stderr.splitlines() == stderr
    assert result.stdout == ""


def test_no_command_shows_the_help() -> None:
    result = runner.invoke(app, [])
    assert result.exit_code == 2
    assert "Usage: kosmos [OPTIONS] COMMAND" in result.stderr
    assert "md " in result.stderr and "ocr " in result.stderr


def test_a_bug_is_a_crash_with_a_traceback_and_its_own_exit_code(
    png: Path, scripted: list[object], model_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kosmos_cli import jobs

    def broken(*args: object, **kwargs: object) -> None:
        raise TypeError("an argument that was never there")

    monkeypatch.setattr(jobs, "run_job", broken)
    result = runner.invoke(app, ["md", str(png), "--model", str(model_folder)])
    assert result.exit_code == EXIT_CRASH == 70
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-2:] == [
        "error: kosmos crashed: TypeError: an argument that was never there",
        "hint: this is a bug; please report it with the traceback above",
    ]


def _load_error(args: list[str]) -> tuple[int, str, str]:
    result = runner.invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def test_model_not_cached_offline_exits_3(png: Path) -> None:
    code, stdout, stderr = _load_error(["md", str(png), "--model", "microsoft/kosmos-2.5"])
    assert code == 3
    assert stdout == ""
    assert stderr.splitlines()[:2] == [
        "error: model `microsoft/kosmos-2.5` is not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE)",
        "hint: download it once with `kosmos download` (needs network), or pass a local folder with --model",
    ]
    assert "Traceback" not in stderr


def test_kosmos_model_env_names_the_default(png: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOSMOS_MODEL", "someone/other-kosmos")
    code, _, stderr = _load_error(["md", str(png)])
    assert code == 3
    assert "model `someone/other-kosmos` is not in the Hugging Face cache" in stderr


def test_folder_without_config_exits_3(png: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, _, stderr = _load_error(["ocr", str(png), "--model", str(empty)])
    assert code == 3
    assert f"error: `{empty}` is not a Kosmos-2.5 checkpoint: it has no config.json" in stderr


def test_folder_of_another_model_exits_3(png: Path, tmp_path: Path) -> None:
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    code, _, stderr = _load_error(["md", str(png), "--model", str(other)])
    assert code == 3
    assert f"error: `{other}` is a `bert` checkpoint, not Kosmos-2.5" in stderr


def test_broken_checkpoint_folder_exits_3(png: Path, tmp_path: Path, tiny_checkpoint: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((tiny_checkpoint / "config.json").read_bytes())
    code, _, stderr = _load_error(["md", str(png), "--model", str(broken)])
    assert code == 3
    assert f"error: `{broken}` is not a usable Kosmos-2.5 checkpoint" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_cuda_on_a_machine_without_it_exits_3(device: str, png: Path, tiny_checkpoint: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, stderr = _load_error(["md", str(png), "--model", str(tiny_checkpoint), "--device", device])
    assert code == 3
    assert f"error: device `{device}` was asked for but CUDA is not available on this machine" in stderr


def test_flash_attention_without_the_package_exits_3(png: Path, tiny_checkpoint: Path) -> None:
    code, _, stderr = _load_error(
        ["md", str(png), "--model", str(tiny_checkpoint), "--attn", "flash_attention_2"]
    )
    assert code == 3
    assert "flash_attention_2 needs the flash-attn package" in stderr


def test_model_is_not_loaded_when_every_output_exists(
    png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kosmos_cli.model import loading
    from kosmos_cli.testing import ScriptedRunner

    out = tmp_path / "out"
    args = ["md", str(png), "-o", str(out), "--model", "nobody/nothing", "--device", "cpu"]
    with monkeypatch.context() as patch:
        patch.setattr(loading, "load_runner", lambda settings: ScriptedRunner())
        assert runner.invoke(app, args).exit_code == 0
    done = (out / "page.png.md").read_bytes()
    # The model does not exist anywhere: the run succeeds only because it never loads it.
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "1 skipped" in result.stderr
    assert (out / "page.png.md").read_bytes() == done


# --- errors that need the hub: a subprocess, because huggingface_hub reads its settings at import ---------


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answer every request the way the hub answers for a repository that does not exist."""

    def _not_found(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _not_found

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_hub() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kosmos(args: list[str], *, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_ENDPOINT=endpoint)
    return subprocess.run(
        [sys.executable, "-m", "kosmos_cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_unknown_hub_id_exits_3(png: Path, fake_hub: str) -> None:
    result = _kosmos(["md", str(png), "--model", "nobody/no-such-model"], endpoint=fake_hub)
    assert result.returncode == 3, result.stderr
    assert "error: model `nobody/no-such-model` was not found on the hub" in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def test_unreachable_hub_exits_3_at_once(png: Path) -> None:
    started = time.monotonic()
    result = _kosmos(["md", str(png)], endpoint=f"http://127.0.0.1:{_closed_port()}")
    assert time.monotonic() - started < 15  # not huggingface_hub's 23 s of retries first
    assert result.returncode == 3, result.stderr
    assert (
        "error: model `microsoft/kosmos-2.5` is not in the Hugging Face cache and the hub could not be reached"
        in result.stderr
    )
    assert "hint: download it once with `kosmos download`" in result.stderr


@pytest.mark.parametrize("proxy", [None, "http://proxy.example:3128"])
def test_the_hub_is_probed_once_unless_a_proxy_decides(
    monkeypatch: pytest.MonkeyPatch, proxy: str | None
) -> None:
    attempts: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], timeout: float) -> socket.socket:
        attempts.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if proxy is None:
        with pytest.raises(ModelLoadError, match="the hub could not be reached"):
            require_hub("microsoft/kosmos-2.5")
        assert len(attempts) == 1
    else:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        require_hub("microsoft/kosmos-2.5")
        assert attempts == []


def test_download_without_a_hub_says_where_the_weights_can_come_from(tmp_path: Path) -> None:
    result = _kosmos(["download", "--to", str(tmp_path / "w")], endpoint=f"http://127.0.0.1:{_closed_port()}")
    assert result.returncode == 3, result.stderr
    assert "error: cannot download `microsoft/kosmos-2.5`: the hub could not be reached" in result.stderr
    assert (
        "hint: run `kosmos download --to DIR` where the hub can be reached, copy DIR here and pass --model DIR"
        in result.stderr
    )


def test_download_help_names_only_its_own_options() -> None:
    result = CliRunner().invoke(app, ["download", "--help"], env={"COLUMNS": "200"})
    assert "--to" in result.output and "--model" not in result.output


def test_download_reports_an_unknown_id(fake_hub: str) -> None:
    result = _kosmos(["download", "nobody/no-such-model"], endpoint=fake_hub)
    assert result.returncode == 3
    assert "error: model `nobody/no-such-model` was not found on the hub" in result.stderr


def test_default_model_loads_offline_from_the_hub_cache(
    png: Path, tiny_checkpoint: Path, offline_hub: Path
) -> None:
    # The layout huggingface_hub gives a downloaded repo: snapshots/<commit>/ and refs/main naming it.
    repo = offline_hub / "hub" / "models--microsoft--kosmos-2.5"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    try:
        result = runner.invoke(app, ["ocr", str(png), "--max-new-tokens", "4"])
        doctor = runner.invoke(app, ["doctor", "--no-smoke"])
    finally:
        shutil.rmtree(repo)
    assert result.exit_code == 0, result.stderr
    assert "1 done" in result.stderr
    assert f"cached at {repo / 'snapshots' / commit}" in doctor.stdout


def test_doctor_runs_the_smoke_test() -> None:
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.stdout
    rows = dict(
        line.split(None, 1) for line in result.stdout.splitlines() if line.startswith(("device", "smoke"))
    )
    assert rows["device"].startswith("cpu")
    assert rows["smoke"].startswith("run") and "ok: " in rows["smoke"]
    assert "not cached (run `kosmos download`)" in result.stdout
