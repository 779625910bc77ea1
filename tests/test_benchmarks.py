"""The benchmarks still run: each one end to end on the tiny model.

The `benchmarks` marker keeps the heavier ones (several model loads each) out of `make test`;
`make test-benchmarks` runs them, and CI does.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import runpy
import sys
from pathlib import Path

import pytest
from inputs import PdfPage, make_pdf

from kosmos_cli.model.slots import GROW_COLUMNS

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / name), *argv])
    monkeypatch.syspath_prepend(
        str(BENCHMARKS)
    )  # as `python benchmarks/NAME` has it: benchmarks import each other
    runpy.run_path(str(BENCHMARKS / name), run_name="__main__")


@pytest.mark.benchmarks
def test_throughput_compares_both_sides_and_int8(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    figures = tmp_path / "figures.json"
    argv = ["--model", str(tiny_checkpoint), "--pages", "2", "--tokens", "6", "--dtype", "float32"]
    run_benchmark("throughput.py", [*argv, "--also-int8", "--json", str(figures)], monkeypatch)
    out = capsys.readouterr().out
    assert "baseline" in out and "ratio: " in out and "ratio (int8): " in out
    assert "int8 vs float32 next-token logits" in out
    assert "of 2 pages token-identical to float32" in out
    assert figures.is_file()


@pytest.mark.benchmarks
def test_throughput_decode_sweep(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--model",
        str(tiny_checkpoint),
        "--decode-sweep",
        "1,2",
        "--dtype",
        "float32",
        "--bandwidth",
        "10",
        "--kv-dtype",
        "bfloat16",
        "--also-int8",
    ]
    run_benchmark("throughput.py", argv, monkeypatch)
    out = capsys.readouterr().out
    assert out.count("decode batch 2: ") == 3
    assert "-- dtype float32, kv_dtype bfloat16" in out and "-- dtype float32, quantize int8" in out


def test_reading(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "a.pdf", pages=[PdfPage(), PdfPage()])
    run_benchmark("reading.py", [str(pdf)], monkeypatch)
    assert "a.pdf" in capsys.readouterr().out


@pytest.mark.benchmarks
def test_pdf_inputs(
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    ocrmypdf_tools: None,
) -> None:
    argv = ["--model", str(tiny_checkpoint), "--tokens", "4", "--digital-pages", "2"]
    run_benchmark("pdf_inputs.py", argv, monkeypatch)
    out = capsys.readouterr().out
    assert "--text-layer only (no model)" in out and "--text-layer ignore" in out
    assert "plugin/direct time: " in out


@pytest.mark.benchmarks
def test_loading(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_benchmark("loading.py", ["--model", str(tiny_checkpoint)], monkeypatch)
    out = capsys.readouterr().out
    assert "model card from_pretrained" in out and "float32 int8" in out


@pytest.mark.benchmarks
def test_throughput_kv_waste(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--model",
        str(tiny_checkpoint),
        "--kv-waste",
        "20,300",
        "--dtype",
        "float32",
        "--batch-size",
        "3",
    ]
    run_benchmark("throughput.py", argv, monkeypatch)
    out = capsys.readouterr().out
    # Pages of lengths up to 280 tokens apart decode together (reading up to the longest row would
    # read about a hundred columns too many); each row reads its own slot: its tokens and at most a
    # growing buffer's spare columns.
    assert "18 pages of 20-300 tokens" in out
    extra = [int(n) for n in re.findall(r"\((\d+) extra columns per row and step\)", out)]
    assert len(extra) == 2 and extra[0] == extra[1] < GROW_COLUMNS
    ratio = float(re.search(r"full-size prompt \(2052 tokens\): read ([\d.]+)x", out)[1])  # type: ignore[index]
    assert ratio <= 1 + GROW_COLUMNS / 2052
    assert "first page done after" in out and "prefills of joining pages" in out


def test_attention(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run_benchmark("attention.py", ["--tokens", "70", "--capacity", "200", "--repeats", "3"], monkeypatch)
    out = capsys.readouterr().out
    assert out.count("70 tokens, contiguous slot (GrowingSlots): ") == 2 and "SDPA" in out


def test_gpu_preflight_passes_here_and_names_a_mismatched_carry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_preflight

    assert gpu_preflight.main([]) == 0
    assert capsys.readouterr().out.startswith("preflight: ok: python ")
    # The GPU machine's huggingface-hub under a transformers that needs a newer one: one line, exit 1.
    real = importlib.metadata.version
    monkeypatch.setattr(
        gpu_preflight.importlib.metadata,
        "version",
        lambda name: "0.1.0" if name == "huggingface-hub" else real(name),
    )
    assert gpu_preflight.main([]) == 1
    line = capsys.readouterr().out
    assert re.fullmatch(
        r"preflight: transformers \S+ needs huggingface-hub\S+, found 0\.1\.0( \(and \d+ more\))?\n", line
    )


@pytest.mark.benchmarks
def test_serving_compares_the_server_with_the_library_call(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    figures = tmp_path / "figures.json"
    argv = ["--model", str(tiny_checkpoint), "--pages", "3", "--tokens", "6", "--clients", "1,3"]
    run_benchmark("serving.py", [*argv, "--json", str(figures)], monkeypatch)
    out = capsys.readouterr().out
    assert "overhead per page:" in out and "3 clients at once:" in out
    assert set(json.loads(figures.read_text())["pages_a_second_by_clients"]) == {"1", "3"}
