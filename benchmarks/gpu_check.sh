#!/usr/bin/env bash
# One prepared GPU check: `make gpu-check` on a bare machine with one NVIDIA GPU and no network.
#
#   benchmarks/gpu_check.sh            # on the GPU, in under 6 minutes (each step has a time limit)
#   benchmarks/gpu_check.sh --dry-run  # on a CPU with the tiny model: checks the script (`make gpu-rehearsal`)
#
# The GPU machine holds an older transformers than kosmos needs and no PyMuPDF: `make gpu-wheels`, run
# beforehand where there is network, puts the wheels in .whl/ (with the device tool, name .whl in
# `carry`); this script installs them first, in both modes, as it does there. Steps, each printing
# its figures as it goes (a step that hits its limit leaves what it measured):
#   preflight     versions and imports, in seconds: a bad carry stops the check here, with one line
#   model         the random full-size checkpoint, built on the machine
#   tests         the `gpu` tests: CUDA exactness in float32 and bf16, --cuda-graph, out-of-memory
#                 halving, the Triton slot kernel compiled for the GPU, flash-attention if installed
#   throughput    kosmos's loop against the model card's (the baseline reads fewer pages: rates compared)
#   decode-sweep  decode steps at batch 1, 8, 32 and the largest kosmos picks at the default budget,
#                 against the bandwidth bound: the eager loop, --cuda-graph, and --kv-dtype float8
#   mix           a mix of page lengths through the real loop: KV reads against the minimum, time to the
#                 first page, step times with pages joining
#   natural       pages stopping where the model stops them
# Everything a step prints goes to check.log, its figure lines to summary.txt and stdout: two files in
# $OUT (the device tool's) or gpu-check/. Exits 1 if a step failed, after every step has run (but at
# once if the preflight fails).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; fi
OUT_DIR=${OUT:-gpu-check}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/check.log"
SUMMARY="$OUT_DIR/summary.txt"
: >"$LOG"
: >"$SUMMARY"
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d)
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl >>"$LOG" 2>&1; then
        echo "preflight: the carried wheels in .whl/ did not install (check.log says why)" | tee -a "$SUMMARY"
        exit 1
    fi
    export PYTHONPATH="$SITE:$PYTHONPATH"
fi
# The lines of each step's output that carry figures or outcomes, copied into the summary as they come.
FIGURES='preflight|machine:|model:|pages/s|ratio|prefill|bandwidth|^-- |decode batch|kv waste|timing:|token-identical|drift|same argmax|passed|failed|skipped|error|Error|GiB'

FAILED=()
step() { # step NAME SECONDS COMMAND...: run it under a time limit; its output to the log, its figures to the summary
    local name=$1 seconds=$2
    shift 2
    local started=$SECONDS
    echo "== $name" | tee -a "$SUMMARY" >>"$LOG"
    timeout -k 5 "$seconds" "$@" 2>&1 | tee -a "$LOG" | grep --line-buffered -E "$FIGURES" | tee -a "$SUMMARY"
    local code=${PIPESTATUS[0]}
    if [ "$code" != 0 ]; then FAILED+=("$name"); fi
    echo "-- $name: exit $code in $((SECONDS - started)) s$([ "$code" = 124 ] && echo ' (time limit)')" \
        | tee -a "$SUMMARY" >>"$LOG"
    return "$code"
}

if [ "$DRY_RUN" = 1 ]; then
    step preflight 60 "$PYTHON" benchmarks/gpu_preflight.py || exit 1
    DEVICE=cpu
    MODEL=$(mktemp -d)/tiny
    step model 120 "$PYTHON" -c "from pathlib import Path; from kosmos_cli.testing import save_random_checkpoint as s; s(Path('$MODEL'), size='tiny')"
    # The CPU runs what it can of the tests the GPU runs, and the decoding tests, in the GPU machine's packages.
    TESTS=(tests/test_gpu.py tests/test_slots.py tests/test_generation.py -n 2)
    THROUGHPUT=(--pages 2 --tokens 4 --baseline-pages 1 --dtype float32)
    SWEEP=(--decode-sweep 1,2,max --dtype bfloat16 --kv-dtype float16)
    MIX=(--kv-waste 4,12 --batch-size 2 --dtype float32)
    NATURAL=(--pages 2 --tokens 8)
    LIMITS=(300 120 120 120 120)  # generous: CI may run it on a busy machine; the GPU limits are below
else
    step preflight 20 "$PYTHON" benchmarks/gpu_preflight.py --cuda || exit 1
    DEVICE=cuda
    MODEL=${KOSMOS_GPU_CHECK_MODEL:-$HOME/.cache/kosmos/benchmarks/random-full-seed0}
    step model 50 "$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); from throughput import random_model; print(random_model())"
    TESTS=(-m gpu tests/test_gpu.py tests/test_slots.py)
    THROUGHPUT=(--pages 32 --tokens 200 --baseline-pages 2 --dtype bfloat16)
    SWEEP=(--decode-sweep 1,8,32,max --dtype bfloat16 --cuda-graph --kv-dtype float8)
    MIX=(--kv-waste 50,500 --batch-size 16 --dtype bfloat16)
    NATURAL=(--pages 16 --tokens 500)
    LIMITS=(60 60 70 40 30)
fi
KOSMOS_GPU_CHECK_MODEL=$MODEL step tests "${LIMITS[0]}" "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider "${TESTS[@]}"
step throughput "${LIMITS[1]}" "$PYTHON" benchmarks/throughput.py --model "$MODEL" --device "$DEVICE" "${THROUGHPUT[@]}"
step decode-sweep "${LIMITS[2]}" "$PYTHON" benchmarks/throughput.py --model "$MODEL" --device "$DEVICE" "${SWEEP[@]}"
step mix "${LIMITS[3]}" "$PYTHON" benchmarks/throughput.py --model "$MODEL" --device "$DEVICE" "${MIX[@]}"
step natural "${LIMITS[4]}" "$PYTHON" benchmarks/throughput.py --model "$MODEL" --device "$DEVICE" --natural \
    --skip-baseline "${NATURAL[@]}"
echo "summary: $SUMMARY, log: $LOG"
if [ "${#FAILED[@]}" != 0 ]; then
    echo "failed: ${FAILED[*]}" | tee -a "$SUMMARY"
    exit 1
fi
