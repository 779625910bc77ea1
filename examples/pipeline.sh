#!/bin/sh
# A nightly pipeline over a folder of scans, in plain POSIX sh.
#
#   sh examples/pipeline.sh [SCANS_DIR] [OUT_DIR]      (defaults: scans, out)
#
# For the PDFs added since the last run:
# 1. transcribe them to markdown, mirroring the folder tree;
# 2. OCR them to JSONL, then list the pages that did not come out cleanly;
# 3. pull out the text of page 2 of each, with no shell loop.
#
# Lines marked [weights] run Kosmos-2.5 and need the model weights (downloaded on first
# use, or found offline with HF_HUB_OFFLINE=1 once cached) and, in practice, a GPU.
# Everything else is find, jq and the shell: it runs anywhere.
#
# kosmos exits 0 when every input was transcribed, 1 when some failed (the rest are still
# written), 2 on a usage error and 3 when the model could not load. Data goes to stdout,
# messages and progress to stderr, so the pipes below only ever carry results.

set -eu

scans=${1:-scans}
out=${2:-out}
stamp=$out/.last-run # its mtime marks the start of the last successful run

if [ ! -d "$scans" ]; then
    echo "error: \`$scans\` is not a folder" >&2
    exit 2
fi
mkdir -p "$out"

# First run: an old stamp makes every file count as new.
[ -e "$stamp" ] || touch -t 197001010000 "$stamp"

# Take the new stamp *before* the run, so a scan that lands while kosmos works is
# picked up next time instead of being skipped.
touch "$stamp.next"

# The PDFs added or changed since the last run, one path a line. kosmos reads such a list
# with --from-list - (so a file name holding a newline is not supported). The list goes
# through a file so that a night with nothing new skips the model, and so that all three
# steps see the same files.
find "$scans" -type f -name '*.pdf' -newer "$stamp" | sort >"$out/new.txt"
status=0

if [ -s "$out/new.txt" ]; then
    # --- 1. markdown ----------------------------------------------------------------
    # -o writes one .md per input, mirroring the folder tree:
    # scans/2024/03/a.pdf -> out/md/2024/03/a.md. Without a list file this is just
    #   find "$scans" -name '*.pdf' -newer "$stamp" | kosmos md --from-list - -o "$out/md"
    kosmos md --from-list - -o "$out/md" <"$out/new.txt" || status=$? # [weights]

    # 2 (usage error) and 3 (model did not load) will not get better on the next command.
    if [ "$status" -ge 2 ]; then
        rm -f "$stamp.next"
        exit "$status"
    fi

    # --- 2. OCR lines with boxes, one JSONL record per page --------------------------
    # Each record holds source, page_number (1-based), status, text, lines, ...; status is
    # "ok", "truncated" (hit the token limit or a repetition loop) or "failed".
    kosmos ocr --from-list - --format jsonl -o "$out/ocr" <"$out/new.txt" || status=$? # [weights]

    # --- 3. page 2 of every new PDF, no shell loop -----------------------------------
    # --pages takes 1-based numbers and ranges (2, 1-3,7) and applies to every input.
    kosmos md --from-list - --pages 2 -o "$out/page2" <"$out/new.txt" || status=$? # [weights]
    # One document to stdout:  kosmos md "$scans/report.pdf" --pages 2 > report-page2.md
else
    echo "nothing new in \`$scans\` since the last run" >&2
fi

# --- pages that need a look (no model: reads the JSONL written so far) --------------
find "$out" -path "$out/ocr/*" -type f -name '*.jsonl' -exec cat {} + |
    jq -r 'select(.status != "ok") | "\(.source)\tpage \(.page_number)\t\(.status)"' |
    sort -u >"$out/problems.tsv"
problems=$(wc -l <"$out/problems.tsv")
if [ "$problems" -gt 0 ]; then
    echo "warning: $problems page(s) need a look, see \`$out/problems.tsv\`" >&2
fi
# The same list straight from the model, for a whole folder, keeping no files: [weights]
#   kosmos ocr "$scans" --format jsonl | jq -r 'select(.status != "ok") | .source' | sort -u

# Move the stamp only when every input went through, so failures are retried next run.
if [ "$status" -eq 0 ]; then
    mv "$stamp.next" "$stamp"
else
    rm -f "$stamp.next"
    echo "error: some inputs failed (exit $status); the stamp was left as it was" >&2
fi
exit "$status"
