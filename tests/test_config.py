"""Options checked where they are defined: `Settings`, `Job` and `RayOptions` refuse what names nothing."""

from __future__ import annotations

import pytest

from kosmos_cli.config import Job, RayOptions, Settings
from kosmos_cli.errors import UsageError
from kosmos_cli.values import Task


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "tpu"}, "`tpu` is not a device"),
        ({"device": "cuda:"}, "`cuda:` is not a device"),
        ({"dtype": "float8"}, "--dtype `float8` is not one of: auto, bfloat16, float16, float32"),
        ({"attn": "flash"}, "--attn `flash` is not one of: auto, sdpa, eager, flash_attention_2"),
        ({"quantize": "int4"}, "--quantize `int4` is not one of: int8"),
        ({"batch_size": 0}, "--batch-size must be at least 1, not 0"),
        ({"max_new_tokens": -5}, "--max-new-tokens must be at least 1, not -5"),
        ({"threads": 0}, "--threads must be at least 1, not 0"),
        ({"quantize": "int8", "device": "cuda"}, "--quantize int8 runs on CPU only"),
        ({"quantize": "int8", "dtype": "bfloat16"}, "--quantize int8 needs float32 weights"),
        ({"quantize": "int8", "compile": True}, "--quantize and --compile do not work together"),
        ({"kv_dtype": "int4"}, "--kv-dtype `int4` is not one of: auto, bfloat16, float16, float8"),
        (
            {"kv_dtype": "float8", "compile": True},
            "--kv-dtype applies to kosmos's own KV cache; --compile uses transformers' static one",
        ),
        ({"compile": True, "cuda_graph": True}, "--compile and --cuda-graph do not work together"),
        ({"cuda_graph": True, "device": "cpu"}, "--cuda-graph needs a CUDA GPU"),
        ({"cuda_graph": True, "device": "mps"}, "--cuda-graph needs a CUDA GPU"),
    ],
)
def test_settings_refuse(options: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        Settings(**options)  # type: ignore[arg-type]
    assert caught.value.message == message
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_settings_take_every_device_name(device: str) -> None:
    assert Settings(device=device).device == device


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dpi": 0.0}, "--dpi must be at least 10, not 0"),
        ({"dpi": 9.5}, "--dpi must be at least 10, not 9.5"),
        ({"dpi": -1.0}, "--dpi must be at least 10, not -1"),
        ({"dpi": float("nan")}, "--dpi must be at least 10, not nan"),
        ({"dpi": float("inf")}, "--dpi must be at least 10, not inf"),
        ({"page_timeout": 0.0}, "--page-timeout must be a positive number of seconds, not 0"),
        ({"numbered": True}, "--numbered numbers the boxes --draw draws"),
    ],
)
def test_jobs_refuse(options: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        Job(task=Task.OCR, formats=("txt",), **options)  # type: ignore[arg-type]
    assert caught.value.message == message


def test_a_job_takes_the_lowest_dpi() -> None:
    assert Job(task=Task.OCR, formats=("txt",), dpi=10.0).dpi == 10.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 0}, "--workers must be at least 1, not 0"),
        ({"gpus_per_worker": -1.0}, "--gpus-per-worker must be 0 or more, not -1"),
        ({"gpus_per_worker": float("nan")}, "--gpus-per-worker must be 0 or more, not nan"),
    ],
)
def test_ray_options_refuse(options: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        RayOptions(**options)  # type: ignore[arg-type]
    assert caught.value.message == message
