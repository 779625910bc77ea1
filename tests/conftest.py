"""Shared fixtures: the hub stays offline and unseen, and a tiny random Kosmos-2.5 is built once."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kosmos_cli.testing import ScriptedRunner

_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_CACHE_ENV = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_TOKEN")
_hf_home: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Go offline with an empty HF_HOME before any test module imports huggingface_hub."""
    # huggingface_hub reads these variables once, when it is first imported, so a fixture is too late
    # for a test module that imports transformers at the top.
    global _hf_home
    _hf_home = Path(tempfile.mkdtemp(prefix="kosmos-tests-hf-home-"))
    os.environ.update(_OFFLINE_ENV, HF_HOME=str(_hf_home))
    for name in _CACHE_ENV:
        os.environ.pop(name, None)
    # Without a GPU, Triton kernels (the CUDA decode attention) run in Triton's interpreter, on the CPU.
    # Triton reads this once, when it is first imported.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the temporary HF_HOME."""
    if _hf_home is not None:
        shutil.rmtree(_hf_home, ignore_errors=True)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Keep every test offline with the empty HF_HOME, even if an earlier test changed the environment."""
    assert _hf_home is not None
    for name, value in _OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HOME", str(_hf_home))
    for name in _CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    yield _hf_home


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny random Kosmos-2.5 checkpoint once per session and return its folder."""
    from kosmos_cli.testing import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("kosmos-tiny"), size="tiny", seed=0)


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A folder that stands for a checkpoint: the fingerprint reads its files, nothing loads them."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "kosmos-2.5"}')
    return folder


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ScriptedRunner]]:
    """Make every model the library loads a ScriptedRunner; yields the runners made, one per loading."""
    from kosmos_cli.model import loading
    from kosmos_cli.testing import ScriptedRunner

    made: list[ScriptedRunner] = []

    def load(settings: object) -> ScriptedRunner:
        made.append(ScriptedRunner())
        return made[-1]

    monkeypatch.setattr(loading, "load_runner", load)
    yield made


@pytest.fixture
def ocrmypdf_tools() -> None:
    """Skip without OCRmyPDF, Ghostscript and Tesseract (`make debian-packages`); fail in CI, which has them."""
    missing = [tool for tool in ("gs", "tesseract") if shutil.which(tool) is None]
    try:
        import ocrmypdf  # noqa: F401
    except ImportError:
        missing.append("the ocrmypdf extra (pip install 'kosmos-transcribe[ocrmypdf]')")
    if missing:
        message = f"needs {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
