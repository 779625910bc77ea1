#!/bin/sh
# A nightly pipeline over a folder of scans, in plain POSIX sh.
#
#   sh examples/pipeline.sh [SCANS_DIR] [OUT_DIR] [KOSMOS_OPTIONS...]   (defaults: scans, out)
#
# Options after the folders go to both kosmos commands, e.g. `--device cuda --batch-size 32`.
#
# Every night, for the scans that are new or changed since the last night:
# 1. transcribe them to markdown, mirroring the folder tree;
# 2. OCR them to JSONL (one record per page), then list the pages that did not come out cleanly.
#
# There is no timestamp file to keep: each output folder holds kosmos's run manifest
# (OUT/.kosmos/manifest.jsonl), so a rerun transcribes exactly the documents that are new, changed
# (other bytes at the same path) or failed last time, and skips the rest. Two scans with the same
# file name in different folders never overwrite each other: outputs mirror the tree
# (scans/2024/03/a.pdf -> out/md/2024/03/a.pdf.md). A one-page document is as welcome as a long one.
#
# Lines marked [weights] run Kosmos-2.5 and need the model weights (downloaded on first
# use, or found offline with HF_HUB_OFFLINE=1 once cached) and, in practice, a GPU.
#
# kosmos exits 0 when every input was transcribed (or was done before), 1 when some failed (the rest
# are still written, and the failed ones are retried next night), 2 on a usage error and 3 when the
# model could not load. Data goes to stdout, messages and progress to stderr; with stderr in a log
# file, a progress line is written every 30 seconds.

set -eu

scans=${1:-scans}
out=${2:-out}
shift $(($# < 2 ? $# : 2))

if [ ! -d "$scans" ]; then
    echo "error: \`$scans\` is not a folder" >&2
    exit 2
fi
status=0

# --- 1. markdown ----------------------------------------------------------------------
kosmos md "$scans" -o "$out/md" "$@" || status=$? # [weights]

# 2 (usage error) and 3 (model did not load) will not get better on the next command.
if [ "$status" -ge 2 ]; then
    exit "$status"
fi

# --- 2. OCR lines with boxes, one JSONL file per document -------------------------------
# Each record holds source, page_number (1-based), status, text, lines, ...; status is
# "ok", "truncated" (hit the token limit or a repetition loop) or "failed".
kosmos ocr "$scans" --format jsonl -o "$out/ocr" "$@" || status=$? # [weights]

# --- pages that need a look (no model: reads the JSONL written so far) --------------
find "$out/ocr" -type f -name '*.jsonl' ! -path '*/.kosmos/*' -exec cat {} + 2>/dev/null |
    jq -r 'select(.status != "ok") | "\(.source)\tpage \(.page_number)\t\(.status)"' |
    sort -u >"$out/problems.tsv"
problems=$(wc -l <"$out/problems.tsv")
if [ "$problems" -gt 0 ]; then
    echo "warning: $problems page(s) need a look, see \`$out/problems.tsv\`" >&2
fi
# The same list straight from the model, for a whole folder, keeping no files: [weights]
#   kosmos ocr "$scans" --format jsonl | jq -r 'select(.status != "ok") | .source' | sort -u

exit "$status"
