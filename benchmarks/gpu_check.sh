#!/usr/bin/env bash
# One prepared GPU check: `make gpu-check` on a bare machine with one NVIDIA GPU and no network.
#
#   benchmarks/gpu_check.sh            # on the GPU, in under 8 minutes (each step has a time limit)
#   benchmarks/gpu_check.sh --dry-run  # on this CPU with the tiny model: checks the script (CI runs it)
#
# The machine may hold an older transformers than kosmos needs and no PyMuPDF: `make gpu-wheels`, run
# beforehand where there is network, puts the wheels in .whl/, which this script installs first
# (with the device tool, name .whl in `carry`). Steps: the random full-size model built on the
# machine; the `gpu` tests (CUDA exactness in float32 and bf16, --compile, out-of-memory halving,
# flash-attention if installed); the throughput benchmark against the model card's loop (the
# baseline reads fewer pages: rates are compared); a decode sweep at batch 1, 8, 32, 64 and the
# largest kosmos picks, against the bandwidth bound; a mix of page lengths through the real loop (KV
# reads against the minimum, time to the first page, step times with pages joining); a run with
# natural lengths. Each step's log and
# one summary (its figures and exit codes) go to $OUT (the device tool's) or gpu-check/; the script
# exits 1 if any step failed, after every step has run.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
OUT_DIR=${OUT:-gpu-check}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$DRY_RUN" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/kosmos-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/kosmos-site:$PWD"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# The lines of each log that carry figures or outcomes, copied into the summary.
FIGURES='machine:|triton|model:|pages/s|ratio|prefill|bandwidth|decode batch|kv waste|timing:|token-identical|drift|same argmax|passed|failed|skipped|error|Error|GiB'

FAILED=()
step() { # step NAME SECONDS COMMAND...: run it under a time limit; its figures and exit code to the summary
    local name=$1 seconds=$2
    shift 2
    local started=$SECONDS
    echo "== $name" | tee -a "$SUMMARY"
    timeout "$seconds" "$@" >"$OUT_DIR/$name.log" 2>&1
    local code=$?
    if [ "$code" != 0 ]; then FAILED+=("$name"); fi
    grep -E "$FIGURES" "$OUT_DIR/$name.log" | tail -n 40 | tee -a "$SUMMARY"
    echo "-- $name: exit $code in $((SECONDS - started)) s$([ "$code" = 124 ] && echo ' (time limit)')" \
        | tee -a "$SUMMARY"
}

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    MODEL=$(mktemp -d)/tiny
    step model 120 "$PYTHON" -c "from pathlib import Path; from kosmos_cli.testing import save_random_checkpoint as s; s(Path('$MODEL'), size='tiny')"
    THROUGHPUT=(--pages 2 --tokens 4 --baseline-pages 1 --dtype float32)
    SWEEP=1,2,max
    MIX=(--kv-waste 4,12 --batch-size 2 --dtype float32)
    NATURAL=(--pages 2 --tokens 8)
else
    DEVICE=cuda
    MODEL=${KOSMOS_GPU_CHECK_MODEL:-$HOME/.cache/kosmos/benchmarks/random-full-seed0}
    step model 100 "$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); from throughput import random_model; print(random_model())"
    THROUGHPUT=(--pages 64 --tokens 300 --baseline-pages 4 --dtype bfloat16)
    SWEEP=1,8,32,64,max
    MIX=(--kv-waste 100,1000 --batch-size 16 --dtype bfloat16)
    NATURAL=(--pages 32 --tokens 1500)
fi
step environment 20 "$PYTHON" -c "import platform, torch, transformers, pymupdf, kosmos_cli
print('machine:', platform.node(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')
from kosmos_cli.model.slots import triton_available
print('python', platform.python_version(), 'torch', torch.__version__, 'transformers', transformers.__version__,
      'pymupdf', pymupdf.VersionBind, 'kosmos', kosmos_cli.__version__, 'triton (slot kernel)', triton_available())"
KOSMOS_GPU_CHECK_MODEL=$MODEL step tests 90 "$PYTHON" -m pytest -q -rs -m gpu tests/test_gpu.py tests/test_slots.py -p no:cacheprovider
step throughput 90 "$PYTHON" benchmarks/throughput.py --model "$MODEL" --device "$DEVICE" "${THROUGHPUT[@]}"
step decode-sweep 60 "$PYTHON" benchmarks/throughput.py --model "$MODEL" --device "$DEVICE" --dtype bfloat16 \
    --decode-sweep "$SWEEP"
step mix 50 "$PYTHON" benchmarks/throughput.py --model "$MODEL" --device "$DEVICE" "${MIX[@]}"
step natural 60 "$PYTHON" benchmarks/throughput.py --model "$MODEL" --device "$DEVICE" --natural --skip-baseline \
    "${NATURAL[@]}"
echo "summary: $SUMMARY"
if [ "${#FAILED[@]}" != 0 ]; then
    echo "failed: ${FAILED[*]}" | tee -a "$SUMMARY"
    exit 1
fi
